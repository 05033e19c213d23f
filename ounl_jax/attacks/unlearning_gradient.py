"""Gradient through unlearning: a white-box upper bound on over-unlearning.

Huang et al. 2024 ("Unlearn and Burn: Adversarial Machine Unlearning Requests
Destroy Model Accuracy") optimise the submitted samples through the server's
unlearning update itself. Here the update is Warnecke et al.'s first-order step
(paper App. A, Eq. 13; ``ounl_jax.unlearning.first_order``)::

  theta_u(X') = theta - tau * sum_i grad_theta [ L(z_hat_i) - L((x'_i, y_i)) ]

and the attacker solves, by projected gradient ascent with ``jax.grad`` through the
(jitted) update,

  max_{X'}  J(theta_u(X'))   s.t.  ||x'_i - x_i||_2 <= max_l2,  x'_i in [-0.5, 0.5]^d

with the submitted labels y_i = the original class A (docs/protocol.md §9,
``original``) and

* untargeted: J = mean cross-entropy of the attacker's own held-out class-A images
  (not the server's test set) under theta_u;
* targeted: J = mean log p_B(theta_u) on those images (preference for class B).

The server's noise replacements z_hat are drawn from a key the attacker does not
know: every ascent step draws its own (``fold_in(key, step)``), so the ascent
maximises J in expectation over the noise. The same pixel bound as Pushing applies
(``max_l2`` 20, docs/protocol.md §8.1).

White-box: the attacker differentiates the server's model, so this module, unlike
the black-box attacks, takes a model and its variables. Its **transfer** variant is
black-box: the attacker trains a surrogate on its own data (``train_surrogate``),
optimises against the surrogate and submits to the real server.

Structure (optax's shape): ``unlearning_gradient_init`` builds a
``UnlearningGradientState`` (images, optimiser state, step counter, objective);
``unlearning_gradient_step`` is one projected ascent step; ``unlearning_gradient_run``
runs ``settings.steps`` of them in one jitted ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ounl_jax import models
from ounl_jax import train as train_lib
from ounl_jax.attacks import pushing
from ounl_jax.unlearning import first_order

OPTIMIZERS = ("adam", "sign")
PIXEL_MIN, PIXEL_MAX = -0.5, 0.5


@dataclasses.dataclass(frozen=True)
class UnlearningGradientSettings:
  """Settings of the gradient-through-unlearning attack.

  Attributes:
    steps: projected ascent steps (a fixed number).
    optimizer: ``adam`` (Adam on the pixels) or ``sign`` (signed steps, PGD).
    learning_rate: Adam's step size, or the per-pixel signed step, in [-0.5, 0.5]
      pixel units.
    max_l2: per-sample bound on ``||x' - x||_2`` (20, as Pushing).
    target_class: class B for the targeted objective, None for untargeted.
    unlearning: the server's first-order settings the attacker assumes (the
      released defaults, Eq. 13).
  """

  steps: int = 50
  optimizer: str = "adam"
  learning_rate: float = 0.01
  max_l2: float = 20.0
  target_class: int | None = None
  unlearning: first_order.FirstOrderSettings = dataclasses.field(
      default_factory=first_order.FirstOrderSettings)

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of "
                       f"{OPTIMIZERS}.")
    if self.steps < 0:
      raise ValueError(f"steps must be >= 0, got {self.steps}.")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if not self.max_l2 > 0:
      raise ValueError(f"max_l2 must be > 0, got {self.max_l2}.")

  @property
  def targeted(self) -> bool:
    return self.target_class is not None

  def transformation(self) -> optax.GradientTransformation:
    """The ascent's optimiser (it descends on -J)."""
    if self.optimizer == "adam":
      return optax.adam(self.learning_rate)
    return optax.chain(optax.scale_by_sign(), optax.scale(-self.learning_rate))


