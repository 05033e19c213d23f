"""What every experiment shares: run metadata, result files, user errors, progress.

Side effects live here and in the experiment scripts, never in ``ounl_jax``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from experiments import configs

# The server's training config (``experiments/configs.py``), kept here for the
# scripts and benchmarks that import it from ``common``.
TrainConfig = configs.TrainConfig


# JAX's own events for the three steps of a compilation (trace, lower, XLA
# compile). A rate compared with a warmed-up baseline (``devices.
# forward_images_per_second`` compiles before it times) leaves these out too.
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
_compiling = [0.0]


def _count_compiling(event: str, seconds: float, **unused) -> None:
  if event in COMPILE_EVENTS:
    _compiling[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compiling)


def compile_seconds() -> float:
  """Seconds this process has spent compiling so far (differences time a step)."""
  return _compiling[0]


def quiet_logs() -> None:
  """Keeps absl/orbax/TFDS INFO chatter off the terminal (warnings still show)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


def git_commit() -> dict[str, Any]:
  """The commit of the code that ran, and whether the tree had local changes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def write_json(path: str, payload: Any) -> str:
  """Writes atomically (a crash never leaves half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_jsonable(payload), f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_json(path: str) -> Any:
  """The JSON in ``path``; a damaged file names itself and the fix."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise UserError(f"{path} is not valid JSON ({error}); it was cut short or "
                    "edited. Delete it and rerun to write it again.") from error


class UserError(ValueError):
  """A problem the user can fix; ``cli.run_main`` prints its one line, exit 2."""


def user_errors() -> tuple[type, ...]:
  """Errors whose message is the whole story: printed as one line, exit 2."""
  # pylint: disable=g-import-not-at-top
  from ounl_jax import checkpoint
  from ounl_jax import data as data_lib
  return (UserError, data_lib.DataNotFoundError, data_lib.DataFormatError,
          data_lib.DataCorruptError, checkpoint.CheckpointError)


def warn(message: str) -> None:
  """One line on stderr (experiments only; the library never prints)."""
  print(f"warning: {message}", file=sys.stderr)


def progress(iterable=None, *, total=None, desc=None, enabled=True, **kwargs):
  """A tqdm progress bar on stderr (silent when disabled)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, disable=not enabled,
              dynamic_ncols=True, leave=False, **kwargs)
