"""Per-class damage bound: scale the unlearning update instead of refusing it.

A defence the paper does not evaluate; it refines its Sec. VII suggestion to
"monitor the run-time model performance" (here ``utility``, which refuses). Given
the parameters before (theta0) and after (theta1) an unlearning update, the server
applies only the step

  theta(alpha) = theta0 + alpha (theta1 - theta0),   alpha in [0, 1],

with the largest alpha whose held-out accuracy drop stays, for every class k, within
an envelope fitted on honest requests:

  drop_k(alpha) = acc_k(baseline) - acc_k(theta(alpha)) <= envelope_k.

This project's choices:

* The envelope (``fit_envelope``) is, per class, a high quantile (0.95) of the drops
  measured on honest requests plus a margin (2 points), never below 0.
* Accuracy is not monotone in alpha, so the search cannot be a plain bisection:
  ``num_alphas`` evenly spaced alphas are all evaluated (``lax.map``, one model in
  memory at a time), the largest one within the envelope is kept, then
  ``refine_steps`` bisection steps between it and the next grid alpha move it up
  only to alphas that were themselves checked. The returned alpha was always
  evaluated on the held-out data and is within the envelope there (alpha = 0 is:
  its drop is 0 against the default baseline).
* The comparison is done in correct-answer counts (``correct_k >= required_k``,
  ``required_k = ceil(n_k (acc_k(baseline) - envelope_k))``), so the guarantee holds
  exactly, with no float rounding at the boundary.
* The baseline is theta0 (a per-request bound) unless ``baseline_accuracy`` is
  given, e.g. the clean model's, for a cumulative bound that splitting an attack
  into many requests cannot slip under; then even alpha = 0 may be outside it, and
  the result says so (``within=False``, alpha = 0).
* Every variable (parameters and BatchNorm statistics) is interpolated; the
  unlearning methods here leave BatchNorm statistics unchanged, so only the
  parameters move.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import models


@dataclasses.dataclass(frozen=True)
class DamageBoundSettings:
  """Attributes:
    quantile: per-class quantile of the honest drops the envelope starts from.
    margin: added to that quantile (absolute accuracy).
    num_alphas: evenly spaced alphas in [0, 1] evaluated (>= 2: 0 and 1).
    refine_steps: bisection steps above the best grid alpha (0: grid only).
    batch_size: held-out images per forward pass (memory).
  """

  quantile: float = 0.95
  margin: float = 0.02
  num_alphas: int = 11
  refine_steps: int = 4
  batch_size: int = 500

  def __post_init__(self):
    if not 0.0 <= self.quantile <= 1.0:
      raise ValueError(f"quantile must be in [0, 1], got {self.quantile}.")
    if self.margin < 0:
      raise ValueError(f"margin must be >= 0, got {self.margin}.")
    if self.num_alphas < 2:
      raise ValueError(f"num_alphas must be >= 2, got {self.num_alphas}.")
    if self.refine_steps < 0 or self.batch_size < 1:
      raise ValueError("refine_steps must be >= 0 and batch_size >= 1.")


class BoundResult(NamedTuple):
  """The scaled update.

  Attributes:
    alpha: the step taken along theta1 - theta0.
    variables: theta(alpha).
    per_class_accuracy: (K,) held-out accuracy of theta(alpha) (NaN: no sample).
    drops: (K,) baseline accuracy minus that (NaN: no sample).
    within: every drop is within the envelope (False only when even alpha = 0 is
      outside a cumulative baseline).
  """

  alpha: float
  variables: Any
  per_class_accuracy: np.ndarray
  drops: np.ndarray
  within: bool


def interpolate(variables0, variables1, alpha):
  """theta0 + alpha (theta1 - theta0), leaf by leaf (theta0 exactly at alpha 0)."""
  return jax.tree_util.tree_map(
      lambda a, b: a + jnp.asarray(alpha, a.dtype) * (b - a), variables0,
      variables1)


def _batched(images, labels, batch_size):
  """(B, S, ...) zero-padded batches and a validity mask."""
  count = len(labels)
  size = max(1, min(batch_size, count))
  pad = -count % size
  images = np.pad(np.asarray(images, np.float32),
                  ((0, pad),) + ((0, 0),) * (np.ndim(images) - 1))
  labels = np.pad(np.asarray(labels, np.int32), (0, pad))
  valid = np.arange(count + pad) < count
  shape = (-1, size)
  return (images.reshape(shape + images.shape[1:]), labels.reshape(shape),
          valid.reshape(shape))


def _correct_counts(apply, variables, images, labels, valid, num_classes):
  """(K,) correct predictions per class over the batches (inference mode)."""

  def batch(args):
    x, y, v = args
    correct = (jnp.argmax(apply(variables, x), axis=-1) == y) & v
    return jnp.sum(jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
                   * correct[:, None], axis=0)

  return jnp.sum(jax.lax.map(batch, (images, labels, valid)), axis=0)


@functools.partial(jax.jit, static_argnames=("model",))
def _counts_fn(model: models.Model, variables, images, labels, valid):
  return _correct_counts(model.apply, variables, images, labels, valid,
                         model.num_classes)


def class_counts(model: models.Model, variables, images, labels, *,
                 batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(correct per class, samples per class) of ``variables`` on (images, labels)."""
  batches = _batched(images, labels, batch_size)
  correct = np.asarray(_counts_fn(model, variables, *batches), np.int64)
  return correct, np.bincount(np.asarray(labels, np.int64),
                              minlength=model.num_classes)


def _accuracy(correct, totals):
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, correct / np.maximum(totals, 1), np.nan)


