"""Command-line flags, derived from the configs' dataclass fields.

Every flag of a config field is made from that field: its type from the
annotation, its help from the ``Attributes:`` section of the owning dataclass's
docstring (the library's settings document their own fields), its choices from
the library's tuples (``overrides.CHOICES``) or the registries (attacks, defences,
methods), and its default from the config of the default scale
(``scales.DEFAULT_SCALE``), so ``--helpfull`` shows what a run at the default scale
uses; a flag whose value differs between scales says so in its help. The short
names (``--fraction``, ``--tau``) and where each lands in the nested config are
``overrides.FLAG_PATHS``.

(ml_collections' ``config_flags.DEFINE_config_dataclass`` was tried for the
``--config.x=`` overrides: version 1.1.0 fails on the ``int | None`` fields the
configs and the library's settings use, ``TypeError: issubclass() arg 1 must be a
class``, so the flags are derived here, from the same dataclass fields.)

Shared modules define no flag at import time, so every experiment module can be
imported in one process. An entry module calls ``define_*_flags(flags.FLAGS)``
under ``if __name__ == "__main__":``; tests pass a fresh ``flags.FlagValues()``.

>>> from absl import flags
>>> fv = flags.FlagValues()
>>> define_experiment_flags(fv)
>>> fv["epochs"].default, fv["max_iterations"].default   # --scale=cpu's
(12, 300)
>>> _ = fv(["prog", "--scale=smoke", "--fraction=0.5"])
>>> config = experiment_config(fv)
>>> config.samples.fraction, config.samples.max_samples, config.train.width
(0.5, 8, 8)
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from experiments.run import determinism
from experiments.run import errors
from experiments.run import records
from experiments.run import stop_signal
from experiments.setup import configs
from experiments.setup import fields
from experiments.setup import overrides
from experiments.setup import scales
from experiments.setup import validation

_KINDS = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
          float: flags.DEFINE_float, str: flags.DEFINE_string}


def _owner(path: str) -> tuple[type, str]:
  """The dataclass holding the field at ``path`` of ``ExperimentConfig``."""
  head, _, field = path.rpartition(".")
  parent = overrides.get(configs.ExperimentConfig(), head) if head else (
      configs.ExperimentConfig())
  return type(parent), field


def _scale_note(flag: str) -> str:
  values = scales.differs(flag)
  return (" Per --scale: " + ", ".join(f"{k} {v}" for k, v in values.items())
          + "." if values else "")


def _define(fv, flag: str, path: str, choices: dict) -> None:
  owner, field = _owner(path)
  text = fields.attribute_docs(owner).get(field, field.replace("_", " ") + ".")
  default = scales.value(scales.DEFAULT_SCALE, flag)
  help_text = text + _scale_note(flag)
  if flag in choices:
    flags.DEFINE_enum(flag, default, list(choices[flag]), help_text,
                      flag_values=fv)
  else:
    _KINDS[fields.kind(owner, field)](flag, default, help_text, flag_values=fv)


def _registries() -> dict[str, tuple[str, ...]]:
  """The flags that choose from a registry, and their choices now."""
  # pylint: disable=g-import-not-at-top
  from experiments.attacks import registry
  from experiments.server import methods
  from experiments.server import screens
  return {"attack": tuple(registry.ATTACKS), "defence": screens.defence_choices(),
          "unlearning": tuple(methods.METHODS)}


def define_common_flags(fv, *, workdir: str = "./runs/default",
                        scale: str = scales.DEFAULT_SCALE) -> None:
  """Flags every experiment has: the training config's, scale, workdir, data."""
  flags.DEFINE_enum("scale", scale, list(scales.SCALES),
                    "Preset of sizes: smoke (seconds), cpu (minutes on a 2-core "
                    "CPU), paper (the paper's settings). Explicit flags override.",
                    flag_values=fv)
  flags.DEFINE_string("workdir", workdir, "Folder for checkpoints, results and "
                      "figures (WORKSPACE.md).", flag_values=fv)
  flags.DEFINE_string("data_dir", None,
                      "TFDS data folder; defaults to $TFDS_DATA_DIR.", flag_values=fv)
  for name in overrides.TRAIN_FLAGS:
    _define(fv, name, f"train.{name}", {})
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=fv)
  flags.DEFINE_bool("deterministic", True, determinism.HELP, flag_values=fv)
  flags.DEFINE_bool("debug", False, "Show the full traceback of a user error "
                    "instead of its one-line message.", flag_values=fv)


def define_config_flags(fv, names) -> None:
  """The ``overrides.FLAG_PATHS`` flags ``names``."""
  choices = {**overrides.CHOICES, **_registries()}
  for name in names:
    _define(fv, name, overrides.FLAG_PATHS[name][0], choices)