def attack_objective(images, labels, variables, held_out_images, held_out_labels,
                     key, *, model: models.Model,
                     settings: UnlearningGradientSettings) -> jax.Array:
  """J(theta_u(X')): the attacker's objective after the first-order update (Eq. 13).

  Args:
    images: the submission X' (N, H, W, C); labels: (N,) submitted labels.
    variables: the server's model (or the surrogate) before unlearning.
    held_out_images, held_out_labels: the attacker's own class-A images.
    key: the server's noise draw for z_hat.

  Returns:
    Untargeted: mean cross-entropy of the held-out images; targeted: their mean
    log-probability of class B. Larger is a stronger attack.
  """
  unlearned = first_order.first_order_unlearn(model, variables, images, labels, key,
                                              settings=settings.unlearning)
  logits = model.apply(unlearned, held_out_images)
  if settings.targeted:
    return jnp.mean(jax.nn.log_softmax(logits)[:, settings.target_class])
  return jnp.mean(train_lib.cross_entropy(logits, held_out_labels))


def project(images, original, max_l2: float):
  """Onto the L2 ball of radius ``max_l2`` around x, then the pixel box.

  Clipping to the box (which holds x) only shortens ``x' - x`` coordinate-wise, so
  the result satisfies both constraints.
  """
  delta = images - original
  norm = jnp.sqrt(jnp.sum(delta ** 2, axis=tuple(range(1, delta.ndim)),
                          keepdims=True))
  delta = delta * jnp.minimum(1.0, max_l2 / jnp.maximum(norm, 1e-12))
  return jnp.clip(original + delta, PIXEL_MIN, PIXEL_MAX)


class UnlearningGradientState(NamedTuple):
  """``step``: ascent steps taken; ``images``: the current submission X';
  ``opt_state``: the optimiser's state; ``objective``: J at the previous iterate."""

  step: jax.Array
  images: jax.Array
  opt_state: Any
  objective: jax.Array


def unlearning_gradient_init(images,
                             settings: UnlearningGradientSettings
                             ) -> UnlearningGradientState:
  """Starts at the user's clean samples."""
  images = jnp.asarray(images, jnp.float32)
  return UnlearningGradientState(jnp.zeros((), jnp.int32), images,
                                 settings.transformation().init(images),
                                 jnp.full((), jnp.nan, jnp.float32))


def unlearning_gradient_step(state: UnlearningGradientState, original, labels,
                             variables, held_out_images, held_out_labels, key, *,
                             model: models.Model,
                             settings: UnlearningGradientSettings
                             ) -> UnlearningGradientState:
  """One projected ascent step on J, with the server noise ``fold_in(key, step)``."""
  objective, gradient = jax.value_and_grad(attack_objective)(
      state.images, labels, variables, held_out_images, held_out_labels,
      jax.random.fold_in(key, state.step), model=model, settings=settings)
  # J's gradient scales with tau and can sit far below Adam's epsilon: rescale it
  # to unit RMS (Adam and signed steps are otherwise invariant to its scale).
  gradient = gradient / jnp.maximum(jnp.sqrt(jnp.mean(gradient ** 2)), 1e-30)
  updates, opt_state = settings.transformation().update(-gradient, state.opt_state,
                                                        state.images)
  images = project(optax.apply_updates(state.images, updates), original,
                   settings.max_l2)
  return UnlearningGradientState(state.step + 1, images, opt_state, objective)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def unlearning_gradient_run(original, labels, variables, held_out_images,
                            held_out_labels, key, *, model: models.Model,
                            settings: UnlearningGradientSettings):
  """``settings.steps`` ascent steps from the clean samples (one ``lax.scan``).

  Returns:
    ``(state, objectives)``: the final state and J at every iterate before its
    step, (steps,).
  """
  original = jnp.asarray(original, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)

  def body(state, _):
    state = unlearning_gradient_step(state, original, labels, variables,
                                     held_out_images, held_out_labels, key,
                                     model=model, settings=settings)
    return state, state.objective

  return jax.lax.scan(body, unlearning_gradient_init(original, settings), None,
                      length=settings.steps)


_objective_compiled = jax.jit(attack_objective, static_argnames=("model", "settings"))


class UnlearningGradientResult(NamedTuple):
  """The optimised submission.

  Attributes:
    submission: ``pushing.Pushed`` (``predicted`` is the attacker's model's class
      for the submitted image; ``iteration`` the number of steps; every sample
      within the bounds is a success).
    objectives: (steps,) J at every iterate (the first one is the clean submission).
    final_objective: J at the submitted images (one more noise draw).
  """

  submission: pushing.Pushed
  objectives: np.ndarray
  final_objective: float


