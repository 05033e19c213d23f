"""Fine-tune unlearning with random wrong labels (paper App. C; docs/protocol.md §6).

Each submitted sample is relabelled uniformly at random among the classes other than
its submitted label (seeded; docs/protocol.md §4), then the model is trained on the
relabelled set with plain SGD (lr 0.01, no momentum), 1 epoch, batch 64, in training
mode (dropout on, BatchNorm batch statistics, moving averages updated), all
parameters. As in Keras ``fit``, the data is reshuffled every epoch and the last,
partial batch is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from ounl_jax import models
from ounl_jax import train as train_lib


@dataclasses.dataclass(frozen=True)
class FineTuneSettings:
  """Settings of fine-tune unlearning (docs/protocol.md §6).

  Attributes:
    learning_rate: SGD learning rate (released code 0.01).
    epochs: passes over the relabelled set (released code 1; its unused config
      lists 1 and 10).
    batch_size: SGD batch (released code 64).
  """

  learning_rate: float = 0.01
  epochs: int = 1
  batch_size: int = 64

  def __post_init__(self):
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} "
                       f"and {self.batch_size}.")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"learning_rate must be a positive finite number, got "
                       f"{self.learning_rate}.")


def random_wrong_labels(key: jax.Array, labels: jax.Array,
                        num_classes: int) -> jax.Array:
  """For each label, a class drawn uniformly from the other ``num_classes - 1``."""
  offsets = jax.random.randint(key, labels.shape, 1, num_classes)
  return (labels + offsets) % num_classes


def fine_tune_labels(key: jax.Array, labels: jax.Array,
                     num_classes: int) -> jax.Array:
  """The labels ``fine_tune_unlearn(..., key)`` trains on (first half of the key)."""
  return random_wrong_labels(jax.random.split(key)[0], labels, num_classes)


def sgd_step(variables, images, labels, dropout_key, *, apply, learning_rate):
  """One plain-SGD step on the mean cross-entropy, in training mode."""

  def loss_fn(params):
    logits, batch_stats = apply({"params": params,
                                 "batch_stats": variables["batch_stats"]},
                                images, train=True, rngs=dropout_key)
    return train_lib.cross_entropy(logits, labels).mean(), batch_stats

  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(variables["params"])
  params = optax.apply_updates(
      variables["params"],
      jax.tree_util.tree_map(lambda g: -learning_rate * g, grads))
  return {**variables, "params": params, "batch_stats": batch_stats}


def fine_tune_epoch(variables, images, labels, key, *, apply,
                    settings: FineTuneSettings):
  """One epoch over a seeded shuffle: full batches by ``lax.scan``, then the rest."""
  count = images.shape[0]
  size = settings.batch_size
  num_full = count // size
  order = jax.random.permutation(jax.random.fold_in(key, 0), count)
  dropout_key = jax.random.fold_in(key, 1)
  step = functools.partial(sgd_step, apply=apply,
                           learning_rate=settings.learning_rate)

  def full_batch(carry, b):
    idx = jax.lax.dynamic_slice_in_dim(order, b * size, size)
    new = step(carry, images[idx], labels[idx], jax.random.fold_in(dropout_key, b))
    return new, None

  if num_full:
    variables, _ = jax.lax.scan(full_batch, variables, jnp.arange(num_full))
  if count % size:
    idx = order[num_full * size:]
    variables = step(variables, images[idx], labels[idx],
                     jax.random.fold_in(dropout_key, num_full))
  return variables


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def fine_tune_unlearn(model: models.Model, variables, images, labels,
                      key: jax.Array, *, settings: FineTuneSettings):
  """Unlearns (images, labels) by fine-tuning on random wrong labels.

  Args:
    model: the server's model (``apply(..., train=True, rngs=key)`` returns
      ``(logits, new_batch_stats)``).
    variables: ``{'params', 'batch_stats'}``.
    images: submitted images (N, H, W, C) in [-0.5, 0.5].
    labels: submitted labels (N,); each is replaced by a random other class.
    key: split into the relabelling key and one key per epoch (shuffle, dropout).
    settings: ``FineTuneSettings``.

  Returns:
    The fine-tuned variables (all parameters and BatchNorm statistics updated).
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  wrong_labels = fine_tune_labels(key, labels, model.num_classes)
  train_key = jax.random.split(key)[1]
  epoch = functools.partial(fine_tune_epoch, images=images, labels=wrong_labels,
                            apply=model.apply, settings=settings)

  def run_epoch(carry, e):
    return epoch(carry, key=jax.random.fold_in(train_key, e)), None

  variables, _ = jax.lax.scan(run_epoch, dict(variables),
                              jnp.arange(settings.epochs))
  return variables
