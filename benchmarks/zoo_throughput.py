"""ZOO queries/s against the raw forward throughput of the same model.

For S in {1, 16, 64} samples attacked at once, one ZOO iteration sends
``S * (2B + 1)`` images (B = 128) to the oracle in one flat batch. This measures

* ``zoo q/s``: images queried per second by ``zoo_run_chunk`` (compiled, every
  sample active, early abort and crossing stops off, so every iteration is full);
* ``fwd img/s``: the same model's jitted softmax forward on a batch of the same size
  ``S * (2B + 1)``, the same number of times, the better of two ways: one call per
  batch (``call``), or all batches in one compiled ``fori_loop`` (``loop``; on CPU
  this avoids re-allocating the large activations every call and is the fairer
  baseline for the ZOO loop, which also runs its iterations in one call);

and prints the table, then as its last line ``zoo/forward ratio: X.XX``, the worst
ratio over S (target >= 0.9: the attack adds at most 10% over the model's cost).
Both are timed alternately, several rounds, best round kept, so that other load on
the machine hurts both alike.

Models: ``--model_scale=cpu`` is the VGG-3 at width 16 (the ``cpu`` preset; 32 with
``--width=32``), ``paper`` the paper's width 128 (for an accelerator). Weights are a
seeded random init: throughput does not depend on training.

Environment: on CPU, glibc's allocator page-faults on every large batch unless
told otherwise (docs/protocol.md §19). Run as

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 \\
  MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 \\
  python benchmarks/zoo_throughput.py --model_scale=cpu

The script prints which of these variables are set.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import numpy as np

from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import zoo

MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
WIDTHS = {"cpu": 16, "paper": 128}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_scale", choices=sorted(WIDTHS), default="cpu")
  parser.add_argument("--width", type=int, default=None,
                      help="VGG-3 width (default: 16 for cpu, 128 for paper).")
  parser.add_argument("--samples", default="1,16,64",
                      help="Comma-separated S values.")
  parser.add_argument("--coordinates", type=int, default=128, help="B.")
  parser.add_argument("--images_per_round", type=int, default=20000,
                      help="Images per timed round (sets the iterations per S).")
  parser.add_argument("--rounds", type=int, default=5)
  return parser.parse_args()


def timed(fn, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start


def measure(model, variables, count: int, settings: zoo.ZooSettings, rounds: int,
            images_per_round: int):
  """Best-of-rounds (zoo q/s, forward img/s) for ``count`` samples."""
  def predict(x):
    return models.predict_probabilities(model, variables, x)

  oracle = oracle_lib.make_oracle(predict, input_shape=model.input_shape,
                                  num_classes=model.num_classes)
  batch = count * settings.queries_per_iteration
  iterations = max(2, math.ceil(images_per_round / batch))
  settings = zoo.dataclasses.replace(settings, iterations_per_chunk=iterations,
                                     sample_chunk_size=count)
  key = jax.random.key(1)
  images = jax.random.uniform(jax.random.fold_in(key, 0), (count,) + model.input_shape,
                              minval=-0.5, maxval=0.5)
  labels = np.zeros((count,), np.int32)
  state = zoo.zoo_init(images, labels, jax.random.fold_in(key, 1), settings)
  run = zoo.compiled_chunk(oracle, settings)
  forward = jax.jit(predict)
  probes = jax.random.uniform(jax.random.fold_in(key, 2),
                              (batch,) + model.input_shape, minval=-0.5, maxval=0.5)

  @jax.jit
  def forward_loop(x):
    def body(_, total):  # Each pass depends on the last: nothing is hoisted.
      return total + predict(x + 0 * total[0])[0]
    return jax.lax.fori_loop(0, iterations, body, jax.numpy.zeros((10,)))

  jax.block_until_ready(run(state, oracle.init()))  # Compile all three.
  jax.block_until_ready(forward(probes))
  jax.block_until_ready(forward_loop(probes))
  seconds = {"zoo": math.inf, "call": math.inf, "loop": math.inf}
  for _ in range(rounds):  # Interleaved, best round kept.
    seconds["zoo"] = min(seconds["zoo"], timed(lambda: run(state, oracle.init()), 1))
    seconds["call"] = min(seconds["call"], timed(lambda: forward(probes), iterations))
    seconds["loop"] = min(seconds["loop"], timed(lambda: forward_loop(probes), 1))
  images_sent = batch * iterations
  rates = {k: images_sent / v for k, v in seconds.items()}
  return rates, batch, iterations


def main():
  args = parse_args()
  width = args.width or WIDTHS[args.model_scale]
  model = models.get_model("vgg3", num_classes=10, width=width)
  variables = model.init(jax.random.key(0))
  settings = zoo.ZooSettings(coordinates_per_iteration=args.coordinates,
                             abort_early=False, max_iterations=10**9)
  set_vars = [f"{v}={os.environ[v]}" for v in MALLOC_VARS if v in os.environ]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs")
  print(f"model: vgg3 width {width} ({args.model_scale} scale), "
        f"B={args.coordinates}, {settings.queries_per_iteration} "
        "queries/sample/iteration")
  print("glibc malloc env: " + (", ".join(set_vars) if set_vars else
                                "not set (expect page faults on large CPU batches)"))
  print(f"{'S':>4} {'batch':>7} {'iters':>6} {'zoo q/s':>10} {'fwd img/s':>10} "
        f"{'(call':>8} {'loop)':>8} {'ratio':>6}")
  ratios = []
  for count in [int(s) for s in args.samples.split(",")]:
    rates, batch, iterations = measure(model, variables, count, settings,
                                       args.rounds, args.images_per_round)
    forward_rate = max(rates["call"], rates["loop"])
    ratios.append(rates["zoo"] / forward_rate)
    print(f"{count:>4} {batch:>7} {iterations:>6} {rates['zoo']:>10.0f} "
          f"{forward_rate:>10.0f} {rates['call']:>8.0f} {rates['loop']:>8.0f} "
          f"{ratios[-1]:>6.2f}", flush=True)
  print(f"zoo/forward ratio: {min(ratios):.2f}")


if __name__ == "__main__":
  main()
