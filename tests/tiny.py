"""A tiny task and model for attack tests: learnable in a second on a CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ounl_jax import models
from ounl_jax import train as train_lib

SHAPE = (8, 8, 3)
CLASSES = 4


def synthetic(count, seed, *, spread=0.3, noise=0.12):
  """Class templates (uniform in +-spread) plus Gaussian noise, clipped to range."""
  templates = np.asarray(jax.random.uniform(jax.random.key(1234),
                                            (CLASSES,) + SHAPE, minval=-spread,
                                            maxval=spread))
  labels = np.arange(count) % CLASSES
  draws = np.asarray(jax.random.normal(jax.random.key(seed), (count,) + SHAPE))
  images = np.clip(templates[labels] + noise * draws, -0.5, 0.5).astype(np.float32)
  return images, labels.astype(np.int32)


def mlp_model(hidden=32):
  """A two-layer perceptron as a ``models.Model``; both layers are the 'head'."""

  def init(key):
    k1, k2 = jax.random.split(key)
    dim = int(np.prod(SHAPE))
    return {"params": {
        "head_dense": {"kernel": jax.random.normal(k1, (dim, hidden)) / dim ** 0.5,
                       "bias": jnp.zeros((hidden,))},
        "logits": {"kernel": jax.random.normal(k2, (hidden, CLASSES)) / hidden ** 0.5,
                   "bias": jnp.zeros((CLASSES,))}}, "batch_stats": {}}

  def apply(variables, x, *, train=False, rngs=None):
    del rngs
    p = variables["params"]
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["head_dense"]["kernel"]
                    + p["head_dense"]["bias"])
    logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]
    return (logits, variables["batch_stats"]) if train else logits

  return models.Model("mlp", init, apply, SHAPE, CLASSES)


def fit(model, images, labels, steps: int, learning_rate: float = 1e-2):
  """Full-batch Adam on (images, labels) from the seed-0 init; numpy variables."""
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def run(variables):
    def step(carry, _):
      params, opt_state = carry
      loss = lambda p: train_lib.cross_entropy(
          model.apply({"params": p, "batch_stats": {}}, images), labels).mean()
      updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    params = variables["params"]
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                  length=steps)
    return {"params": params, "batch_stats": {}}

  return jax.tree_util.tree_map(np.asarray, run(model.init(jax.random.key(0))))
