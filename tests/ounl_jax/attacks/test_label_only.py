"""Label-only (HopSkipJump) Pushing-I / Pushing-II (ounl_jax.attacks.label_only)."""

import dataclasses

import jax
import numpy as np
import pytest

from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import label_only
from tests import tiny

SHAPE = tiny.SHAPE
CLASSES = tiny.CLASSES
mlp_model = tiny.mlp_model
SETTINGS = label_only.LabelOnlySettings(max_iterations=12, directions=32,
                                        iterations_per_chunk=4)


def synthetic(count, seed):
  return tiny.synthetic(count, seed)


def train_tiny_model():
  """The MLP trained full-batch on the synthetic task (about a second)."""
  model = mlp_model()
  images, labels = synthetic(1024, seed=1)
  return model, tiny.fit(model, images, labels, steps=200)


@pytest.fixture(scope="module")
def tiny_model():
  return train_tiny_model()


def make_oracle(tiny_model, output="labels"):
  model, variables = tiny_model
  return oracle_lib.make_oracle(
      lambda x: models.predict_probabilities(model, variables, x),
      input_shape=SHAPE, num_classes=CLASSES, output=output)


def user_data(tiny_model, class_a=0, count=8):
  """Correctly classified class-A samples and the user's images of other classes."""
  images, labels = synthetic(256, seed=7)
  oracle = make_oracle(tiny_model)
  predicted = np.asarray(oracle.query(oracle.init(), images)[0])
  correct = predicted == labels
  mine = np.flatnonzero((labels == class_a) & correct)[:count]
  others = np.flatnonzero((labels != class_a) & correct)[:32]
  assert len(mine) == count
  return images[mine], labels[mine], images[others], labels[others]


def fresh_labels(oracle, images):
  return np.asarray(oracle.query(oracle.init(), images)[0])


def test_untargeted_crosses_and_keeps(tiny_model):
  oracle = make_oracle(tiny_model)
  assert oracle.output == "labels"
  images, labels, others, _ = user_data(tiny_model)
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      SETTINGS, start_images=others)
  first, second = result.pushing_i, result.pushing_ii
  assert first.success.all() and second.success.all()
  # Checked again through a fresh oracle: I is still A, II is across.
  np.testing.assert_array_equal(fresh_labels(oracle, first.images), labels)
  assert (fresh_labels(oracle, second.images) != labels).all()
  # Both ends of one tight bisection bracket, within the bound and the pixel box.
  l2 = np.linalg.norm((second.images - images).reshape(len(labels), -1), axis=1)
  np.testing.assert_allclose(second.l2, l2, rtol=1e-4, atol=1e-5)
  gap = np.linalg.norm((second.images - first.images).reshape(len(labels), -1), 1)
  assert (gap < 1e-2 * second.l2 + 1e-4).all()
  assert (second.l2 <= SETTINGS.max_l2).all()
  assert (np.abs(second.images) <= 0.5).all() and (np.abs(first.images) <= 0.5).all()
  np.testing.assert_array_equal(second.labels, labels)  # label_mode='original'


def test_walk_shrinks_the_distance(tiny_model):
  oracle = make_oracle(tiny_model)
  images, labels, others, _ = user_data(tiny_model)
  start_only = dataclasses.replace(SETTINGS, max_iterations=0)
  before = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      start_only, start_images=others)
  after = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                     SETTINGS, start_images=others)
  assert (before.iterations == 0).all() and (after.iterations > 0).all()
  assert (after.pushing_ii.l2 <= before.pushing_ii.l2 + 1e-5).all()
  assert np.median(after.pushing_ii.l2 / before.pushing_ii.l2) < 0.95


