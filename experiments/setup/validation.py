"""Every setting checked before any data is read or any model trained.

The ranges of every setting are checked by the dataclasses that hold them (the
library's settings and the configs, in ``__post_init__``): ``built`` sets each
flag's value through them and turns their error into one line naming the flag.
What no single dataclass can know is checked here: dataset, model and class
names, the registered attacks, defences and methods, and combinations.

Each check raises ``errors.UserError`` with one line that names the flag, the
value and the fix; ``cli.run_main`` prints it and exits with status 2
(``--debug`` shows the traceback instead).

>>> built(configs.ExperimentConfig(), {"tau": -1.0})
Traceback (most recent call last):
...
experiments.run.errors.UserError: --tau=-1.0: tau must be > 0, got -1.0 (a negative tau reverses the update, teaching the samples instead of unlearning them).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from experiments.run import errors
from experiments.setup import configs
from experiments.setup import overrides
from ounl_jax import data as data_lib
from ounl_jax import models


def _fail(flag: str, value, fix: str):
  raise errors.UserError(f"--{flag}={value}: {fix}")


def built(config, values: dict):
  """``config`` (an ``ExperimentConfig``, or any flat config dataclass whose
  flags are its field names) with each flag's value set through the dataclasses'
  own checks; their error names the flag."""
  for flag, value in values.items():
    try:
      if isinstance(config, configs.ExperimentConfig):
        config = overrides.override(config, **{flag: value})
      else:
        config = dataclasses.replace(config, **{flag: value})
    except (TypeError, ValueError) as error:
      raise errors.UserError(f"--{flag}={value}: {error}") from None
  return config


def check_class(flag: str, value, spec: data_lib.DatasetSpec) -> int:
  """The class index of ``--flag=value``; one line naming the closest classes."""
  return _known(flag, value, lambda v: data_lib.class_index(spec, v))


def _known(flag: str, value, check):
  try:
    return check(value)
  except ValueError as error:
    raise errors.UserError(f"--{flag}={value}: {error}") from None


def check_train(config: configs.TrainConfig) -> data_lib.DatasetSpec:
  """The dataset and model names. Returns the dataset's spec."""
  spec = _known("dataset", config.dataset, data_lib.get_spec)
  _known("model", config.model, models.check_model_name)
  return spec


def _registered() -> tuple:
  """(flag, value of the config, registered names) of each registry."""
  # pylint: disable=g-import-not-at-top
  from experiments.attacks import registry
  from experiments.server import methods
  from experiments.server import screens
  return (("attack", lambda c: c.attack.name, tuple(registry.ATTACKS)),
          ("defence", lambda c: c.server.defence, screens.defence_choices()),
          ("unlearning", lambda c: c.server.method, tuple(methods.METHODS)))


def check_attack(spec: data_lib.DatasetSpec,
                 config: configs.ExperimentConfig) -> None:
  """Class names, the registered names, and the classes' combinations."""
  class_a = check_class("unlearn_class",
                        config.samples.unlearn_class or spec.class_a, spec)
  for flag, value_of, known in _registered():
    if value_of(config) not in known:
      _fail(flag, value_of(config), f"choose one of {', '.join(known)}.")
  for flag, name, paper in (
      ("target_class", config.attack.target_class, spec.target_class),
      ("blend_class", config.attack.blend_class or spec.class_b, spec.class_b)):
    if name is not None and check_class(flag, name, spec) == class_a:
      _fail(flag, name, f"must differ from the unlearned class "
            f"{spec.class_names[class_a]} (--unlearn_class); the paper uses "
            f"{paper}.")


def check_method_flags(given, config: configs.ExperimentConfig) -> None:
  """A flag given for the settings of another unlearning method is a mistake."""
  method = config.server.method
  for flag in given:
    owners = {path.split(".")[1] for path in overrides.FLAG_PATHS.get(flag, ())
              if path.startswith("server.") and path.count(".") == 2}
    owners &= set(configs.METHOD_FIELDS)
    if owners and method not in owners:
      raise errors.UserError(
          f"--{flag} does not apply to --unlearning={method} (it sets "
          f"{' and '.join(sorted(owners))}); leave it out or choose that method.")


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
