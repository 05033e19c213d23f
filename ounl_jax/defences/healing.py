"""Healing after unlearning: a bounded repair on the server's own records.

The idea of Jasiorski, Klonowski and Wozniak (arXiv 2507.10886): after an
unlearning update, replace what was removed with similar spare records and repair
the model on them. Over-unlearning (paper Sec. IV-V) damages far more of a class
than the submitted samples; a few gradient steps on genuine records near the
unlearned ones, with their true labels, restore the class's decision region while
the unlearned records themselves stay out of the repair set.

This project's choices:

* ``select_spares``: the spare records are each unlearned image's ``per_sample``
  nearest stored records *of the same label* in the record-matching space
  (``record_matching``: low-pass pixels), the unlearned records excluded. The
  server's held-out split is the other choice: ``heal`` takes any (images, labels).
* ``heal``: ``steps`` SGD steps (momentum 0.9 by default) on the mean cross-entropy of
  minibatches of ``batch_size`` drawn with the explicit key (without replacement
  within a step when there are enough records), gradients clipped to
  ``max_grad_norm``, only the parameters of ``scope`` (the unlearning's scope:
  ``head`` for the released first-order update) updated, the rest bit-identical.
  BatchNorm runs in inference mode, as in the unlearning update, so its statistics
  are unchanged. Its compute is bounded by ``steps * batch_size`` forward and
  backward passes, whatever the request.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ounl_jax import models
from ounl_jax import train as train_lib
from ounl_jax.defences import record_matching
from ounl_jax.unlearning import first_order


@dataclasses.dataclass(frozen=True)
class HealSettings:
  """Attributes:
    steps: gradient steps (the compute bound, with ``batch_size``).
    batch_size: records per step.
    learning_rate: SGD step size.
    momentum: SGD momentum (0: plain SGD). With the clipping, the parameters
      move at most ``steps * learning_rate * max_grad_norm / (1 - momentum)``
      (global L2), whatever the records.
    max_grad_norm: each step's gradient is clipped to this global norm.
    scope: parameters repaired: ``head`` or ``all`` (use the unlearning's scope).
  """

  steps: int = 20
  batch_size: int = 64
  learning_rate: float = 1e-2
  momentum: float = 0.9
  max_grad_norm: float = 1.0
  scope: str = "head"

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, "
                       f"{self.batch_size}.")
    if not self.learning_rate > 0 or not self.max_grad_norm > 0:
      raise ValueError("learning_rate and max_grad_norm must be > 0.")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {self.momentum}.")
    if self.scope not in first_order.SCOPES:
      raise ValueError(f"Unknown scope {self.scope!r}; choose one of "
                       f"{first_order.SCOPES}.")


def select_spares(index: record_matching.RecordIndex, images, labels, *,
                  per_sample: int = 4, exclude_ids=()) -> np.ndarray:
  """Distinct training-set ids of the records nearest the unlearned images.

  Args:
    index: the server's ``record_matching.RecordIndex``.
    images: (N, H, W, C) what was unlearned (the matched stored records, or the
      submitted images).
    labels: (N,) their labels; spares share them.
    per_sample: nearest records taken per unlearned image.
    exclude_ids: ids never taken (the unlearned records themselves).

  Returns:
    Sorted distinct ids (fewer than ``N * per_sample`` where neighbours coincide).
  """
  ids, _ = record_matching.nearest_records(index, images, labels, k=per_sample,
                                           exclude_ids=np.asarray(exclude_ids,
                                                                  np.int64))
  return np.unique(ids[ids != record_matching.NO_RECORD])


def _optimizer(settings: HealSettings) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm),
                     optax.sgd(settings.learning_rate,
                               momentum=settings.momentum or None))


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def heal(model: models.Model, variables, images, labels, key: jax.Array, *,
         settings: HealSettings = HealSettings()):
  """``settings.steps`` clipped SGD steps on (images, labels), within ``scope``.

  Args:
    model: the server's model.
    variables: the unlearned ``{'params', 'batch_stats'}``.
    images: (M, H, W, C) repair records (``select_spares``' records, or held-out
      data), M >= 1.
    labels: (M,) their true labels.
    key: draws the minibatches.
    settings: ``HealSettings``.

  Returns:
    The healed variables; parameters outside the scope and the BatchNorm
    statistics are the very same arrays.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  count = images.shape[0]
  size = settings.batch_size
  replace = count < size
  batch_stats = variables.get("batch_stats", {})
  mask = first_order.scope_mask(variables["params"], settings.scope)
  optimizer = _optimizer(settings)

  def loss(params, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x)
    return jnp.mean(train_lib.cross_entropy(logits, y))

  def step(carry, step_key):
    params, opt_state = carry
    rows = jax.random.choice(step_key, count, (size,), replace=replace)
    grads = jax.grad(loss)(params, images[rows], labels[rows])
    grads = jax.tree_util.tree_map(
        lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    params = jax.tree_util.tree_map(lambda n, p, m: n if m else p, new, params,
                                    mask)
    return (params, opt_state), None

  params = variables["params"]
  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                jax.random.split(key, settings.steps))
  return {**variables, "params": params}
