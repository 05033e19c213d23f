"""Normal unlearning of a fraction of one class (paper Sec. IV, Fig. 5, Tables IV/XII).

``python -m experiments.unlearn --dataset=cifar10 --unlearn_class=airplane
--fraction=0.1 --unlearning=first_order --workdir=DIR [--scale=smoke|cpu|paper]``

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

from absl import flags
import jax

from experiments.run import progress
from experiments.run import records
from experiments.run import training
from experiments.server import methods
from experiments.setup import cli
from experiments.setup import configs
from experiments.setup import validation
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib

# This script's flags (experiments/setup/configs.py FLAG_PATHS): the user's class
# and fraction, the server's method and its settings, and their seeds.
FLAGS = ("unlearn_class", "fraction", "unlearn_seed", "unlearning", "server_seed",
         "tau", "steps", "reduction", "scope", "replacement", "reference_code",
         "reference_batch_size", "finetune_epochs", "finetune_learning_rate")


def define_flags(fv) -> None:
  """The common flags and this script's (entry module only)."""
  cli.define_common_flags(fv, workdir="./runs/unlearn")
  cli.define_config_flags(fv, FLAGS)
  flags.DEFINE_string("results_name", "unlearn_results.json",
                      "File name of the results inside --workdir.", flag_values=fv)


def evaluation_dict(result: service_lib.ServiceEvaluation,
                    spec: data_lib.DatasetSpec) -> dict:
  out = result.report.to_dict(spec.class_names)
  if result.histogram is not None:
    out["class_a_histogram"] = dict(zip(spec.class_names,
                                        result.histogram.tolist()))
  return out


def check(config: configs.ExperimentConfig, workdir: str) -> int:
  """Every setting (before any data is read); returns class A."""
  spec = validation.check_experiment(config)
  validation.check_workdir(workdir)
  return validation.check_class(
      "unlearn_class", config.samples.unlearn_class or spec.class_a, spec)


def run(config: configs.ExperimentConfig, workdir: str, *,
        data_dir: str | None = None, show_progress: bool = True) -> dict:
  """Unlearns the user's samples on a server holding the trained model."""
  progress.quiet_logs()
  class_a = check(config, workdir)
  spec = data_lib.get_spec(config.train.dataset)
  splits = training.load_splits(config.train, data_dir)
  trained = training.train_or_restore(config.train, workdir, splits,
                                      show_progress=show_progress)
  samples, server_config = config.samples, config.server
  unlearn_set = data_lib.select_unlearn_set(splits.train, class_a, samples.fraction,
                                            samples.seed)
  server = service_lib.UnlearningService(
      trained.model, trained.variables, splits.test,
      key=jax.random.key(server_config.seed),
      method=methods.get(server_config.method),
      settings=server_config.settings())
  before = server.evaluate(class_a)
  receipt = server.unlearn(service_lib.UnlearningRequest(unlearn_set.images,
                                                         unlearn_set.labels))
  after = server.evaluate(class_a)
  settings = dataclasses.asdict(server_config.settings())
  return {
      "dataset": config.train.dataset,
      "unlearn_class": spec.class_names[class_a],
      "fraction": samples.fraction,
      "num_unlearned": len(unlearn_set),
      "class_train_samples": int((splits.train.labels == class_a).sum()),
      "unlearned_ids": unlearn_set.ids,
      "method": server_config.method,
      "settings": settings,
      "seeds": {"train": config.train.seed, "unlearn": samples.seed,
                "server": server_config.seed},
      "receipt": dataclasses.asdict(receipt),
      "clean_class_a_correct": int(before.histogram.sum()),
      "before": evaluation_dict(before, spec),
      "after": evaluation_dict(after, spec),
      "splits": data_lib.describe(splits),
      **records.run_metadata({"train": config.train.to_dict(),
                              "samples": dataclasses.asdict(samples),
                              "server": dataclasses.asdict(server_config),
                              "settings": settings}),
  }


def main(argv, fv=flags.FLAGS):
  del argv
  config = cli.experiment_config(fv)
  results = run(config, fv.workdir, data_dir=fv.data_dir,
                show_progress=fv.progress)
  path = records.write_json(os.path.join(fv.workdir, fv.results_name), results)
  before, after = results["before"], results["after"]
  print(f"{results['method']} unlearning of {results['num_unlearned']} "
        f"{results['unlearn_class']} samples ({results['receipt']['seconds']:.1f}s): "
        f"class-A accuracy {before['class_a_accuracy']:.4f} -> "
        f"{after['class_a_accuracy']:.4f}, overall {before['accuracy']:.4f} -> "
        f"{after['accuracy']:.4f}")
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)
