"""What deterministic GPU ops cost, and whether they give bit-identical runs.

Trains VGG-3 (``--width``, the paper's 128 by default) for ``--epochs`` on
``--images`` synthetic images and unlearns 400 of them with the first-order update,
each run in its own process (XLA reads ``XLA_FLAGS`` when its backend starts):
deterministic (``--xla_gpu_deterministic_ops=true``, every experiment's default,
``--deterministic``) and not (``--nodeterministic``), alternating, ``--runs`` each.
Prints per mode the median seconds per epoch after the first (compiling excluded)
and of the unlearning step, the cost (deterministic / not), and whether the runs of
each mode gave bit-identical trained and unlearned parameters.

  python benchmarks/determinism_cost.py --json=/tmp/determinism.json
  python benchmarks/determinism_cost.py --width=8 --images=512 --epochs=2  # CPU

On a CPU the flag changes nothing (XLA's CPU kernels are deterministic anyway): the
cost is about 1 and every run identical. ``benchmarks/accelerator.sh`` runs it on a
lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.run import determinism  # pylint: disable=g-import-not-at-top,wrong-import-position

ONE_RUN = """
import json, sys, time
import jax, numpy as np
from ounl_jax import models, train as train_lib, unlearning
width, count, epochs, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
labels = rng.integers(0, 10, count).astype(np.int32)
images = rng.uniform(-0.5, 0.5, (count, 32, 32, 3)).astype(np.float32)
model = models.get_model("vgg3", num_classes=10, width=width)
optimizer = train_lib.amsgrad(1e-3)
state = train_lib.init_train_state(model.init(jax.random.key(0)), optimizer)
step = train_lib.make_train_step(model, optimizer)
seconds = []
for epoch in range(epochs):
  start = time.perf_counter()
  state, _ = train_lib.train_epoch(step, state, images, labels, jax.random.key(epoch))
  jax.block_until_ready(state)
  seconds.append(time.perf_counter() - start)
unlearn = lambda: unlearning.first_order_unlearn(
    model, state.variables, images[:400], labels[:400], jax.random.key(1),
    settings=unlearning.FirstOrderSettings())
jax.block_until_ready(unlearn())
start = time.perf_counter()
unlearned = jax.block_until_ready(unlearn())
unlearn_seconds = time.perf_counter() - start
leaves = jax.tree_util.tree_leaves((state.variables, unlearned))
np.savez(path, *[np.asarray(leaf) for leaf in leaves])
print(json.dumps({"epoch_seconds": seconds, "unlearn_seconds": unlearn_seconds,
                  "device": str(jax.devices()[0].device_kind)}))
"""


def one_run(deterministic: bool, args, path: str) -> dict:
  flags = os.environ.get("XLA_FLAGS", "").replace(determinism.DETERMINISTIC_GPU_FLAG, "")
  if deterministic:
    flags = f"{flags} {determinism.DETERMINISTIC_GPU_FLAG}"
  env = {**os.environ, "XLA_FLAGS": flags.strip(),
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run(
      [sys.executable, "-c", ONE_RUN, str(args.width), str(args.images),
       str(args.epochs), path], env=env, cwd=ROOT, check=True, capture_output=True,
      text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def identical(paths: list[str]) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  loaded = [np.load(p) for p in paths]
  names = loaded[0].files
  return all(f.files == names and all(np.array_equal(loaded[0][n], f[n]) for n in names)
             for f in loaded[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--images", type=int, default=10_000)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if args.epochs < 2 or args.runs < 2 or args.images < 400:
    parser.error("--epochs and --runs must be at least 2 (the first epoch compiles; "
                 "identity needs two runs) and --images at least 400 (the unlearned set).")
  modes = {"deterministic": True, "nondeterministic": False}
  found = {name: {"epoch_seconds": [], "unlearn_seconds": [], "paths": []}
           for name in modes}
  with tempfile.TemporaryDirectory() as scratch:
    for run in range(args.runs):
      for name, deterministic in modes.items():
        path = os.path.join(scratch, f"{name}-{run}.npz")
        report = one_run(deterministic, args, path)
        found[name]["epoch_seconds"] += report["epoch_seconds"][1:]
        found[name]["unlearn_seconds"].append(report["unlearn_seconds"])
        found[name]["paths"].append(path)
        print(f"{name} run {run}: epochs {[round(s, 2) for s in report['epoch_seconds']]}"
              f" s, unlearning {report['unlearn_seconds']:.3f} s", flush=True)
    summary = {"device": report["device"], "width": args.width, "images": args.images,
               "epochs": args.epochs, "runs": args.runs}
    for name in modes:
      summary[name] = {
          "median_epoch_seconds": statistics.median(found[name]["epoch_seconds"]),
          "median_unlearn_seconds": statistics.median(found[name]["unlearn_seconds"]),
          "bit_identical": identical(found[name]["paths"])}
  det, non = summary["deterministic"], summary["nondeterministic"]
  summary["epoch_cost"] = det["median_epoch_seconds"] / non["median_epoch_seconds"]
  summary["unlearn_cost"] = det["median_unlearn_seconds"] / non["median_unlearn_seconds"]
  print(f"{summary['device']}, VGG-3 width {args.width}, {args.images} images: "
        f"epoch {det['median_epoch_seconds']:.2f} s deterministic vs "
        f"{non['median_epoch_seconds']:.2f} s (cost {summary['epoch_cost']:.2f}x), "
        f"unlearning cost {summary['unlearn_cost']:.2f}x; bit-identical runs: "
        f"deterministic {det['bit_identical']}, not {non['bit_identical']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
