"""Warnecke et al.'s first-order unlearning update (paper App. A, Eq. 12-13).

The server overwrites the submitted samples Z with "irrelevant" replacements Z_hat::

  theta_u = theta - tau * d,   d = sum_i grad_theta [ L(z_hat_i) - L(z_i) ]   (Eq. 13)

with z_i = (submitted image x_i, submitted label y_i) and z_hat_i = (replacement
image, the same label y_i) (docs/protocol.md §5). The released code's settings are the
defaults: ``tau=2e-4``, one step, per-sample losses **summed** (so the step grows with
the number of samples), only the classifier head updated (``models.head_mask``, "the
last 6 trainable tensors"), BatchNorm in inference mode (running statistics used and
left unchanged, dropout off) and one uniform-noise image replicated for every z_hat.
Warnecke's own CIFAR setting is ``tau=2e-5`` (docs/protocol.md §7).

``reference_code=True`` reproduces what the released code computes rather than
Eq. 13: its noise forward pass runs outside the gradient tape for every *full* batch
of 256 samples, so L(z_hat) contributes only for the samples of the last, partial
batch (docs/protocol.md §5 "Likely bug", §16.2). For CIFAR-10 that leaves the
noise term on 144 of 400 and 208 of 2,000 samples; with a multiple of 256 samples it
is pure gradient ascent. The default (``False``) follows the paper's formula.
``reference_batch_size`` sets that gradient batch, so that the released share of
noise terms (144 / 400 = 36% at the paper's 10%) can be reproduced at any N
(``noise_term_count``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from ounl_jax import models
from ounl_jax import train as train_lib

REPLACEMENTS = ("noise", "black", "white", "none")
REDUCTIONS = ("sum", "mean")
SCOPES = ("head", "all")
# Gradient batch of the released code; its noise term is lost on full batches.
REFERENCE_BATCH_SIZE = 256
WARNECKE_CIFAR_TAU = 2e-5


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}.")


@dataclasses.dataclass(frozen=True)
class FirstOrderSettings:
  """Settings of the first-order update (docs/protocol.md §5 and §7).

  Attributes:
    tau: unlearning rate (released code 2e-4; Warnecke's CIFAR value 2e-5).
    steps: number of updates, each with gradients at the current parameters.
    reduction: ``sum`` (the released code) or ``mean`` of the per-sample gradients.
    scope: ``head`` (the last dense/BN/output tensors, as the released code) or
      ``all`` trainable parameters.
    replacement: the irrelevant samples z_hat: ``noise`` (uniform integer pixels
      0..255 mapped to [-0.5, 0.5], the released default), ``black`` (-0.5),
      ``white`` (+0.5), or ``none`` (no z_hat: gradient ascent on Z only).
    shared_noise: one noise image replicated for every sample (the released code)
      instead of one image per sample (the paper's "images of random noise").
    reference_code: reproduce the released code's dropped noise term on full
      gradient batches (docs/protocol.md §5) instead of Eq. 13 as written.
    reference_batch_size: the released code's gradient batch (256): with
      ``reference_code``, samples in full batches of this size lose their noise
      term. Smaller values give the released share of noise terms at smaller N.
    batch_size: samples per gradient batch; only bounds memory (the result is
      the same up to float summation order).
  """

  tau: float = 2e-4
  steps: int = 1
  reduction: str = "sum"
  scope: str = "head"
  replacement: str = "noise"
  shared_noise: bool = True
  reference_code: bool = False
  reference_batch_size: int = REFERENCE_BATCH_SIZE
  batch_size: int = REFERENCE_BATCH_SIZE

  def __post_init__(self):
    _check_choice("reduction", self.reduction, REDUCTIONS)
    _check_choice("scope", self.scope, SCOPES)
    _check_choice("replacement", self.replacement, REPLACEMENTS)
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}.")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
    if self.reference_batch_size < 1:
      raise ValueError("reference_batch_size must be >= 1, got "
                       f"{self.reference_batch_size}.")
    if not self.tau > 0:
      raise ValueError(f"tau must be > 0, got {self.tau} (a negative tau reverses "
                       "the update, teaching the samples instead of unlearning "
                       "them).")
    if not math.isfinite(self.tau):
      raise ValueError(f"tau must be finite, got {self.tau}.")


def distinct_replacements(key: jax.Array, images: jax.Array, *, replacement: str,
                          shared_noise: bool = True) -> jax.Array | None:
  """The distinct irrelevant images: (1, H, W, C) when one image serves every sample.

  Returns:
    One image for ``black``, ``white`` and shared ``noise``; (N, H, W, C) for
    per-sample noise; None for ``none`` (no z_hat).
  """
  _check_choice("replacement", replacement, REPLACEMENTS)
  if replacement == "none":
    return None
  one = (1,) + tuple(images.shape[1:])
  if replacement == "noise":
    pixels = jax.random.randint(key, one if shared_noise else images.shape, 0, 256)
    return pixels.astype(jnp.float32) / 255.0 - 0.5
  return jnp.full(one, -0.5 if replacement == "black" else 0.5, jnp.float32)


def replacement_images(key: jax.Array, images: jax.Array, *, replacement: str,
                       shared_noise: bool = True) -> jax.Array:
  """The irrelevant images z_hat, one per submitted image (docs/protocol.md §5).

  Args:
    key: draws the noise (unused for the other replacements).
    images: the submitted images (N, H, W, C), for the shape only.
    replacement: ``noise`` (uniform integer pixels 0..255 mapped as x/255 - 0.5),
      ``black``, ``white`` or ``none`` (zeros; their loss is weighted out by
      ``replacement_weights``).
    shared_noise: one noise image replicated for all samples (the released code).

  Returns:
    Images (N, H, W, C) in [-0.5, 0.5].
  """
  distinct = distinct_replacements(key, images, replacement=replacement,
                                   shared_noise=shared_noise)
  if distinct is None:
    return jnp.zeros(images.shape, jnp.float32)
  return jnp.broadcast_to(distinct, images.shape)


def replacement_weights(count: int, *, replacement: str, reference_code: bool,
                        reference_batch_size: int = REFERENCE_BATCH_SIZE
                        ) -> jax.Array:
  """Weight of each L(z_hat_i) in d: 1 in Eq. 13, 0 where the code drops it.

  With ``reference_code`` only the samples of the last, partial batch of
  ``reference_batch_size`` keep their noise term (docs/protocol.md §5).
  """
  if replacement == "none":
    return jnp.zeros((count,), jnp.float32)
  if not reference_code:
    return jnp.ones((count,), jnp.float32)
  first_partial = (count // reference_batch_size) * reference_batch_size
  return (jnp.arange(count) >= first_partial).astype(jnp.float32)


def noise_term_count(count: int, settings: FirstOrderSettings) -> int:
  """How many of ``count`` submitted samples keep their L(z_hat) term in d.

  All of them in Eq. 13; with ``reference_code`` only the last, partial gradient
  batch: ``count mod reference_batch_size`` (docs/protocol.md §5).
  """
  if settings.replacement == "none":
    return 0
  if not settings.reference_code:
    return count
  return count % settings.reference_batch_size


def scope_mask(params: Any, scope: str) -> Any:
  """A pytree of Python booleans: True on the parameters the update changes."""
  _check_choice("scope", scope, SCOPES)
  if scope == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  mask = models.head_mask(params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError(f"scope='head' found none of the head layers "
                     f"{models.HEAD_LAYERS} in the parameters ({', '.join(params)}); "
                     "use scope='all' for this model.")
  return mask


def _pad_to_batches(array: jax.Array, batch_size: int) -> jax.Array:
  """(N, ...) -> (num_batches, batch_size, ...), zero-padded."""
  count = array.shape[0]
  num_batches = -(-count // batch_size)
  pad = num_batches * batch_size - count
  array = jnp.pad(array, ((0, pad),) + ((0, 0),) * (array.ndim - 1))
  return array.reshape((num_batches, batch_size) + array.shape[1:])


def loss_difference(params, batch_stats, images, labels, replacement_weight,
                    sample_weight, replacements, *, apply) -> jax.Array:
  """sum_i [w_hat_i L(z_hat_i) - w_i L(z_i)] in inference mode (Eq. 13's summand).

  ``replacements`` is None (no z_hat), one image shared by every z_hat_i (one
  forward pass: inference mode makes each sample's loss independent of the
  others), or one image per sample.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  total = -jnp.sum(sample_weight * train_lib.cross_entropy(apply(variables, images),
                                                           labels))
  if replacements is None:
    return total
  logits_hat = apply(variables, replacements)
  logits_hat = jnp.broadcast_to(logits_hat, (labels.shape[0], logits_hat.shape[-1]))
  return total + jnp.sum(replacement_weight
                         * train_lib.cross_entropy(logits_hat, labels))


def unlearning_direction(params, batch_stats, images, labels, replacements,
                         replacement_weight, *, apply, settings: FirstOrderSettings):
  """d = sum_i grad[w_hat_i L(z_hat_i) - L(z_i)] (divided by N for ``mean``).

  Accumulated over batches of ``settings.batch_size`` with ``lax.scan``.
  ``replacements`` as returned by ``distinct_replacements``.
  """
  count = images.shape[0]
  size = min(settings.batch_size, count)
  shared = replacements is None or replacements.shape[0] == 1
  per_sample = [images, labels, replacement_weight, jnp.ones((count,), jnp.float32)]
  if not shared:
    per_sample.append(replacements)
  batched = [_pad_to_batches(a, size) for a in per_sample]
  grad_fn = jax.grad(functools.partial(loss_difference, apply=apply))

  def add_batch(total, batch):
    z_hat = replacements if shared else batch[-1]
    grads = grad_fn(params, batch_stats, *batch[:4], z_hat)
    return jax.tree_util.tree_map(jnp.add, total, grads), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  direction, _ = jax.lax.scan(add_batch, zeros, batched)
  if settings.reduction == "mean":
    direction = jax.tree_util.tree_map(lambda g: g / count, direction)
  return direction


def apply_direction(params, direction, mask, tau: float):
  """theta - tau * d on the masked parameters; the others are returned as is."""
  return jax.tree_util.tree_map(
      lambda p, d, m: p - jnp.asarray(tau, p.dtype) * d if m else p,
      params, direction, mask)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def first_order_unlearn(model: models.Model, variables, images, labels,
                        key: jax.Array, *, settings: FirstOrderSettings):
  """Unlearns (images, labels) with Warnecke's first-order update (Eq. 13).

  Example (a tiny model):

  >>> import jax, numpy as np
  >>> from ounl_jax import models
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> x_u, y_u = np.zeros((2, 8, 8, 3), np.float32), np.array([0, 1])
  >>> settings = FirstOrderSettings(tau=2e-4)
  >>> new_variables = first_order_unlearn(model, variables, x_u, y_u,
  ...                                     jax.random.key(88), settings=settings)
  >>> (jax.tree_util.tree_structure(new_variables)
  ...  == jax.tree_util.tree_structure(variables))
  True

  Args:
    model: the server's model (``apply(variables, x)`` returns logits).
    variables: ``{'params', 'batch_stats'}``; BatchNorm statistics are unchanged.
    images: submitted images (N, H, W, C) in [-0.5, 0.5].
    labels: submitted labels (N,), integers.
    key: draws the noise replacements (one draw, reused by every step).
    settings: ``FirstOrderSettings``.

  Returns:
    The unlearned variables; parameters outside ``settings.scope`` are the very
    same arrays (bit-identical).
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  replacements = distinct_replacements(key, images,
                                      replacement=settings.replacement,
                                      shared_noise=settings.shared_noise)
  weights = replacement_weights(images.shape[0], replacement=settings.replacement,
                                reference_code=settings.reference_code,
                                reference_batch_size=settings.reference_batch_size)
  batch_stats = variables.get("batch_stats", {})
  mask = scope_mask(variables["params"], settings.scope)

  def step(_, params):
    direction = unlearning_direction(params, batch_stats, images, labels,
                                     replacements, weights, apply=model.apply,
                                     settings=settings)
    return apply_direction(params, direction, mask, settings.tau)

  params = jax.lax.fori_loop(0, settings.steps, step, variables["params"])
  return {**variables, "params": params}
