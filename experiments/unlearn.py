"""Normal unlearning of a fraction of one class (paper Sec. IV, Fig. 5, Tables IV/XII).

``python -m experiments.unlearn --dataset=cifar10 --unlearn_class=airplane
--fraction=0.1 --method=first_order --workdir=DIR [--scale=smoke|cpu|paper]``

Reuses the model checkpointed in ``DIR`` (or trains it, as ``experiments.train``),
selects a seeded ``fraction`` of class A's training samples (docs/protocol.md §4: 400 /
2,000 CIFAR-10 airplanes for 10% / 50% at paper scale), submits them with their true
labels to the unlearning service and writes ``DIR/unlearn_results.json``: overall,
per-class and class-A test accuracy before and after, and class A's prediction
histogram (docs/protocol.md §11), with config, seeds and run metadata.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import flags
import jax

from experiments.setup import cli
from experiments.run import errors
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from experiments.run import training
from experiments.setup import validation
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from ounl_jax import unlearning

_SERVER = configs.ServerConfig()
# Flag name -> settings field, for the flags each method reads.
_SETTING_FLAGS = {
    "tau": "tau", "steps": "steps", "reduction": "reduction", "scope": "scope",
    "replacement": "replacement", "reference_code": "reference_code",
    "reference_batch_size": "reference_batch_size",
    "finetune_learning_rate": "learning_rate", "finetune_epochs": "epochs",
}
_SETTINGS_OF = {"finetune_learning_rate": _SERVER.fine_tune,
                "finetune_epochs": _SERVER.fine_tune}


def define_flags(fv) -> None:
  """The common flags and this script's (entry module only); defaults from
  ``configs.ServerConfig`` and ``configs.SamplesConfig``."""
  samples = configs.SamplesConfig()
  cli.define_common_flags(fv, workdir="./runs/unlearn")
  flags.DEFINE_string("unlearn_class", samples.unlearn_class,
                      "Class A whose samples are unlearned (name or index); the "
                      "paper's class of the dataset if unset (CIFAR-10 airplane).",
                      flag_values=fv)
  flags.DEFINE_float("fraction", samples.fraction, "Fraction of class A's "
                     "training samples submitted (the paper's 0.1 and 0.5).",
                     flag_values=fv)
  flags.DEFINE_enum("method", _SERVER.method, list(unlearning.METHODS),
                    "The server's unlearning method.", flag_values=fv)
  flags.DEFINE_integer("unlearn_seed", samples.seed, "Seeds the unlearn-set "
                       "selection (released code default 88).", flag_values=fv)
  flags.DEFINE_integer("server_seed", _SERVER.seed, "Seeds the server's "
                       "unlearning noise (as the pushing experiments).",
                       flag_values=fv)
  enums = {"reduction": ["sum", "mean"], "scope": ["head", "all"],
           "replacement": ["noise", "black", "white", "none"]}
  for flag, field in _SETTING_FLAGS.items():
    default = getattr(_SETTINGS_OF.get(flag, _SERVER.first_order), field)
    text = f"The method's {field} (flag given: applied; default {default})."
    if flag in enums:
      flags.DEFINE_enum(flag, default, enums[flag], text, flag_values=fv)
    elif isinstance(default, bool):
      flags.DEFINE_bool(flag, default, text, flag_values=fv)
    elif isinstance(default, int):
      flags.DEFINE_integer(flag, default, text, flag_values=fv)
    else:
      flags.DEFINE_float(flag, default, text, flag_values=fv)
  flags.DEFINE_string("results_name", "unlearn_results.json",
                      "File name of the results inside --workdir.", flag_values=fv)


def settings_from_flags(fv, method: str):
  """The experiments' settings of ``method`` (``configs.ServerConfig``), then the
  flags given for it; a flag given for another method is a user error."""
  settings = dataclasses.replace(_SERVER, method=method).settings()
  fields = {f.name for f in dataclasses.fields(settings)}
  overrides = {}
  for flag, field in _SETTING_FLAGS.items():
    if not fv[flag].present:
      continue
    if field not in fields:
      raise errors.UserError(f"--{flag} does not apply to --method={method}.")
    overrides[field] = fv[flag].value
  return dataclasses.replace(settings, **overrides)


def evaluation_dict(result: service_lib.ServiceEvaluation,
                    spec: data_lib.DatasetSpec) -> dict:
  out = result.report.to_dict(spec.class_names)
  if result.histogram is not None:
    out["class_a_histogram"] = dict(zip(spec.class_names,
                                        result.histogram.tolist()))
  return out


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
  """This experiment's config: the model, the user's class and the server."""

  train: configs.TrainConfig = configs.TrainConfig()
  unlearn_class: str | None = None
  fraction: float = configs.SamplesConfig.fraction
  method: str = _SERVER.method
  settings: Any = _SERVER.first_order
  unlearn_seed: int = configs.SamplesConfig.seed
  server_seed: int = _SERVER.seed


def check(config: UnlearnConfig, workdir: str) -> int:
  """Every setting (before any data is read); returns class A."""
  spec = validation.check_train(config.train)
  class_a = validation.check_class("unlearn_class",
                                   config.unlearn_class or spec.class_a, spec)
  if not 0 < config.fraction <= 1:
    raise errors.UserError(f"--fraction={config.fraction}: must be in (0, 1].")
  validation.check_workdir(workdir)
  return class_a


def run(config: UnlearnConfig, workdir: str, *, data_dir: str | None = None,
        show_progress: bool = True) -> dict:
  """Unlearns the user's samples on a server holding the trained model."""
  progress.quiet_logs()
  class_a = check(config, workdir)
  spec = data_lib.get_spec(config.train.dataset)
  splits = training.load_splits(config.train, data_dir)
  trained = training.train_or_restore(config.train, workdir, splits,
                                      show_progress=show_progress)
  unlearn_set = data_lib.select_unlearn_set(splits.train, class_a, config.fraction,
                                            config.unlearn_seed)
  server = service_lib.UnlearningService(
      trained.model, trained.variables, splits.test,
      key=jax.random.key(config.server_seed), method=config.method,
      settings=config.settings)
  before = server.evaluate(class_a)
  receipt = server.unlearn(service_lib.UnlearningRequest(unlearn_set.images,
                                                         unlearn_set.labels))
  after = server.evaluate(class_a)
  settings = dataclasses.asdict(config.settings)
  return {
      "dataset": config.train.dataset,
      "unlearn_class": spec.class_names[class_a],
      "fraction": config.fraction,
      "num_unlearned": len(unlearn_set),
      "class_train_samples": int((splits.train.labels == class_a).sum()),
      "unlearned_ids": unlearn_set.ids,
      "method": config.method,
      "settings": settings,
      "seeds": {"train": config.train.seed, "unlearn": config.unlearn_seed,
                "server": config.server_seed},
      "receipt": dataclasses.asdict(receipt),
      "clean_class_a_correct": int(before.histogram.sum()),
      "before": evaluation_dict(before, spec),
      "after": evaluation_dict(after, spec),
      "splits": data_lib.describe(splits),
      **records.run_metadata({"train": config.train.to_dict(),
                             "unlearn": {"method": config.method,
                                         "fraction": config.fraction,
                                         "unlearn_class": spec.class_names[class_a],
                                         "unlearn_seed": config.unlearn_seed,
                                         "server_seed": config.server_seed,
                                         "settings": settings}}),
  }


def main(argv, fv=flags.FLAGS):
  del argv
  try:
    settings = settings_from_flags(fv, fv.method)
  except ValueError as error:
    raise errors.UserError(str(error)) from None
  config = UnlearnConfig(cli.train_config(fv), fv.unlearn_class, fv.fraction,
                         fv.method, settings, fv.unlearn_seed, fv.server_seed)
  results = run(config, fv.workdir, data_dir=fv.data_dir,
                show_progress=fv.progress)
  path = records.write_json(os.path.join(fv.workdir, fv.results_name), results)
  before, after = results["before"], results["after"]
  print(f"{config.method} unlearning of {results['num_unlearned']} "
        f"{results['unlearn_class']} samples ({results['receipt']['seconds']:.1f}s): "
        f"class-A accuracy {before['class_a_accuracy']:.4f} -> "
        f"{after['class_a_accuracy']:.4f}, overall {before['accuracy']:.4f} -> "
        f"{after['accuracy']:.4f}")
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)
