"""Per-class damage bound on the tiny model: the scaled update never leaves its
envelope on the held-out data it was checked on; an honest update passes whole."""

import jax
import numpy as np
import pytest

from ounl_jax import evaluation
from ounl_jax import unlearning
from ounl_jax.defences import damage_bound as db
from tests import tiny

HONEST = unlearning.GradientAscentSettings(tau=0.3)
ATTACK = unlearning.GradientAscentSettings(tau=3.0)


@pytest.fixture(scope="module")
def server():
  """A tiny model with overlapping classes (held-out accuracy about 78%)."""
  model = tiny.mlp_model()
  x, y = tiny.synthetic(400, 0, spread=0.1, noise=0.35)
  held_x, held_y = tiny.synthetic(400, 1, spread=0.1, noise=0.35)
  variables = tiny.fit(model, x, y, 100)
  return model, variables, x, y, held_x, held_y


def unlearn(server, settings, cls, start, count, seed):
  model, variables, x, y, _, _ = server
  idx = np.flatnonzero(y == cls)[start:start + count]
  return unlearning.unlearn("gradient_ascent", model, variables, x[idx], y[idx],
                            jax.random.key(seed), settings)


@pytest.fixture(scope="module")
def envelope(server):
  model, variables, _, _, held_x, held_y = server
  drops = [db.class_drops(model, variables,
                          unlearn(server, HONEST, cls, start, 10, cls),
                          held_x, held_y)
           for cls in range(tiny.CLASSES) for start in (0, 10, 20, 30, 40)]
  return db.fit_envelope(np.array(drops))


def true_drops(server, variables1):
  """Per-class drops measured independently (evaluation, float64)."""
  model, variables, _, _, held_x, held_y = server
  before = evaluation.per_class_accuracy(
      evaluation.predict_labels(model, variables, held_x), held_y, tiny.CLASSES)
  after = evaluation.per_class_accuracy(
      evaluation.predict_labels(model, variables1, held_x), held_y, tiny.CLASSES)
  return before - after


def test_fit_envelope_by_hand():
  drops = np.array([[0.00, 0.10, np.nan], [0.02, 0.30, np.nan],
                    [0.04, -0.5, np.nan], [0.06, 0.20, np.nan]])
  settings = db.DamageBoundSettings(quantile=0.5, margin=0.01)
  # method="higher": the median of 4 is the 3rd smallest.
  np.testing.assert_allclose(db.fit_envelope(drops, settings), [0.05, 0.21, 1.0])
  np.testing.assert_allclose(
      db.fit_envelope(-np.ones((3, 2)), db.DamageBoundSettings(margin=0.0)), 0.0)


def test_honest_update_passes_whole(server, envelope):
  model, variables, _, _, held_x, held_y = server
  # A new honest request: samples no fitted request used.
  theta1 = unlearn(server, HONEST, 2, 60, 10, 7)
  result = db.bound_update(model, variables, theta1, held_x, held_y, envelope)
  assert result.alpha == 1.0 and result.within
  np.testing.assert_allclose(result.drops, true_drops(server, theta1), atol=1e-12)


def test_attack_is_scaled_down_and_stays_in_envelope(server, envelope):
  model, variables, _, _, held_x, held_y = server
  theta1 = unlearn(server, ATTACK, 0, 0, 40, 3)
  full = true_drops(server, theta1)
  assert (full > envelope + 1e-9).any()  # The whole update would break it.
  result = db.bound_update(model, variables, theta1, held_x, held_y, envelope)
  assert 0.0 < result.alpha < 1.0 and result.within
  measured = true_drops(server, result.variables)
  assert (measured <= envelope + 1e-9).all()
  np.testing.assert_allclose(measured, result.drops, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_never_exceeds_random_envelopes(server, seed):
  """Property: whatever the envelope and update, the returned model is within."""
  model, variables, _, _, held_x, held_y = server
  rng = np.random.default_rng(seed)
  theta1 = unlearn(server, ATTACK, seed % tiny.CLASSES, 0, int(rng.integers(5, 60)),
                   seed)
  envelope = rng.uniform(0.0, 0.1, tiny.CLASSES)
  settings = db.DamageBoundSettings(num_alphas=int(rng.integers(2, 9)),
                                    refine_steps=int(rng.integers(0, 6)),
                                    batch_size=int(rng.integers(7, 300)))
  result = db.bound_update(model, variables, theta1, held_x, held_y, envelope,
                           settings=settings)
  assert result.within and 0.0 <= result.alpha <= 1.0
  assert (true_drops(server, result.variables) <= envelope + 1e-9).all()
  # The returned variables are the interpolation at the returned alpha (up to
  # float rounding: jitted and eager arithmetic may differ in the last bit).
  expected = db.interpolate(variables, theta1, result.alpha)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         result.variables, expected)


def test_refinement_only_raises_alpha(server, envelope):
  model, variables, _, _, held_x, held_y = server
  theta1 = unlearn(server, ATTACK, 0, 0, 40, 3)
  grid = db.bound_update(model, variables, theta1, held_x, held_y, envelope,
                         settings=db.DamageBoundSettings(refine_steps=0))
  refined = db.bound_update(model, variables, theta1, held_x, held_y, envelope,
                            settings=db.DamageBoundSettings(refine_steps=5))
  assert refined.alpha >= grid.alpha
  assert refined.within and grid.within


def test_cumulative_baseline_outside_gives_alpha_zero(server, envelope):
  model, variables, _, _, held_x, held_y = server
  theta1 = unlearn(server, HONEST, 1, 0, 10, 1)
  # A baseline every class is already far below: nothing is within, theta0 kept.
  result = db.bound_update(model, variables, theta1, held_x, held_y, envelope,
                           baseline_accuracy=np.ones(tiny.CLASSES) * 1.5)
  assert result.alpha == 0.0 and not result.within
  assert result.variables is variables


def test_bad_arguments():
  with pytest.raises(ValueError):
    db.DamageBoundSettings(num_alphas=1)
  with pytest.raises(ValueError):
    db.fit_envelope(np.zeros(4))