def define_dataclass_flags(fv, default, *, choices: dict | None = None) -> None:
  """One flag per field of the dataclass instance ``default``, named as the field:
  its type from the annotation (a tuple is a comma-separated list), its help from
  the class's ``Attributes:`` docstring, its default from ``default``."""
  owner, choices = type(default), choices or {}
  docs = fields.attribute_docs(owner)
  for field in dataclasses.fields(owner):
    value, text = getattr(default, field.name), docs.get(field.name, field.name)
    kind = fields.kind(owner, field.name)
    if field.name in choices:
      flags.DEFINE_enum(field.name, value, list(choices[field.name]), text,
                        flag_values=fv)
    elif fields.tuple_of(kind) is not None:
      flags.DEFINE_list(field.name, [f"{v:g}" if isinstance(v, float) else str(v)
                                     for v in value], text, flag_values=fv)
    else:
      _KINDS[kind](field.name, value, text, flag_values=fv)


def dataclass_from_flags(fv, cls):
  """The flags ``define_dataclass_flags`` made, as a ``cls``; a bad value's error
  names its flag."""
  values = {}
  for field in dataclasses.fields(cls):
    value, item = fv[field.name].value, fields.tuple_of(fields.kind(cls, field.name))
    if item is not None:
      try:
        value = tuple(item(v) for v in value)
      except ValueError:
        raise errors.UserError(
            f"--{field.name}={','.join(value)}: give a comma-separated list of "
            f"{item.__name__} values.") from None
    values[field.name] = value
  return validation.built(cls(), values)


def define_experiment_flags(fv, *, workdir: str = "./runs/cifar10") -> None:
  """The common flags and every ``overrides.FLAG_PATHS`` flag (pushing, blending)."""
  define_common_flags(fv, workdir=workdir)
  define_config_flags(fv, overrides.FLAG_PATHS)


def define_time_budget_flag(fv) -> None:
  """``--time_budget``: the pushing experiments' deadline (not a config field:
  it changes when a run stops, never what it computes)."""
  flags.DEFINE_float(
      "time_budget", None, "Seconds from the start after which the push stops "
      "cleanly, its finished samples saved (ZOO attackers); the run exits with "
      f"status {errors.TIME_BUDGET_STATUS} and rerunning the same command "
      "continues. Unset: no limit.", lower_bound=0.0, flag_values=fv)


def from_scale(fv, name: str) -> Any:
  """The flag's value if given on the command line, else its scale's."""
  if fv[name].present:
    return fv[name].value
  return scales.value(fv.scale, name)


def train_config(fv) -> configs.TrainConfig:
  values = {name: from_scale(fv, name) for name in overrides.TRAIN_FLAGS}
  return validation.built(configs.TrainConfig(), values)


def experiment_config(fv, **fixed) -> configs.ExperimentConfig:
  """The flags as an ``ExperimentConfig``; ``fixed`` values (by flag name) win.

  Each value is set through the library's settings, whose own checks refuse a bad
  one: the error names the flag (``validation.built``).
  """
  train = train_config(fv)
  values = {name: from_scale(fv, name) for name in overrides.FLAG_PATHS
            if name in fv}
  values.update(fixed)
  config = dataclasses.replace(configs.ExperimentConfig(), train=train)
  config = validation.built(config, values)
  validation.check_experiment(config)
  validation.check_method_flags(
      [name for name in overrides.FLAG_PATHS if name in fv and fv[name].present],
      config)
  return config


def run_main(main, fv=flags.FLAGS) -> None:
  """``app.run(main)``; a user error prints one line and exits 2 (--debug: raise).

  A push stopped at ``--time_budget`` or by SIGTERM (``stop_signal``) prints one
  line and exits ``errors.TIME_BUDGET_STATUS`` (75): rerun to continue. User
  errors: a bad flag (unknown flag or choice, unparsable value: absl's parse),
  ``errors.user_errors()`` raised by the run, a workdir another run holds
  (``workdir_lock``, held from start to end), and a full disk.
  """
  import errno  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from experiments.run import workdir_lock  # pylint: disable=g-import-not-at-top

  def parse(argv):
    try:
      return fv(argv)
    except flags.Error as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)

  def wrapped(argv):
    records.git_commit()  # The code as it starts, not as it ends.
    stop_signal.install()  # SIGTERM: a push stops cleanly, exit 75.
    if "deterministic" in fv:
      determinism.deterministic_gpu_ops(fv.deterministic)
    try:
      workdir = fv["workdir"].value if "workdir" in fv else None
      if not workdir:
        return main(argv)
      with workdir_lock.hold(workdir):
        return main(argv)
    except errors.TimeBudgetReached as stop:
      if fv.debug:
        raise
      print(f"stopped: {stop}", file=sys.stderr)
      sys.exit(errors.TIME_BUDGET_STATUS)
    except errors.user_errors() as error:
      if fv.debug:
        raise
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)
    except OSError as error:
      if error.errno != errno.ENOSPC or fv.debug:
        raise
      print(f"error: no space left on the device "
            f"({error.filename or 'while writing'}): free some space or use "
            "another --workdir, then rerun (the run resumes from what it saved).",
            file=sys.stderr)
      sys.exit(2)

  app.run(wrapped, flags_parser=parse)