def unlearning_gradient_attack(model: models.Model, variables, images, labels,
                               held_out_images, key: jax.Array,
                               settings: UnlearningGradientSettings
                               ) -> UnlearningGradientResult:
  """Optimises the user's samples through the first-order update (white-box).

  Args:
    model, variables: the server's model (white-box) or the attacker's surrogate
      (transfer; see ``train_surrogate``).
    images: (N, H, W, C) the user's class-A samples in [-0.5, 0.5]; labels: (N,)
      class A, submitted as they are.
    held_out_images: (M, H, W, C) other class-A images the attacker holds; the
      untargeted objective is their cross-entropy (labels: the samples' class).
    key: draws the assumed server noise of every step.
    settings: ``UnlearningGradientSettings``.

  Example (a tiny model, two steps; ``service.unlearn`` then takes the result):

  >>> import jax, numpy as np
  >>> from ounl_jax import models, oracle as oracle_lib
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> x_u = np.zeros((2, 8, 8, 3), np.float32); y_u = np.array([0, 0])
  >>> x_mine = np.full((3, 8, 8, 3), 0.1, np.float32)
  >>> settings = UnlearningGradientSettings(steps=2)
  >>> result = unlearning_gradient_attack(model, variables, x_u, y_u, x_mine,
  ...                                     jax.random.key(0), settings)
  >>> images, labels = result.submission.successful()[:2]
  >>> images.shape, labels.tolist()
  ((2, 8, 8, 3), [0, 0])
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if len(np.unique(labels)) != 1:
    raise ValueError("The samples must all be of one class A; got classes "
                     f"{np.unique(labels).tolist()}.")
  held_out_images = jnp.asarray(held_out_images, jnp.float32)
  held_out_labels = jnp.full((held_out_images.shape[0],), labels[0], jnp.int32)
  state, objectives = unlearning_gradient_run(
      images, labels, variables, held_out_images, held_out_labels, key,
      model=model, settings=settings)
  submitted = np.asarray(state.images)
  final = float(_objective_compiled(
      submitted, labels, variables, held_out_images, held_out_labels,
      jax.random.fold_in(key, settings.steps), model=model, settings=settings))
  count = len(labels)
  l2 = np.linalg.norm((submitted - images).reshape(count, -1), axis=1)
  success = (l2 <= settings.max_l2 * (1 + 1e-5)) & np.isfinite(submitted).reshape(
      count, -1).all(1)
  predicted = np.asarray(jnp.argmax(model.apply(variables, submitted), -1),
                         np.int32)
  submission = pushing.Pushed(
      images=np.where(success[:, None, None, None], submitted, np.nan),
      labels=np.where(success, labels, -1).astype(np.int32),
      l2=l2.astype(np.float32), predicted=predicted,
      iteration=np.full(count, settings.steps, np.int32), success=success,
      status=np.where(success, "ok", "l2_bound").astype("<U16"))
  return UnlearningGradientResult(submission, np.asarray(objectives), final)


def train_surrogate(model: models.Model, images, labels, key: jax.Array, *,
                    epochs: int = 5, batch_size: int = 64,
                    learning_rate: float = 1e-3):
  """The transfer attacker's surrogate, trained on its own labelled data.

  Same recipe as the server's training (AMSGrad, cross-entropy; docs/protocol.md
  §3) for a fixed number of epochs.

  Args:
    model: the surrogate architecture (the attacker's guess).
    images, labels: the attacker's own data (e.g. the validation split).
    key: ``fold_in(key, 0)`` initialises, ``fold_in(key, 1 + e)`` drives epoch e.

  Returns:
    The surrogate's variables (numpy).
  """
  optimizer = train_lib.amsgrad(learning_rate)
  state = train_lib.init_train_state(model.init(jax.random.fold_in(key, 0)),
                                     optimizer)
  step = train_lib.make_train_step(model, optimizer)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  for epoch in range(epochs):
    state, _ = train_lib.train_epoch(step, state, images, labels,
                                     jax.random.fold_in(key, 1 + epoch),
                                     batch_size=batch_size)
  return jax.tree_util.tree_map(np.asarray, state.variables)
