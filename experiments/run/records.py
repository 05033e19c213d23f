"""What a run records: its config, seeds, versions and commit, and result files.

Side effects live here and in the experiment scripts, never in ``ounl_jax``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import uuid
from typing import Any

import numpy as np

from experiments.run import errors


@functools.cache
def git_commit() -> dict[str, Any]:
  """The commit of the code that ran, and whether the tree had local changes:
  read once per process (``cli.run_main`` reads it as the run starts), so a
  commit made while a long run goes on is not stamped on its results."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                            capture_output=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                text=True, capture_output=True,
                                check=True).stdout.strip())
    return {"commit": commit, "dirty": dirty}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": "unknown", "dirty": None}


def versions() -> dict[str, str]:
  found = {"python": sys.version.split()[0], "platform": platform.platform()}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "tensorflow-datasets", "array-record", "numpy"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = "not installed"
  try:
    import jax  # pylint: disable=g-import-not-at-top
    found["device"] = str(jax.devices()[0].device_kind)
  except Exception:  # pylint: disable=broad-except
    found["device"] = "unknown"
  return found


def host_peak_rss_mib() -> float:
  """This process's peak resident host memory so far, in MiB (``ru_maxrss``:
  KiB on Linux, bytes on macOS). On an accelerator it is the host side only (the
  device's memory is not in it); on a CPU it includes the model's activations."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def run_metadata(config: Any) -> dict[str, Any]:
  """Config, versions and commit: stamped into every result file."""
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  return {"config": config, "versions": versions(), "git": git_commit(),
          "command": " ".join(sys.argv)}


def to_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  if hasattr(value, "tolist"):  # jax arrays
    return to_jsonable(np.asarray(value))
  return value


def temporary_path(path: str) -> str:
  """A temporary name next to ``path``, unique per writer (pid and a random tag),
  ending like ``path`` (``np.savez`` keeps a name ending in .npz)."""
  head, tail = os.path.split(path)
  stem, extension = os.path.splitext(tail)
  return os.path.join(head, f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                            f"{extension}")


def write_json(path: str, payload: Any) -> str:
  """Writes atomically (a crash never leaves half a file; a unique temporary)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_path(path)
  try:
    with open(tmp, "w") as f:
      json.dump(to_jsonable(payload), f, indent=2, sort_keys=False)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


REWRITE = "Delete it and rerun to write it again."


def read_json(path: str, advice: str = REWRITE) -> Any:
  """The JSON in ``path``; a damaged file names itself and ``advice`` (the fix:
  a file a guard relies on passes advice that does not disarm the guard)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise errors.UserError(f"{path} is not valid JSON ({error}); it was cut short "
                           f"or edited. {advice}") from error