def test_query_counts_are_exact(tiny_model):
  oracle = make_oracle(tiny_model)
  images, labels, others, _ = user_data(tiny_model)
  labels = labels.copy()
  labels[0] = 1  # Misclassified: one clean query only.
  state0 = oracle.init()
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      SETTINGS, start_images=others,
                                      oracle_state=state0)
  assert int(result.oracle_state.queries) == result.oracle_queries
  assert result.oracle_queries == int(result.queries.sum())
  assert result.queries[0] == 1 and result.attack_queries[0] == 0
  assert result.pushing_ii.status[0] == "misclassified"
  dim = int(np.prod(SHAPE))
  walked = result.crossed
  expected = (SETTINGS.start_queries() + SETTINGS.search_steps(dim)
              + result.iterations * SETTINGS.iteration_queries(dim))
  np.testing.assert_array_equal(result.attack_queries[walked], expected[walked])
  np.testing.assert_array_equal(result.evaluation_queries[walked], 3)
  # Samples that stalled stopped early (fewer iterations, fewer queries).
  assert (result.iterations[walked] <= SETTINGS.max_iterations).all()
  # The walk ran on the shared scheduler: every walk iteration in a chunk's slot,
  # and the batch shrinks to the live samples, so few slots idle.
  stats = result.statistics
  assert stats.busy_slot_iterations == int(result.iterations.sum())
  assert 0 < stats.slot_occupancy <= 1


def test_groups_and_chunks_do_not_change_a_sample(tiny_model):
  """A sample's draws depend on its index and iteration only, and the stop check
  is per sample: other group and chunk sizes give the same iterations and queries
  (the float32 answers of this tiny model do not depend on the batch here)."""
  oracle = make_oracle(tiny_model)
  images, labels, others, _ = user_data(tiny_model)
  base = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                    SETTINGS, start_images=others)
  other = label_only.label_only_push(
      oracle, images, labels, jax.random.key(0),
      dataclasses.replace(SETTINGS, sample_chunk_size=3), start_images=others)
  np.testing.assert_array_equal(base.iterations, other.iterations)
  np.testing.assert_array_equal(base.attack_queries, other.attack_queries)
  np.testing.assert_array_equal(base.pushing_ii.status, other.pushing_ii.status)


def test_only_the_top_label_is_used(tiny_model):
  """A probabilities oracle gives the very same push: only the argmax is read."""
  images, labels, others, _ = user_data(tiny_model, count=4)
  results = [label_only.label_only_push(make_oracle(tiny_model, output), images,
                                        labels, jax.random.key(3), SETTINGS,
                                        start_images=others)
             for output in ("labels", "probabilities")]
  for a, b in zip(results[0][:-1], results[1][:-1]):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_l2_bound_rejects_far_samples(tiny_model):
  oracle = make_oracle(tiny_model)
  images, labels, others, _ = user_data(tiny_model)
  free = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                    SETTINGS, start_images=others)
  bound = float(np.median(free.pushing_ii.l2))
  settings = dataclasses.replace(SETTINGS, max_l2=bound)
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      settings, start_images=others)
  far = result.pushing_ii.l2 > bound
  assert far.any() and not far.all()
  assert (result.pushing_ii.status[far] == "l2_bound").all()
  assert np.isnan(result.pushing_ii.images[far]).all()
  assert (result.pushing_ii.labels[far] == -1).all()
  assert result.pushing_ii.success[~far].all()


def test_targeted_reaches_class_b(tiny_model):
  oracle = make_oracle(tiny_model)
  images, labels, others, other_labels = user_data(tiny_model)
  target = 2
  settings = dataclasses.replace(SETTINGS, target_class=target, label_mode="target")
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      settings,
                                      start_images=others[other_labels == target])
  ok = result.pushing_ii.success
  assert ok.all()
  assert (fresh_labels(oracle, result.pushing_ii.images) == target).all()
  assert (result.pushing_ii.labels == target).all()
  ok_i = result.pushing_i.success
  assert ok_i.any()
  np.testing.assert_array_equal(fresh_labels(oracle, result.pushing_i.images[ok_i]),
                                labels[ok_i])


