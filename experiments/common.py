"""What every experiment shares: flags, scale presets, run metadata, result files.

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

from absl import flags
import numpy as np

from experiments import presets

FLAGS = flags.FLAGS

# Keys of a preset that experiments take from --scale unless the flag is given.
_PRESET_KEYS = tuple(presets.SCALES["smoke"])


def define_common_flags(defaults: dict[str, Any] | None = None) -> None:
  """Flags every experiment has: data, model, scale, training, workdir, seed."""
  defaults = defaults or {}
  flags.DEFINE_string("dataset", "cifar10", "cifar10, cifar100 or stl10.")
  flags.DEFINE_string("model", "vgg3", "vgg3, vgg4, vgg5 or resnet.")
  flags.DEFINE_enum("scale", defaults.get("scale", "cpu"), list(presets.SCALES),
                    "Preset of sizes: smoke (seconds), cpu (minutes on a 2-core "
                    "CPU), paper (the paper's settings). Explicit flags override.")
  flags.DEFINE_string("workdir", defaults.get("workdir", "./runs/default"),
                      "Folder for checkpoints, results and figures (WORKSPACE.md).")
  flags.DEFINE_string("data_dir", None,
                      "TFDS data folder; defaults to $TFDS_DATA_DIR.")
  flags.DEFINE_integer("seed", 0, "Seed of the split, the model init and training.")
  flags.DEFINE_integer("width", None, "Convolution width (preset if unset).")
  flags.DEFINE_integer("max_train_per_class", None,
                       "Training samples per class (preset if unset).")
  flags.DEFINE_integer("max_test_per_class", None,
                       "Test samples per class (preset if unset).")
  flags.DEFINE_integer("epochs", None, "Maximum training epochs (preset if unset).")
  flags.DEFINE_integer("patience", None,
                       "Early-stopping patience in epochs (preset if unset).")
  flags.DEFINE_integer("batch_size", 64, "Training batch size (App. B: 64).")
  flags.DEFINE_float("learning_rate", None,
                     "Adam-AMSGrad learning rate; default per dataset (1e-3, "
                     "CIFAR-100 1e-4 as the released code).")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  flags.DEFINE_bool("debug", False, "Show the full traceback of a user error "
                    "instead of its one-line message.")


def quiet_logs() -> None:
  """Keeps absl/orbax/TFDS INFO chatter off the terminal (warnings still show)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


def from_preset(name: str, scale: str) -> Any:
  """The flag's value if given on the command line, else the preset's."""
  preset = presets.get_scale(scale)
  flag = FLAGS[name]
  if flag.present or name not in preset:
    return flag.value
  return preset[name]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What determines the server's trained model (and so its checkpoint)."""

  dataset: str = "cifar10"
  model: str = "vgg3"
  width: int | None = None
  seed: int = 0
  epochs: int = 100
  patience: int = 10
  batch_size: int = 64
  learning_rate: float | None = None
  max_train_per_class: int | None = None
  max_test_per_class: int | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def train_config_from_flags() -> TrainConfig:
  scale = FLAGS.scale
  return TrainConfig(
      dataset=FLAGS.dataset, model=FLAGS.model,
      width=from_preset("width", scale), seed=FLAGS.seed,
      epochs=from_preset("epochs", scale), patience=from_preset("patience", scale),
      batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      max_train_per_class=from_preset("max_train_per_class", scale),
      max_test_per_class=from_preset("max_test_per_class", scale))


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
  """A problem the user can fix; experiments print its one line and exit 2."""


def user_errors() -> tuple[type, ...]:
  """Errors whose message is the whole story: printed as one line, exit 2."""
  # pylint: disable=g-import-not-at-top
  from ounl_jax import checkpoint
  from ounl_jax import data as data_lib
  return (UserError, data_lib.DataNotFoundError, data_lib.DataFormatError,
          data_lib.DataCorruptError, checkpoint.CheckpointError)


def run_main(main) -> None:
  """``app.run(main)``; a user error prints one line and exits 2 (--debug: raise)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def wrapped(argv):
    try:
      return main(argv)
    except user_errors() as error:
      if FLAGS.debug:
        raise
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)


def warn(message: str) -> None:
  """One line on stderr (experiments only; the library never prints)."""
  print(f"warning: {message}", file=sys.stderr)


def progress(iterable=None, *, total=None, desc=None, enabled=True, **kwargs):
  """A tqdm progress bar on stderr (silent when disabled)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, disable=not enabled,
              dynamic_ncols=True, leave=False, **kwargs)