def class_drops(model: models.Model, variables0, variables1, images, labels, *,
                batch_size: int = 500) -> np.ndarray:
  """(K,) per-class held-out accuracy of variables0 minus that of variables1 (NaN
  where the class has no sample): one honest request's row for ``fit_envelope``."""
  c0, totals = class_counts(model, variables0, images, labels,
                            batch_size=batch_size)
  c1, _ = class_counts(model, variables1, images, labels, batch_size=batch_size)
  return _accuracy(c0, totals) - _accuracy(c1, totals)


def fit_envelope(honest_drops, settings: DamageBoundSettings = DamageBoundSettings()
                 ) -> np.ndarray:
  """(K,) allowed drop per class: the ``quantile`` of the honest requests' drops
  plus ``margin``, at least 0 (a class never measured gets 1: no bound).

  Args:
    honest_drops: (R, K) ``class_drops`` of R honest requests.
  """
  drops = np.asarray(honest_drops, np.float64)
  if drops.ndim != 2 or not len(drops):
    raise ValueError(f"honest_drops must be (requests, classes), got {drops.shape}.")
  measured = ~np.isnan(drops).all(axis=0)
  quantiles = np.zeros(drops.shape[1])
  if measured.any():
    quantiles[measured] = np.nanquantile(drops[:, measured], settings.quantile,
                                         axis=0, method="higher")
  return np.where(measured, np.maximum(quantiles + settings.margin, 0.0), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "num_alphas",
                                             "refine_steps"))
def _search(model: models.Model, variables0, variables1, images, labels, valid,
            required, *, num_alphas: int, refine_steps: int):
  """(alpha, correct counts at alpha): largest checked alpha with correct >= required."""

  def counts(alpha):
    return _correct_counts(model.apply, interpolate(variables0, variables1, alpha),
                           images, labels, valid, model.num_classes)

  def ok(c):
    return jnp.all(c >= required)

  grid = jnp.linspace(0.0, 1.0, num_alphas)
  grid_counts = jax.lax.map(counts, grid)
  feasible = jax.vmap(ok)(grid_counts)
  # Largest feasible grid index (0 when none is: reported as not within).
  best = jnp.max(jnp.where(feasible, jnp.arange(num_alphas), 0))
  lo, lo_counts = grid[best], grid_counts[best]
  hi = grid[jnp.minimum(best + 1, num_alphas - 1)]

  def refine(_, carry):
    lo, hi, lo_counts = carry
    mid = 0.5 * (lo + hi)
    c = counts(mid)
    good = ok(c)
    return (jnp.where(good, mid, lo), jnp.where(good, hi, mid),
            jnp.where(good, c, lo_counts))

  lo, _, lo_counts = jax.lax.fori_loop(0, refine_steps, refine, (lo, hi, lo_counts))
  return lo, lo_counts


def bound_update(model: models.Model, variables0, variables1, images, labels,
                 envelope, *, settings: DamageBoundSettings = DamageBoundSettings(),
                 baseline_accuracy=None) -> BoundResult:
  """The largest checked step along theta1 - theta0 within the per-class envelope.

  Args:
    model: the server's model.
    variables0: theta0, before the unlearning update.
    variables1: theta1, after it (same tree).
    images, labels: the server's held-out split (never the one it reports on).
    envelope: (K,) allowed drops (``fit_envelope``).
    settings: ``DamageBoundSettings`` (grid, refinement, batch).
    baseline_accuracy: (K,) accuracies the drops are measured from; default
      theta0's on (images, labels).

  Returns:
    ``BoundResult``; its drops are within ``envelope`` on (images, labels) whenever
    ``within`` (always, with the default baseline).
  """
  envelope = np.asarray(envelope, np.float64)
  if envelope.shape != (model.num_classes,):
    raise ValueError(f"envelope of shape {envelope.shape}; expected "
                     f"({model.num_classes},).")
  if (envelope < 0).any():
    raise ValueError("envelope must be >= 0.")
  batches = _batched(images, labels, settings.batch_size)
  totals = np.bincount(np.asarray(labels, np.int64), minlength=model.num_classes)
  if baseline_accuracy is None:
    c0 = np.asarray(_counts_fn(model, variables0, *batches), np.int64)
    baseline = _accuracy(c0, totals)
  else:
    baseline = np.asarray(baseline_accuracy, np.float64)
  # correct_k / n_k >= baseline_k - envelope_k, in counts (1e-9: float slack of
  # a baseline that was itself a count ratio).
  required = np.where(totals > 0, np.ceil(totals * (np.nan_to_num(baseline)
                                                    - envelope) - 1e-9), 0)
  required = np.maximum(required, 0).astype(np.int32)
  alpha, _ = _search(model, variables0, variables1, *batches,
                     jnp.asarray(required), num_alphas=settings.num_alphas,
                     refine_steps=settings.refine_steps)
  alpha = float(alpha)
  # The model returned is evaluated as returned (the search's fused arithmetic
  # may differ in the last bit); should it fall outside, theta0 itself is kept.
  variables = _interpolate_fn(variables0, variables1, alpha) if alpha > 0 else (
      variables0)
  counts = np.asarray(_counts_fn(model, variables, *batches), np.int64)
  if alpha > 0 and not np.all(counts >= required):
    alpha, variables = 0.0, variables0
    counts = np.asarray(_counts_fn(model, variables, *batches), np.int64)
  accuracy = _accuracy(counts, totals)
  return BoundResult(alpha, variables, accuracy, baseline - accuracy,
                     bool(np.all(counts >= required)))


_interpolate_fn = jax.jit(interpolate)
