"""Healing on the tiny model: it repairs the classes an unlearning update damaged,
within its step bound and its parameter scope."""

import jax
import numpy as np
import pytest

from ounl_jax import models
from ounl_jax import unlearning
from ounl_jax.defences import damage_bound as db
from ounl_jax.defences import healing
from ounl_jax.defences import record_matching as rm
from tests import tiny

SETTINGS = healing.HealSettings(steps=20, batch_size=64, learning_rate=1e-2,
                                momentum=0.9)


@pytest.fixture(scope="module")
def unlearned():
  """A tiny model, and the same after a first-order update on 40 class-0 samples
  (its noise term drags other classes' inputs towards class 0)."""
  model = tiny.mlp_model()
  x, y = tiny.synthetic(400, 0, spread=0.1, noise=0.35)
  variables = tiny.fit(model, x, y, 100)
  idx = np.flatnonzero(y == 0)[:40]
  theta1 = unlearning.unlearn("first_order", model, variables, x[idx], y[idx],
                              jax.random.key(0),
                              unlearning.FirstOrderSettings(tau=0.01))
  return model, variables, theta1, x, y, idx


def global_norm(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(u) - np.asarray(v)) ** 2)
                           for u, v in zip(jax.tree_util.tree_leaves(a),
                                           jax.tree_util.tree_leaves(b)))))


def test_heal_repairs_the_other_classes(unlearned):
  model, variables, theta1, x, y, _ = unlearned
  held_x, held_y = tiny.synthetic(400, 1, spread=0.1, noise=0.35)
  spare_x, spare_y = tiny.synthetic(200, 2, spread=0.1, noise=0.35)
  clean = db.class_counts(model, variables, held_x, held_y)[0]
  damaged = db.class_counts(model, theta1, held_x, held_y)[0]
  assert damaged[1:].sum() < clean[1:].sum()  # The update did damage them.
  healed_vars = healing.heal(model, theta1, spare_x, spare_y, jax.random.key(1),
                             settings=SETTINGS)
  healed = db.class_counts(model, healed_vars, held_x, held_y)[0]
  assert healed[1:].sum() > damaged[1:].sum()
  worst = int(np.argmin(damaged[1:])) + 1
  assert healed[worst] > damaged[worst]
  # Within its step bound: clipped SGD with momentum moves at most this far.
  bound = (SETTINGS.steps * SETTINGS.learning_rate * SETTINGS.max_grad_norm
           / (1 - SETTINGS.momentum))
  assert 0 < global_norm(healed_vars, theta1) <= bound + 1e-6


def test_more_steps_move_further_and_one_step_is_small(unlearned):
  model, _, theta1, x, y, _ = unlearned
  one = healing.heal(model, theta1, x, y, jax.random.key(2),
                     settings=healing.HealSettings(steps=1, momentum=0.0))
  assert 0 < global_norm(one, theta1) <= 1e-2 * 1.0 + 1e-7


def test_heal_is_deterministic_in_its_key(unlearned):
  model, _, theta1, x, y, _ = unlearned
  a = healing.heal(model, theta1, x, y, jax.random.key(3), settings=SETTINGS)
  b = healing.heal(model, theta1, x, y, jax.random.key(3), settings=SETTINGS)
  c = healing.heal(model, theta1, x, y, jax.random.key(4), settings=SETTINGS)
  assert global_norm(a, b) == 0.0 and global_norm(a, c) > 0.0
  # Fewer records than a batch: drawn with replacement, still runs.
  healing.heal(model, theta1, x[:5], y[:5], jax.random.key(3), settings=SETTINGS)


def test_heal_stays_in_scope():
  model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3), width=2)
  variables = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0)))
  x, y = tiny.synthetic(32, 0)
  healed = healing.heal(model, variables, x, y, jax.random.key(1),
                        settings=healing.HealSettings(steps=2, batch_size=8,
                                                      scope="head"))
  mask = models.head_mask(variables["params"])
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)),
                                   variables["params"], healed["params"])
  flat_mask = jax.tree_util.tree_leaves(mask)
  flat_changed = jax.tree_util.tree_leaves(changed)
  assert not any(c for c, m in zip(flat_changed, flat_mask) if not m)
  assert any(c for c, m in zip(flat_changed, flat_mask) if m)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables["batch_stats"],
                         healed["batch_stats"])


def test_select_spares_same_label_without_the_unlearned(unlearned):
  _, _, _, x, y, idx = unlearned
  index = rm.build_index(rm.MatchSettings(block=2), x, y,
                         num_classes=tiny.CLASSES)
  spares = healing.select_spares(index, x[idx], y[idx], per_sample=3,
                                 exclude_ids=idx)
  assert len(spares) and not np.isin(spares, idx).any()
  assert (y[spares] == 0).all()
  assert len(spares) <= 3 * len(idx)


def test_settings_are_checked():
  with pytest.raises(ValueError):
    healing.HealSettings(steps=0)
  with pytest.raises(ValueError):
    healing.HealSettings(scope="body")
  with pytest.raises(ValueError):
    healing.HealSettings(momentum=1.0)
