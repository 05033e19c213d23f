"""GPU smoke tests (``pytest -m gpu``): skipped with the reason on a machine without one.

Train a few steps, one first-order unlearning and a short ZOO push, all on the
accelerator, asserting where the arrays live.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.run import determinism

from ounl_jax import models
from ounl_jax import service as service_lib
from ounl_jax import train as train_lib
from ounl_jax import unlearning
from ounl_jax.attacks import pushing
from ounl_jax.attacks import zoo

pytestmark = pytest.mark.gpu


def _gpu():
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    pytest.skip(f"No GPU: JAX sees only {jax.devices()} (install jax[cuda12]).")
  return gpus[0]


def _separable_data(n=256, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.uniform(-0.1, 0.1, (n, 32, 32, 3)).astype(np.float32)
  images[np.arange(n), labels, :, 0] += 0.35  # One bright row per class.
  return np.clip(images, -0.5, 0.5), labels


def test_training_unlearning_and_pushing_run_on_the_gpu():
  device = _gpu()
  model = models.get_model("vgg3", num_classes=10, width=8)
  optimizer = train_lib.amsgrad(1e-3)
  state = train_lib.init_train_state(model.init(jax.random.key(0)), optimizer)
  step = train_lib.make_train_step(model, optimizer)
  images, labels = _separable_data()
  for epoch in range(3):
    state, metrics = train_lib.train_epoch(step, state, images, labels,
                                           jax.random.key(epoch))
  leaf = jax.tree_util.tree_leaves(state.variables)[0]
  assert device in leaf.devices()
  variables = state.variables
  new = unlearning.first_order_unlearn(model, variables, images[:32], labels[:32],
                                       jax.random.key(1),
                                       settings=unlearning.FirstOrderSettings())
  assert device in jax.tree_util.tree_leaves(new)[0].devices()
  server = service_lib.UnlearningService(
      model, jax.tree_util.tree_map(np.asarray, variables),
      service_lib.data_lib.LabelledImages(images, labels, np.arange(len(labels))),
      key=jax.random.key(0))
  settings = pushing.PushSettings(zoo=zoo.ZooSettings(max_iterations=20,
                                                      iterations_per_chunk=10))
  result = pushing.push(server.oracle(), images[:4], labels[:4], jax.random.key(2),
                        settings)
  assert result.oracle_queries > 0
  assert np.isfinite(float(metrics["loss"]))


TRAIN_TWICE = """
import sys
import jax
import numpy as np
from ounl_jax import models
from ounl_jax import train as train_lib
from tests.test_gpu import _separable_data
model = models.get_model("vgg3", num_classes=10, width=32)
optimizer = train_lib.amsgrad(1e-3)
state = train_lib.init_train_state(model.init(jax.random.key(0)), optimizer)
step = train_lib.make_train_step(model, optimizer)
images, labels = _separable_data(1024)
for epoch in range(2):
  state, _ = train_lib.train_epoch(step, state, images, labels, jax.random.key(epoch))
leaves = jax.tree_util.tree_leaves(state.variables)
np.savez(sys.argv[1], *[np.asarray(leaf) for leaf in leaves])
"""


def test_same_seed_gives_bit_identical_parameters_on_the_gpu(tmp_path):
  # Each run in its own process: XLA reads XLA_FLAGS when its backend starts.
  _gpu()
  env = {**os.environ, "XLA_FLAGS": " ".join(
      [os.environ.get("XLA_FLAGS", ""), determinism.DETERMINISTIC_GPU_FLAG]).strip()}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  runs = []
  for name in ("a", "b"):
    path = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", TRAIN_TWICE, str(path)], env=env,
                   check=True, cwd=root, timeout=300)
    with np.load(path) as saved:
      runs.append([saved[k] for k in sorted(saved.files, key=lambda k: int(k[4:]))])
  assert len(runs[0]) == len(runs[1]) > 0
  for first, second in zip(*runs):
    assert np.array_equal(first, second)
