"""Why fine-tune unlearning does not reproduce Table XII at the cpu scale.

Reuses the main job's model (``--workdir``, trained by ``python -m
experiments.pushing --dataset=cifar10``) and the ids it submitted
(``--results``, a results.json of the main job or of ``reproduce --table=XII``),
fine-tunes on them as the server does (``ounl_jax.unlearning.fine_tune``), and
prints overall and class-A test accuracy for:

* the clean model;
* the fine-tuned model, and its parameters with the clean BatchNorm statistics put
  back (and the other way round): is it the statistics?
* fine-tuning on as many training images of the other classes, and of any class:
  is it the airplanes?
* fine-tuning the airplanes at smaller SGD steps (``--learning_rates``).

  TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/finetune_diagnosis.py \\
    --workdir=runs/cifar10 --results=runs/cifar10/results.json

docs/results.md ("Table XII") reports its output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import numpy as np
from absl import flags

from experiments.setup import cli
from experiments.run import pipeline
from ounl_jax import evaluation
from ounl_jax.unlearning import fine_tune


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/cifar10")
  parser.add_argument("--results", default="runs/cifar10/results.json")
  parser.add_argument("--learning_rates", default="0.003,0.001")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  fv = flags.FlagValues()
  cli.define_experiment_flags(fv)
  fv(["finetune_diagnosis", "--dataset=cifar10", f"--workdir={args.workdir}",
      "--noprogress"])
  config = cli.experiment_config(fv, unlearning="fine_tune")
  ctx = pipeline.prepare(config.train, args.workdir, show_progress=False)
  model, clean = ctx.trained.model, ctx.trained.variables
  train, test = ctx.splits.train, ctx.splits.test
  class_a = pipeline.class_a_of(ctx.spec, config)
  with open(args.results) as f:
    ids = np.asarray(json.load(f)["submitted_ids"])
  row_of = {int(i): r for r, i in enumerate(train.ids)}
  rows = np.array([row_of[int(i)] for i in ids])
  rng = np.random.default_rng(args.seed)
  key = jax.random.key(args.seed)

  def unlearn(chosen, learning_rate=fine_tune.FineTuneSettings().learning_rate):
    return fine_tune.fine_tune_unlearn(
        model, clean, train.images[chosen], train.labels[chosen], key,
        settings=fine_tune.FineTuneSettings(learning_rate=learning_rate))

  def show(name, variables):
    predicted = evaluation.predict_labels(model, variables, test.images)
    print(f"| {name} | {100 * evaluation.accuracy(predicted, test.labels):.1f} | "
          f"{100 * evaluation.class_accuracy(predicted, test.labels, class_a):.1f} |")

  print(f"| fine-tuned on ({len(rows)} samples), SGD step | overall | class A |")
  print("|---|---|---|")
  show("nothing (clean)", clean)
  tuned = unlearn(rows)
  show("the submitted samples relabelled, 0.01", tuned)
  show("the same, then the clean BatchNorm statistics put back",
       {**tuned, "batch_stats": clean["batch_stats"]})
  show("the clean parameters with the fine-tuned BatchNorm statistics",
       {**clean, "batch_stats": tuned["batch_stats"]})
  others = rng.choice(np.flatnonzero(train.labels != class_a), len(rows),
                      replace=False)
  show("training images of the other classes relabelled, 0.01", unlearn(others))
  show("training images of any class relabelled, 0.01",
       unlearn(rng.choice(len(train.labels), len(rows), replace=False)))
  for rate in (float(r) for r in args.learning_rates.split(",")):
    show(f"the submitted samples relabelled, {rate}", unlearn(rows, rate))


if __name__ == "__main__":
  main()
