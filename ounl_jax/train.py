"""Training the server's model: pure jitted steps, evaluation, early stopping.

Protocol (App. B; docs/protocol.md §3): Adam with AMSGrad (beta 0.9/0.999, eps 1e-7),
learning rate 1e-3 (1e-4 for CIFAR-100 in the released code), batch 64, categorical
cross-entropy, no augmentation; training stops at the lowest validation loss and the
best weights are restored.

``make_train_step`` / ``make_eval_step`` return jitted pure functions;
``train_epoch`` and ``evaluate`` are thin host loops over them (no printing: pass
``on_batch`` to drive a progress bar). ``EarlyStopping`` follows optax's
``init``/``update`` shape.

Devices (``ounl_jax/devices.py``): ``make_train_step`` is data-parallel over
``devices.sample_mesh()`` (default every device): each batch is split row-wise over
the devices, the parameters, BatchNorm statistics and optimiser state are
replicated, and XLA sums the gradients (and BatchNorm's batch moments) across
devices, so a step means the same as on one device (the global batch of 64,
docs/protocol.md §3) up to float32 summation order. The batch size must be a
multiple of the device count. On one device the step is the single-device program,
bit-identical to the code before sharding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ounl_jax import devices as devices_lib
from ounl_jax.models import Model


class TrainState(NamedTuple):
  """Everything a training step changes. ``step`` counts optimiser updates."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def amsgrad(learning_rate: float = 1e-3) -> optax.GradientTransformation:
  """Keras ``Adam(amsgrad=True)`` defaults (docs/protocol.md §3)."""
  return optax.amsgrad(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


def init_train_state(variables, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(variables["params"]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample categorical cross-entropy on integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images, labels, key, *, model: Model,
               optimizer: optax.GradientTransformation):
  """One Adam step on a batch in training mode (dropout on, BN batch statistics).

  Returns:
    ``(new_state, {'loss': mean loss, 'correct': number correct})``.
  """

  def loss_fn(params):
    logits, batch_stats = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs=jax.random.fold_in(key, state.step))
    return cross_entropy(logits, labels).mean(), (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  return (TrainState(state.step + 1, params, batch_stats, opt_state),
          {"loss": loss, "correct": correct})


def make_train_step(model: Model, optimizer: optax.GradientTransformation, *,
                    mesh=None):
  """``train_step`` jitted for ``model``/``optimizer``, donating the state.

  ``mesh``: the devices a batch is split over (default ``devices.sample_mesh()``,
  every device). On several devices the jitted step takes the images and labels
  split row-wise and the state and key replicated, and returns the state and the
  metrics replicated (``in_shardings``/``out_shardings``); host arrays are placed
  by the call itself. A state not yet on the mesh (a fresh or restored one) is
  replicated first, so that the first and every later call share one compilation
  (the jitted function is the returned function's ``jitted``). On one device it
  is the plain single-device ``jit``.
  """
  step = functools.partial(train_step, model=model, optimizer=optimizer)
  mesh = devices_lib.sample_mesh() if mesh is None else mesh
  if not devices_lib.is_sharded(mesh):
    return jax.jit(step, donate_argnums=0)
  rows, copy = devices_lib.row_sharding(mesh), devices_lib.replicated(mesh)
  jitted = jax.jit(step, donate_argnums=0, in_shardings=(copy, rows, rows, copy),
                   out_shardings=(copy, copy))

  def sharded_step(state: TrainState, images, labels, key):
    if getattr(state.step, "sharding", None) != copy:
      state = devices_lib.replicate(state, mesh)
    return jitted(state, images, labels, key)

  sharded_step.jitted = jitted
  return sharded_step


def eval_step(variables, images, labels, mask, *, model: Model):
  """Inference-mode loss sum, correct count and predictions on a (padded) batch."""
  logits = model.apply(variables, images)
  loss = jnp.sum(cross_entropy(logits, labels) * mask)
  predictions = jnp.argmax(logits, -1)
  correct = jnp.sum((predictions == labels) * mask)
  return loss, correct, predictions


def make_eval_step(model: Model):
  return jax.jit(functools.partial(eval_step, model=model))


class Evaluation(NamedTuple):
  """Loss, accuracy and per-sample predictions on a labelled set."""

  loss: float
  accuracy: float
  predictions: np.ndarray


def batches(count: int, batch_size: int):
  for start in range(0, count, batch_size):
    yield start, min(start + batch_size, count)


def evaluate(eval_step_fn, variables, images, labels, *,
             batch_size: int = 500) -> Evaluation:
  """Evaluates in fixed-size batches (the last one padded: no recompilation)."""
  count = len(labels)
  if count == 0:
    raise ValueError("Cannot evaluate on an empty set.")
  loss, correct, predictions = 0.0, 0, []
  for start, stop in batches(count, batch_size):
    n = stop - start
    pad = batch_size - n if count > batch_size else 0
    x = np.pad(images[start:stop], ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    y = np.pad(labels[start:stop], (0, pad))
    mask = np.pad(np.ones(n, np.float32), (0, pad))
    batch_loss, batch_correct, batch_pred = eval_step_fn(variables, x, y, mask)
    loss += float(batch_loss)
    correct += int(batch_correct)
    predictions.append(np.asarray(batch_pred)[:n])
  return Evaluation(loss / count, correct / count, np.concatenate(predictions))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """Accuracy of each class (NaN for a class with no sample)."""
  total = np.bincount(labels, minlength=num_classes).astype(np.float64)
  correct = np.bincount(labels[predictions == labels], minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def train_epoch(train_step_fn, state: TrainState, images: np.ndarray,
                labels: np.ndarray, key: jax.Array, *, batch_size: int = 64,
                on_batch: Callable[[int], None] | None = None):
  """One epoch over a seeded shuffle (the last incomplete batch is dropped).

  Args:
    train_step_fn: from ``make_train_step``.
    key: shuffles the data (``fold_in(key, 0)``) and drives dropout
      (``fold_in(key, 1)``, folded with the step inside the step).
    on_batch: called with the batch index after every step (progress bars).

  Returns:
    ``(state, {'loss', 'accuracy'})`` averaged over the epoch.
  """
  count = len(labels)
  num_batches = count // batch_size
  if num_batches == 0:
    raise ValueError(f"{count} training samples make no batch of {batch_size}.")
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), count))
  dropout_key = jax.random.fold_in(key, 1)
  losses, correct = [], []
  for b in range(num_batches):
    idx = order[b * batch_size:(b + 1) * batch_size]
    state, metrics = train_step_fn(state, images[idx], labels[idx], dropout_key)
    losses.append(metrics["loss"])
    correct.append(metrics["correct"])
    if on_batch is not None:
      on_batch(b)
  return state, {"loss": float(np.mean(jax.device_get(losses))),
                 "accuracy": float(np.sum(jax.device_get(correct)))
                             / (num_batches * batch_size)}


class EarlyStoppingState(NamedTuple):
  """Lowest validation loss so far, its epoch, and epochs since then."""

  best_loss: float
  best_epoch: int
  epochs_since_best: int


def early_stopping_init() -> EarlyStoppingState:
  return EarlyStoppingState(float("inf"), -1, 0)


def early_stopping_update(state: EarlyStoppingState, valid_loss: float,
                          epoch: int, *, patience: int,
                          min_delta: float = 0.0):
  """Early stopping on validation loss (App. B).

  Returns:
    ``(new_state, improved, stop)``: ``improved`` when ``valid_loss`` is the new
    lowest (keep these weights), ``stop`` after ``patience`` epochs without one.
  """
  if valid_loss < state.best_loss - min_delta:
    return EarlyStoppingState(float(valid_loss), int(epoch), 0), True, False
  waited = state.epochs_since_best + 1
  return (EarlyStoppingState(state.best_loss, state.best_epoch, waited), False,
          waited >= patience)
