"""Adaptive pushing against the margin screen (ounl_jax/attacks/margin_evasion.py)."""

import jax
import numpy as np
import pytest

from ounl_jax.attacks import margin_evasion as me
from ounl_jax.attacks import pushing
from tests.ounl_jax.attacks import test_pushing as tp


def margins(images):
  p = np.sort(np.asarray(tp.predict(images)), -1)
  return p[:, -1] - p[:, -2]


@pytest.fixture(scope="module")
def pushed():
  images, labels = tp.samples(8, seed=5)
  result = pushing.push(tp.ORACLE, images, labels, jax.random.key(0), tp.UNTARGETED)
  assert result.pushing_i.success.all() and result.pushing_ii.success.all()
  return images, labels, result


@pytest.mark.parametrize("inside", [True, False])
def test_evaded_samples_keep_kappa_on_the_right_side(pushed, inside):
  images, labels, result = pushed
  before = result.pushing_i if inside else result.pushing_ii
  settings = me.MarginEvasionSettings(kappa=0.2)
  state = tp.ORACLE.init()
  out = me.evade_margin(tp.ORACLE, state, images, before.images, labels, settings,
                        inside=inside)
  ok = out.success
  assert ok.sum() >= 6
  # The pushed samples sat at the boundary; the evaded ones keep margin >= kappa.
  assert (margins(before.images) < 0.2).all()
  np.testing.assert_array_less(0.2 - 1e-6, margins(out.images[ok]))
  np.testing.assert_allclose(out.margin[ok], margins(out.images[ok]), atol=1e-6)
  classes = tp.model_classes(out.images[ok])
  assert ((classes == labels[ok]) if inside else (classes != labels[ok])).all()
  assert (out.l2[ok] <= settings.max_l2).all()
  # On the push's own line: x + t d with t in [0, 1] inside, t >= 1 across.
  t = out.scale[ok]
  assert ((t >= 0) & (t <= 1)).all() if inside else (t >= 1).all()
  expected = np.clip(images[ok] + t[:, None, None, None]
                     * (before.images[ok] - images[ok]), -0.5, 0.5)
  np.testing.assert_allclose(out.images[ok], expected, atol=1e-6)
  # Every probe counted: the oracle's total is the per-sample sum.
  assert int(out.oracle_state.queries) == int(out.queries.sum())
  assert out.queries.max() <= 1 + settings.search_steps + settings.max_doublings + 1


def test_failed_pushes_stay_failed_and_cost_nothing(pushed):
  images, labels, result = pushed
  broken = result.pushing_ii.images.copy()
  broken[0] = np.nan
  out = me.evade_margin(tp.ORACLE, tp.ORACLE.init(), images, broken, labels,
                        me.MarginEvasionSettings(kappa=0.1), inside=False)
  assert not out.success[0] and out.queries[0] == 0
  assert np.isnan(out.images[0]).all()


def test_a_margin_no_point_reaches_fails_every_sample(pushed):
  images, labels, result = pushed
  out = me.evade_margin(tp.ORACLE, tp.ORACLE.init(), images,
                        result.pushing_i.images, labels,
                        me.MarginEvasionSettings(kappa=0.999), inside=True)
  assert not out.success.any() and np.isnan(out.images).all()
  assert int(out.oracle_state.queries) == int(out.queries.sum()) > 0


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="kappa"):
    me.MarginEvasionSettings(kappa=1.5)
