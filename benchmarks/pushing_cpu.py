"""Pushing-I and Pushing-II on real CIFAR-10 airplanes against the cpu-scale VGG.

Trains (or reuses, in ``--workdir``) the ``cpu``-preset server model, wraps it as a
black-box oracle, pushes the first ``--samples`` airplane training samples with ZOO
and prints, for both methods, the success rate, the mean L2 of the successes and the
queries per sample. Example (about ten minutes on a 2-core CPU, plus training):

  TFDS_DATA_DIR=../shared/tensorflow_datasets_small \\
  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 \\
  MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 \\
  python benchmarks/pushing_cpu.py --workdir=/tmp/attack_w --samples=32
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import jax
import numpy as np

from experiments.setup import configs
from experiments.setup import scales
from experiments.run import training
from ounl_jax import data as data_lib
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing
from ounl_jax.attacks import zoo


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/attack_w")
  parser.add_argument("--samples", type=int, default=32)
  parser.add_argument("--class_a", default="airplane")
  parser.add_argument("--target", default=None,
                      help="Class B for targeted pushing (e.g. cat); untargeted "
                           "if unset.")
  parser.add_argument("--max_iterations", type=int, default=1000)
  parser.add_argument("--iterations_per_chunk", type=int, default=10)
  parser.add_argument("--pushing_i", default="last", choices=pushing.PUSHING_I)
  parser.add_argument("--pushing_ii", default="first_crossing",
                      choices=pushing.PUSHING_II)
  parser.add_argument("--correct_only", action="store_true",
                      help="Take the first samples the server classifies correctly "
                           "(the others would be skipped, as in the released code).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="Optional JSON summary path.")
  return parser.parse_args()


def summary(method: pushing.Pushed, result: pushing.PushResult) -> dict:
  ok = method.success
  return {
      "success_rate": float(ok.mean()),
      "successes": int(ok.sum()),
      "mean_l2": float(method.l2[ok].mean()) if ok.any() else None,
      "max_l2": float(method.l2[ok].max()) if ok.any() else None,
      "mean_iteration": float(method.iteration[ok].mean()) if ok.any() else None,
      "status": dict(collections.Counter(method.status.tolist())),
      "predicted": dict(collections.Counter(method.predicted[ok].tolist())),
  }


def main():
  args = parse_args()
  config = configs.TrainConfig(**{k: v for k, v in scales.get_scale("cpu").items()
                                 if k in configs.TrainConfig.__dataclass_fields__})
  splits = training.load_splits(config)
  trained = training.train_or_restore(config, args.workdir, splits,
                                      show_progress=False)
  model, variables = trained.model, trained.variables
  oracle = oracle_lib.make_oracle(
      lambda x: models.predict_probabilities(model, variables, x),
      input_shape=model.input_shape, num_classes=model.num_classes)
  spec = data_lib.get_spec(config.dataset)
  class_a = data_lib.class_index(spec, args.class_a)
  target = None if args.target is None else data_lib.class_index(spec, args.target)
  chosen = np.flatnonzero(splits.train.labels == class_a)
  if args.correct_only:
    predicted, _ = labels_lib.oracle_predictions(oracle, oracle.init(),
                                                 splits.train.images[chosen])
    chosen = chosen[predicted == class_a]
  chosen = chosen[:args.samples]
  images, labels = splits.train.images[chosen], splits.train.labels[chosen]

  settings = pushing.PushSettings(
      zoo=zoo.ZooSettings(max_iterations=args.max_iterations,
                          iterations_per_chunk=args.iterations_per_chunk),
      target_class=target, pushing_i=args.pushing_i, pushing_ii=args.pushing_ii)
  malloc = [v for v in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_") if v in os.environ]
  print(f"model: {config.model} width {config.width}, test accuracy "
        f"{trained.metrics['final']['test']['accuracy']:.4f}; device "
        f"{jax.devices()[0].device_kind}; malloc env set: {malloc or 'none'}")
  print(f"{len(chosen)} {args.class_a} training samples"
        f"{' (correctly classified)' if args.correct_only else ''}, "
        f"{'targeted to ' + args.target if target is not None else 'untargeted'}, "
        f"Pushing-I={args.pushing_i}, Pushing-II={args.pushing_ii}, "
        f"max {args.max_iterations} iterations", flush=True)

  def report(progress: zoo.ZooProgress):
    print(f"  {time.time() - started:7.1f}s: {progress.samples_done}/"
          f"{progress.samples_total} done, iteration {progress.iteration}, batch "
          f"{progress.batch_size}, {progress.oracle_queries:,} oracle queries",
          flush=True)

  started = time.time()
  result = pushing.push(oracle, images, labels, jax.random.key(args.seed), settings,
                        on_chunk=report)
  seconds = time.time() - started
  attacked = result.attacked
  out = {
      "samples": len(chosen), "attacked": int(attacked.sum()),
      "misclassified_at_start": int((~attacked).sum()),
      "crossed": int(result.crossed.sum()),
      "pushing_i": summary(result.pushing_i, result),
      "pushing_ii": summary(result.pushing_ii, result),
      "queries_per_sample_mean": float(result.queries.mean()),
      "queries_per_attacked_sample_mean": float(result.queries[attacked].mean()),
      "queries_per_attacked_sample_median": float(np.median(result.queries[attacked])),
      "iterations_mean_attacked": float(result.iterations[attacked].mean()),
      "oracle_queries_total": result.oracle_queries,
      "seconds": seconds,
      "oracle_queries_per_second": result.oracle_queries / seconds,
      "settings": {"max_iterations": args.max_iterations,
                   "correct_only": args.correct_only, "pushing_i": args.pushing_i,
                   "pushing_ii": args.pushing_ii, "target": args.target},
  }
  print(json.dumps(out, indent=1))
  for name in ("pushing_i", "pushing_ii"):
    s = out[name]
    print(f"{name}: success {s['successes']}/{len(chosen)} "
          f"({100 * s['success_rate']:.1f}%), mean L2 {s['mean_l2']}, "
          f"queries/sample {out['queries_per_sample_mean']:.0f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
