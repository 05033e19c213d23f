"""Gradient through the first-order update (ounl_jax.attacks.unlearning_gradient)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax.attacks import unlearning_gradient as ug
from ounl_jax.unlearning import first_order
from tests import tiny

SHAPE = tiny.SHAPE
CLASSES = tiny.CLASSES
mlp_model = tiny.mlp_model
CLASS_A = 0
SETTINGS = ug.UnlearningGradientSettings(
    steps=30, max_l2=3.0, unlearning=first_order.FirstOrderSettings(tau=2e-3))


def synthetic(count, seed):
  return tiny.synthetic(count, seed, spread=0.15, noise=0.35)


@pytest.fixture(scope="module")
def server():
  """The server's MLP, trained full-batch (60 Adam steps) on 1,024 images."""
  model = mlp_model()
  images, labels = synthetic(1024, seed=1)
  variables = tiny.fit(model, images, labels, steps=60)
  return model, variables


@pytest.fixture(scope="module")
def attacker(server):
  """The user's 16 submitted class-A samples, 32 held-out A images, a test set."""
  model, variables = server
  images, labels = synthetic(1024, seed=3)
  predicted = np.asarray(jnp.argmax(model.apply(variables, images), -1))
  class_a = np.flatnonzero((labels == CLASS_A) & (predicted == CLASS_A))
  test_images, test_labels = synthetic(1024, seed=5)
  return dict(images=images[class_a[:16]], labels=labels[class_a[:16]],
              held_out=images[class_a[16:48]], own_images=images,
              own_labels=labels, test_images=test_images, test_labels=test_labels)


def after_unlearning(model, variables, images, labels, test_images, test_labels,
                     settings=SETTINGS.unlearning):
  """(class-A accuracy, overall accuracy, mean p_B) after the server unlearns."""
  unlearned = first_order.first_order_unlearn(model, variables, images, labels,
                                              jax.random.key(88), settings=settings)
  logits = model.apply(unlearned, test_images)
  predicted = np.asarray(jnp.argmax(logits, -1))
  is_a = test_labels == CLASS_A
  p_b = np.asarray(jax.nn.softmax(logits))[is_a, 2].mean()
  return (predicted[is_a] == CLASS_A).mean(), (predicted == test_labels).mean(), p_b


def test_gradient_matches_central_differences(server, attacker):
  """jax.grad through the jitted Eq. 13 update vs central differences (float64)."""
  model, variables = server
  settings = dataclasses.replace(SETTINGS, unlearning=first_order.FirstOrderSettings(
      tau=2e-3, replacement="noise"))
  with jax.enable_x64(True):
    variables64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                         variables)
    held_out = jnp.asarray(attacker["held_out"], jnp.float64)
    objective = jax.jit(lambda x: ug.attack_objective(
        x, jnp.asarray(attacker["labels"][:4]), variables64, held_out,
        jnp.full((len(held_out),), CLASS_A), jax.random.key(1), model=model,
        settings=settings))
    x0 = jnp.asarray(attacker["images"][:4], jnp.float64)
    gradient = jax.grad(objective)(x0)
    assert gradient.shape == x0.shape and bool(jnp.all(jnp.isfinite(gradient)))
    assert float(jnp.abs(gradient).max()) > 0
    eps = 1e-2
    for seed in range(3):
      direction = jax.random.normal(jax.random.key(100 + seed), x0.shape, jnp.float64)
      direction = direction / jnp.linalg.norm(direction)
      numeric = (objective(x0 + eps * direction)
                 - objective(x0 - eps * direction)) / (2 * eps)
      analytic = jnp.sum(gradient * direction)
      np.testing.assert_allclose(float(numeric), float(analytic), rtol=2e-3)


