"""Every flag checked before any data is read or any model trained.

Each check raises ``errors.UserError`` with one line that names the flag, the value
and the fix; ``cli.run_main`` prints it and exits with status 2 (``--debug`` shows
the traceback instead).
"""

from __future__ import annotations

import math
import os
import tempfile

from experiments.attacks import registry
from experiments.run import errors
from experiments.setup import configs
from experiments.attacks.pushing import sample_rules
from experiments.server import screens
from ounl_jax import data as data_lib
from ounl_jax import models
from ounl_jax import unlearning


def _fail(flag: str, value, fix: str):
  raise errors.UserError(f"--{flag}={value}: {fix}")


def _positive(flag: str, value, *, integer: bool = True, allow_none: bool = True):
  if value is None and allow_none:
    return
  if value is None or not math.isfinite(value) or value <= 0 or (
      integer and int(value) != value):
    kind = "a positive integer" if integer else "a positive finite number"
    _fail(flag, value, f"must be {kind}.")


def check_class(flag: str, value, spec: data_lib.DatasetSpec) -> int:
  """The class index of ``--flag=value``; one line naming the closest classes."""
  return _known(flag, value, lambda v: data_lib.class_index(spec, v))


def _known(flag: str, value, check):
  try:
    return check(value)
  except ValueError as error:
    raise errors.UserError(f"--{flag}={value}: {error}") from None


def check_train(config: configs.TrainConfig) -> data_lib.DatasetSpec:
  """The training flags: names and ranges. Returns the dataset's spec."""
  spec = _known("dataset", config.dataset, data_lib.get_spec)
  _known("model", config.model, models.check_model_name)
  for flag in ("width", "epochs", "patience", "batch_size", "max_train_per_class",
               "max_test_per_class"):
    _positive(flag, getattr(config, flag))
  _positive("learning_rate", config.learning_rate, integer=False)
  return spec


def check_attack(spec: data_lib.DatasetSpec, config) -> None:
  """The attack, server and defence flags: names, ranges and combinations.

  ``config``: an ``ExperimentConfig``, or the flags' values by flag name (checked
  before the library's settings are built from them).
  """
  value = (config.get if isinstance(config, dict) else
           lambda flag: configs.get(config, configs.FLAG_PATHS[flag][0]))
  class_a = _known("unlearn_class", value("unlearn_class") or spec.class_a,
                   lambda v: data_lib.class_index(spec, v))
  fraction = value("fraction")
  if not (math.isfinite(fraction) and 0 < fraction <= 1):
    _fail("fraction", fraction, "must be in (0, 1] (the paper uses 0.1 and 0.5).")
  for flag, known in (("sample_rule", sample_rules.SAMPLE_RULES),
                      ("attack", tuple(registry.ATTACKS)),
                      ("defence", tuple(screens.DEFENCES)),
                      ("unlearning", tuple(unlearning.METHODS))):
    if value(flag) not in known:
      _fail(flag, value(flag), f"choose one of {', '.join(known)}.")
  for flag in ("max_samples", "max_iterations", "iterations_per_chunk",
               "sample_chunk_size", "reference_batch_size", "finetune_epochs"):
    _positive(flag, value(flag))
  for flag in ("tau", "max_l2", "finetune_learning_rate"):
    _positive(flag, value(flag), integer=False)
  ratio = value("blend_ratio")
  if not (math.isfinite(ratio) and 0 < ratio <= 1):
    _fail("blend_ratio", ratio, "must be in (0, 1] (the weight on the class-B "
          "image; the paper uses 0.3 and 0.5).")
  for flag in ("target_class", "blend_class"):
    name = value(flag)
    if flag == "blend_class" and name is None:
      name = spec.class_b
    if name is None:
      continue
    if _known(flag, name, lambda v: data_lib.class_index(spec, v)) == class_a:
      _fail(flag, name, f"must differ from the unlearned class "
            f"{spec.class_names[class_a]} (--unlearn_class); the paper uses "
            f"{spec.target_class if flag == 'target_class' else spec.class_b}.")


def check_experiment(config: configs.ExperimentConfig) -> data_lib.DatasetSpec:
  """Every setting of an over-unlearning run (train, attack, server)."""
  spec = check_train(config.train)
  check_attack(spec, config)
  return spec


def check_workdir(workdir: str) -> None:
  """The workdir can be created and written (checked before any work)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise errors.UserError(
        f"--workdir={workdir}: cannot write there ({error.strerror}); choose a "
        "folder you can write to.") from None