def test_noise_start_and_missing_start_images(tiny_model):
  oracle = make_oracle(tiny_model)
  images, labels, _, _ = user_data(tiny_model, count=4)
  settings = dataclasses.replace(SETTINGS, start="noise", max_iterations=4)
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      settings)
  crossed = result.crossed
  assert crossed.any()
  assert (result.pushing_ii.status[~crossed] == "no_crossing").all()
  ok = result.pushing_ii.success
  assert (fresh_labels(oracle, result.pushing_ii.images[ok]) != labels[ok]).all()
  with pytest.raises(ValueError, match="start_images"):
    label_only.label_only_push(oracle, images, labels, jax.random.key(0), SETTINGS)


def test_settings_are_checked():
  with pytest.raises(ValueError, match="start"):
    label_only.LabelOnlySettings(start="zeros")
  with pytest.raises(ValueError, match="directions"):
    label_only.LabelOnlySettings(directions=0)
  with pytest.raises(ValueError, match="target"):
    label_only.LabelOnlySettings(label_mode="target")
  with pytest.raises(ValueError, match="verify"):
    label_only.LabelOnlySettings(label_mode="prediction", verify=False)
  # HSJ's bisection threshold theta = gamma / d^1.5: 18 steps for CIFAR.
  assert label_only.LabelOnlySettings().search_steps(32 * 32 * 3) == 18


def test_oracle_with_parameters_as_arguments(tiny_model):
  """The parameterised oracle (parameters in the OracleState) works the same way."""
  if not hasattr(oracle_lib, "Softmax"):
    pytest.skip("This oracle has no parameterised form.")
  model, variables = tiny_model
  oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
                                  input_shape=SHAPE, num_classes=CLASSES,
                                  output="labels")
  images, labels, others, _ = user_data(tiny_model, count=4)
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      SETTINGS, start_images=others)
  assert result.pushing_ii.success.all()
  assert result.oracle_queries == int(result.queries.sum())
  assert (fresh_labels(oracle, result.pushing_ii.images) != labels).all()


def test_low_frequency_directions_cross_with_exact_counts(tiny_model):
  """Directions on a coarse grid (direction_resolution) and a short bisection."""
  oracle = make_oracle(tiny_model)
  images, labels, others, _ = user_data(tiny_model)
  settings = dataclasses.replace(SETTINGS, direction_resolution=4,
                                 binary_search_steps=8, step_candidates=2)
  start_only = dataclasses.replace(settings, max_iterations=0)
  before = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      start_only, start_images=others)
  result = label_only.label_only_push(oracle, images, labels, jax.random.key(0),
                                      settings, start_images=others)
  assert result.pushing_ii.success.all() and result.pushing_i.success.all()
  assert (fresh_labels(oracle, result.pushing_ii.images) != labels).all()
  np.testing.assert_array_equal(fresh_labels(oracle, result.pushing_i.images),
                                labels)
  # The tiny task's class means are per-pixel noise, so a coarse subspace holds
  # little of the normal: the walk still never moves away and does move closer.
  assert (result.pushing_ii.l2 <= before.pushing_ii.l2 + 1e-5).all()
  assert np.median(result.pushing_ii.l2 / before.pushing_ii.l2) < 0.99
  dim = int(np.prod(SHAPE))
  expected = (settings.start_queries() + 8
              + result.iterations * settings.iteration_queries(dim))
  np.testing.assert_array_equal(result.attack_queries, expected)
  assert result.oracle_queries == int(result.queries.sum())


def test_query_efficient_settings_budget():
  settings = label_only.query_efficient_settings()
  dim = 32 * 32 * 3
  per_sample = (1 + settings.start_queries() + settings.search_steps(dim)
                + settings.max_iterations * settings.iteration_queries(dim) + 2)
  assert per_sample == 401
  assert label_only.query_efficient_settings(max_iterations=2).max_iterations == 2
  with pytest.raises(ValueError, match="direction_resolution"):
    label_only.LabelOnlySettings(direction_resolution=0)
