"""Queries per pushed sample: the released coordinate ZOO against random directions.

Trains (or restores from ``--cache_dir``) a width-16 VGG-3 for 3 epochs on the real
CIFAR-10 copy (the tests' ``TrainedVGG``: AMSGrad 1e-3, seeds 0 and 100 + epoch),
takes the first ``--samples`` training airplanes it classifies correctly, pushes them
with both gradient estimators on the same samples and key, and prints one table row
per estimator: success rates (Pushing-I, Pushing-II), median / mean / max queries
per sample (attack + evaluation queries), mean Pushing-II L2, seconds (compilation
included), then the ratio of the median queries. Example (a few minutes on a 2-core
CPU, plus about a minute and a half of training the first time):

  TFDS_DATA_DIR=../shared/tensorflow_datasets_small \\
  python benchmarks/zoo_efficiency.py --cache_dir=/tmp/zoo_efficiency
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from ounl_jax import data as data_lib
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax import train as train_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing
from ounl_jax.attacks import zoo


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cache_dir", default="/tmp/zoo_efficiency")
  parser.add_argument("--data_dir", default=None, help="Default: $TFDS_DATA_DIR.")
  parser.add_argument("--samples", type=int, default=32)
  parser.add_argument("--max_iterations", type=int, default=300,
                      help="Per sample, for both estimators.")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--seed", type=int, default=1216)
  return parser.parse_args()


def trained_variables(model: models.Model, splits, epochs: int, cache_dir: str):
  """The tests' TrainedVGG recipe; leaves cached as one .npz in ``cache_dir``."""
  template = model.init(jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten(template)
  path = os.path.join(cache_dir, f"vgg3_w16_e{epochs}.npz")
  if os.path.exists(path):
    with np.load(path) as stored:
      return treedef.unflatten([stored[f"leaf_{i}"] for i in range(len(leaves))])
  optimizer = train_lib.amsgrad(1e-3)
  state = train_lib.init_train_state(template, optimizer)
  step = train_lib.make_train_step(model, optimizer)
  for epoch in range(epochs):
    state, _ = train_lib.train_epoch(step, state, splits.train.images,
                                     splits.train.labels, jax.random.key(100 + epoch))
  variables = jax.tree_util.tree_map(np.asarray, state.variables)
  os.makedirs(cache_dir, exist_ok=True)
  np.savez(path, **{f"leaf_{i}": leaf for i, leaf in
                    enumerate(jax.tree_util.tree_leaves(variables))})
  return variables


def row(name: str, result: pushing.PushResult, seconds: float) -> dict:
  queries = result.queries
  return {"estimator": name,
          "pushing_i": float(result.pushing_i.success.mean()),
          "pushing_ii": float(result.pushing_ii.success.mean()),
          "median": float(np.median(queries)), "mean": float(queries.mean()),
          "max": int(queries.max()),
          "l2": float(np.nanmean(np.where(result.pushing_ii.success,
                                          result.pushing_ii.l2, np.nan))),
          "seconds": seconds}


def main():
  args = parse_args()
  data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR")
  splits = data_lib.load("cifar10", data_dir=data_dir, seed=0)
  model = models.get_model("vgg3", num_classes=10, width=16)
  variables = trained_variables(model, splits, args.epochs, args.cache_dir)
  oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
                                  input_shape=model.input_shape,
                                  num_classes=model.num_classes)
  train = splits.train
  airplanes = np.flatnonzero(train.labels == 0)[:20 * args.samples]
  predicted, _ = labels_lib.oracle_predictions(oracle, oracle.init(),
                                               train.images[airplanes])
  chosen = airplanes[predicted == 0][:args.samples]
  images, labels = train.images[chosen], train.labels[chosen]
  limits = dict(max_iterations=args.max_iterations, iterations_per_chunk=10,
                sample_chunk_size=args.samples)
  estimators = (("coordinates (released)", zoo.ZooSettings(**limits)),
                ("directions", zoo.query_efficient_settings(**limits)))
  rows = []
  for name, settings in estimators:
    start = time.perf_counter()
    result = pushing.push(oracle, images, labels, jax.random.key(args.seed),
                          pushing.PushSettings(zoo=settings))
    rows.append(row(name, result, time.perf_counter() - start))
    assert result.oracle_queries == int(result.queries.sum())
  print(f"{len(chosen)} correctly classified airplanes, width-16 VGG-3 "
        f"({args.epochs} epochs), at most {args.max_iterations} iterations, "
        f"key {args.seed}, {jax.devices()[0].platform}")
  header = (f"{'estimator':24s} {'Push-I':>6s} {'Push-II':>7s} {'median q':>9s} "
            f"{'mean q':>9s} {'max q':>8s} {'mean L2':>8s} {'seconds':>8s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['estimator']:24s} {r['pushing_i']:6.2f} {r['pushing_ii']:7.2f} "
          f"{r['median']:9.0f} {r['mean']:9.0f} {r['max']:8d} {r['l2']:8.3f} "
          f"{r['seconds']:8.1f}")
  print(f"median queries, coordinates / directions: "
        f"{rows[0]['median'] / rows[1]['median']:.1f}x")


if __name__ == "__main__":
  main()