def test_optimised_submission_over_unlearns(server, attacker):
  model, variables = server
  result = ug.unlearning_gradient_attack(
      model, variables, attacker["images"], attacker["labels"],
      attacker["held_out"], jax.random.key(0), SETTINGS)
  submission = result.submission
  assert submission.success.all()
  assert (submission.l2 <= SETTINGS.max_l2 * (1 + 1e-5)).all()
  assert (np.abs(submission.images) <= 0.5).all()
  np.testing.assert_array_equal(submission.labels, attacker["labels"])
  assert result.objectives.shape == (SETTINGS.steps,)
  assert result.final_objective > 3 * result.objectives[0]
  clean = after_unlearning(model, variables, attacker["images"], attacker["labels"],
                           attacker["test_images"], attacker["test_labels"])
  attacked = after_unlearning(model, variables, submission.images,
                              submission.labels, attacker["test_images"],
                              attacker["test_labels"])
  # Measured on the server's test set, which the attacker never saw.
  assert attacked[0] < clean[0] - 0.03


def test_targeted_objective_raises_class_b(server, attacker):
  model, variables = server
  settings = dataclasses.replace(SETTINGS, target_class=2, optimizer="sign",
                                 learning_rate=0.02)
  result = ug.unlearning_gradient_attack(
      model, variables, attacker["images"], attacker["labels"],
      attacker["held_out"], jax.random.key(0), settings)
  assert result.final_objective > result.objectives[0]
  clean = after_unlearning(model, variables, attacker["images"], attacker["labels"],
                           attacker["test_images"], attacker["test_labels"])
  attacked = after_unlearning(model, variables, result.submission.images,
                              result.submission.labels, attacker["test_images"],
                              attacker["test_labels"])
  assert attacked[2] > 1.5 * clean[2]


def test_transfer_from_a_surrogate(server, attacker):
  """Optimised against a surrogate trained on the attacker's data, then submitted."""
  model, variables = server
  surrogate = ug.train_surrogate(mlp_model(), attacker["own_images"],
                                 attacker["own_labels"], jax.random.key(7),
                                 epochs=8, batch_size=64, learning_rate=1e-2)
  result = ug.unlearning_gradient_attack(
      mlp_model(), surrogate, attacker["images"], attacker["labels"],
      attacker["held_out"], jax.random.key(0), SETTINGS)
  clean = after_unlearning(model, variables, attacker["images"], attacker["labels"],
                           attacker["test_images"], attacker["test_labels"])
  transferred = after_unlearning(model, variables, result.submission.images,
                                 result.submission.labels, attacker["test_images"],
                                 attacker["test_labels"])
  assert transferred[0] < clean[0] - 0.02


def test_projection_keeps_both_bounds():
  original = np.asarray(jax.random.uniform(jax.random.key(0), (5,) + SHAPE,
                                           minval=-0.5, maxval=0.5))
  moved = original + 3.0 * np.asarray(jax.random.normal(jax.random.key(1),
                                                        original.shape))
  projected = np.asarray(ug.project(jnp.asarray(moved), jnp.asarray(original), 2.0))
  l2 = np.linalg.norm((projected - original).reshape(5, -1), axis=1)
  assert (l2 <= 2.0 + 1e-5).all() and (np.abs(projected) <= 0.5).all()
  inside = original + 1e-3
  np.testing.assert_allclose(
      np.asarray(ug.project(jnp.asarray(np.clip(inside, -0.5, 0.5)),
                            jnp.asarray(original), 2.0)),
      np.clip(inside, -0.5, 0.5), atol=1e-7)


def test_settings_are_checked():
  with pytest.raises(ValueError, match="optimizer"):
    ug.UnlearningGradientSettings(optimizer="sgd")
  with pytest.raises(ValueError, match="max_l2"):
    ug.UnlearningGradientSettings(max_l2=0.0)
  with pytest.raises(ValueError, match="one class"):
    ug.unlearning_gradient_attack(None, None, np.zeros((2,) + SHAPE), [0, 1],
                                  np.zeros((1,) + SHAPE), jax.random.key(0),
                                  SETTINGS)
