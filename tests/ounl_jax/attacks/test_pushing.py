"""Pushing-I / Pushing-II (Sec. III-C; docs/protocol.md §8.2, 9, 16)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing
from ounl_jax.attacks import zoo
from ounl_jax.attacks import zoo_state

SHAPE = (4, 4, 3)
CLASSES = 4
WEIGHTS = jax.random.normal(jax.random.key(0), (48, CLASSES))
ZOO = zoo.ZooSettings(coordinates_per_iteration=8, max_iterations=400,
                      iterations_per_chunk=50, sample_chunk_size=8)
UNTARGETED = pushing.PushSettings(zoo=ZOO)


def predict(images):
  return jax.nn.softmax(jnp.asarray(images).reshape(images.shape[0], -1) @ WEIGHTS)


def linear_softmax(weights, images):
  return jax.nn.softmax(images.reshape(images.shape[0], -1) @ weights)


def make_oracle(weights=WEIGHTS, **kwargs):
  return oracle_lib.make_oracle(linear_softmax, weights, input_shape=SHAPE,
                                num_classes=CLASSES, **kwargs)


ORACLE = make_oracle()


def samples(count=6, seed=1):
  images = np.asarray(jax.random.uniform(jax.random.key(seed), (count,) + SHAPE,
                                         minval=-0.45, maxval=0.45))
  return images, np.asarray(jnp.argmax(predict(images), -1), np.int32)


def model_classes(images):
  return np.asarray(jnp.argmax(predict(images), -1))


def check_pushed(result, images, labels, max_l2=20.0):
  """Properties every successful Pushing-I / II sample must have."""
  for method in (result.pushing_i, result.pushing_ii):
    ok = method.success
    assert (method.status[ok] == "ok").all()
    assert (method.l2[ok] <= max_l2).all()
    l2 = np.linalg.norm((method.images[ok] - images[ok]).reshape(ok.sum(), -1), axis=1)
    np.testing.assert_allclose(method.l2[ok], l2, rtol=1e-4, atol=1e-6)
    assert np.isnan(method.images[~ok]).all()
    assert (method.labels[~ok] == -1).all()
    assert (np.abs(method.images[ok]) <= 0.5).all()
  ok_i, ok_ii = result.pushing_i.success, result.pushing_ii.success
  # Pushing-I keeps the original prediction; Pushing-II does not.
  np.testing.assert_array_equal(model_classes(result.pushing_i.images[ok_i]),
                                labels[ok_i])
  assert (model_classes(result.pushing_ii.images[ok_ii]) != labels[ok_ii]).all()


def test_untargeted_pushing_i_and_ii():
  images, labels = samples()
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), UNTARGETED)
  assert result.pushing_i.success.all() and result.pushing_ii.success.all()
  check_pushed(result, images, labels)
  # The paper's selection: x^(t-1) and x^(t) of one trajectory.
  np.testing.assert_array_equal(result.pushing_i.iteration + 1,
                                result.pushing_ii.iteration)
  assert (result.pushing_i.l2 <= result.pushing_ii.l2 + 0.05).all()
  # Released default label mode: the original class for both methods.
  np.testing.assert_array_equal(result.pushing_i.labels, labels)
  np.testing.assert_array_equal(result.pushing_ii.labels, labels)
  np.testing.assert_array_equal(result.predicted_before, labels)


def test_query_accounting():
  images, labels = samples()
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), UNTARGETED)
  per_iteration = ZOO.queries_per_iteration
  np.testing.assert_array_equal(result.attack_queries,
                                per_iteration * result.iterations)
  # One clean query, one verification per method.
  np.testing.assert_array_equal(result.evaluation_queries, [3] * len(labels))
  np.testing.assert_array_equal(result.queries,
                                result.attack_queries + result.evaluation_queries)
  assert result.oracle_queries == int(result.oracle_state.queries)
  # Finished and padding rows are not answered: the oracle's total is exact.
  assert result.oracle_queries == int(result.queries.sum())
  # Every iteration of every sample ran in a compiled chunk's slot: the busy
  # slot-iterations are the samples' iterations, and a chunk runs its batch for as
  # long as its slowest row, so the occupancy is at most 1.
  stats = result.statistics
  assert stats.busy_slot_iterations == int(result.iterations.sum())
  assert stats.busy_slot_iterations <= stats.slot_iterations
  assert stats.slot_occupancy == pytest.approx(
      stats.busy_slot_iterations / stats.slot_iterations)
  assert stats.calls >= -(-len(labels) // ZOO.sample_chunk_size)


def test_two_parameter_sets_share_one_compiled_chunk():
  images, labels = samples(2)
  settings = dataclasses.replace(UNTARGETED, zoo=dataclasses.replace(
      ZOO, max_iterations=4, iterations_per_chunk=4, abort_early=False,
      sample_chunk_size=2))
  other = make_oracle(jax.random.normal(jax.random.key(7), (48, CLASSES)))
  # pylint: disable=protected-access
  caches = (zoo._run_chunk, labels_lib._jitted_query)
  pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  sizes = [f._cache_size() for f in caches]  # pylint: disable=protected-access
  result = pushing.push(other, images, labels, jax.random.key(0), settings)
  assert [f._cache_size() for f in caches] == sizes  # pylint: disable=protected-access
  # The second push really ran on the other parameters.
  np.testing.assert_array_equal(
      result.predicted_before,
      np.argmax(other.query(other.init(), images)[0], -1))
  assert result.oracle_queries == int(result.queries.sum())


def test_targeted_pushing_reaches_class_b():
  images, labels = samples(8)
  target = 1
  settings = dataclasses.replace(UNTARGETED, target_class=target,
                                 label_mode="target")
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  is_target = labels == target
  assert (result.pushing_i.status[is_target] == "is_target").all()
  assert (result.attack_queries[is_target] == 0).all()
  assert result.pushing_ii.success[~is_target].all()
  check_pushed(result, images, labels)
  ok = result.pushing_ii.success
  assert (model_classes(result.pushing_ii.images[ok]) == target).all()
  assert (result.pushing_ii.labels[ok] == target).all()
  assert (result.pushing_i.labels[result.pushing_i.success] == target).all()


def test_released_selections():
  images, labels = samples()
  paper = pushing.push(ORACLE, images, labels, jax.random.key(0), UNTARGETED)
  settings = dataclasses.replace(UNTARGETED, pushing_i="largest_l2",
                                 pushing_ii="smallest_l2", label_mode="prediction")
  released = pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  check_pushed(released, images, labels)
  # The same trajectory up to the first crossing, then ZOO continues.
  assert (released.iterations >= paper.iterations).all()
  ok = released.pushing_ii.success & paper.pushing_ii.success
  assert (released.pushing_ii.l2[ok] <= paper.pushing_ii.l2[ok] + 1e-6).all()
  assert (released.pushing_i.l2 >= paper.pushing_i.l2 - 1e-6).all()
  # label_mode='prediction': the oracle's class for the submitted image.
  for method in (released.pushing_i, released.pushing_ii):
    np.testing.assert_array_equal(method.labels[method.success],
                                  model_classes(method.images[method.success]))


def test_l2_bound_rejects_far_samples():
  images, labels = samples()
  settings = dataclasses.replace(UNTARGETED, max_l2=0.1)
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  far = result.pushing_ii.l2 > 0.1
  assert far.any() and not far.all()
  assert (result.pushing_ii.status[far] == "l2_bound").all()
  assert not result.pushing_ii.success[far].any()
  check_pushed(result, images, labels, max_l2=0.1)
  kept_images, kept_labels, index = result.pushing_ii.successful()
  np.testing.assert_array_equal(index, np.flatnonzero(~far))
  assert not np.isnan(kept_images).any() and (kept_labels >= 0).all()


def test_samples_that_cannot_be_pushed_are_flagged():
  images, labels = samples()
  labels = labels.copy()
  labels[0] = (labels[0] + 1) % CLASSES  # The model misclassifies sample 0.
  settings = dataclasses.replace(
      UNTARGETED, zoo=dataclasses.replace(ZOO, max_iterations=3))
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  assert result.pushing_i.status[0] == result.pushing_ii.status[0] == "misclassified"
  assert result.attack_queries[0] == 0 and result.queries[0] == 1
  # Three iterations are not enough to cross: no Pushing-I sample either (the
  # released code would have saved its arctanh-space buffer; docs/protocol.md §8.2).
  stuck = ~result.crossed & result.attacked
  assert stuck.any()
  assert (result.pushing_i.status[stuck] == "no_crossing").all()
  assert (result.pushing_ii.status[stuck] == "no_crossing").all()
  assert np.isnan(result.pushing_i.images[stuck]).all()


def test_same_key_is_bit_identical():
  images, labels = samples(3)
  first = pushing.push(ORACLE, images, labels, jax.random.key(5), UNTARGETED)
  second = pushing.push(ORACLE, images, labels, jax.random.key(5), UNTARGETED)
  for a, b in zip(first[:-1], second[:-1]):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_settings_are_checked():
  with pytest.raises(ValueError, match="Pushing-I"):
    pushing.PushSettings(pushing_i="first")
  with pytest.raises(ValueError, match="Pushing-II"):
    pushing.PushSettings(pushing_ii="last")
  with pytest.raises(ValueError, match="target"):
    pushing.PushSettings(label_mode="target")
  with pytest.raises(ValueError, match="label mode"):
    pushing.PushSettings(label_mode="random")


def vgg_oracle(trained_vgg):
  """The probabilities oracle over the session's trained VGG."""
  model, variables = trained_vgg.model, trained_vgg.variables
  return oracle_lib.make_oracle(
      oracle_lib.Softmax(model.apply), variables,
      input_shape=model.input_shape, num_classes=model.num_classes)


@pytest.mark.realdata
def test_pushing_airplanes_of_a_trained_vgg(trained_vgg):
  """A handful of real CIFAR-10 airplanes against the session's trained VGG."""
  oracle = vgg_oracle(trained_vgg)
  train = trained_vgg.splits.train
  airplanes = np.flatnonzero(train.labels == 0)[:64]
  correct = np.asarray(oracle.query(oracle.init(), train.images[airplanes])[0]
                       ).argmax(-1) == 0
  chosen = airplanes[correct][:4]
  images, labels = train.images[chosen], train.labels[chosen]
  settings = pushing.PushSettings(
      zoo=zoo.ZooSettings(max_iterations=150, iterations_per_chunk=50),
      label_mode="prediction")
  result = pushing.push(oracle, images, labels, jax.random.key(0), settings)
  assert result.pushing_ii.success.any()
  for method, keeps in ((result.pushing_i, True), (result.pushing_ii, False)):
    ok = method.success
    predicted = np.asarray(jnp.argmax(oracle.query(oracle.init(),
                                                   method.images[ok])[0], -1))
    assert ((predicted == labels[ok]) == keeps).all()
    np.testing.assert_array_equal(method.labels[ok], predicted)
    assert (method.l2[ok] <= 20).all()
  np.testing.assert_array_equal(
      result.attack_queries, (2 * 128 + 1) * result.iterations)


@pytest.mark.realdata
def test_vgg_trajectory_does_not_depend_on_batch_mates(trained_vgg):
  """Same compiled batch size, other partner: bit-identical (docs/protocol.md §19)."""
  oracle = vgg_oracle(trained_vgg)
  train = trained_vgg.splits.train
  settings = zoo.ZooSettings(iterations_per_chunk=5, abort_early=False)
  run = zoo.compiled_chunk(oracle, settings)

  def first_sample_with(partner):
    ids = np.array([0, partner])
    state = zoo_state.zoo_init(train.images[ids], train.labels[ids],
                               jax.random.key(0), settings, sample_ids=ids)
    state = run(state, oracle.init())[0]
    return np.asarray(state.modifier[0]), np.asarray(state.loss[0])

  for a, b in zip(first_sample_with(1), first_sample_with(2)):
    np.testing.assert_array_equal(a, b)


def test_stop_at_margin_kappa():
  images, labels = samples()
  kappa = 0.3
  settings = dataclasses.replace(
      UNTARGETED, stop_margin=kappa,
      zoo=dataclasses.replace(ZOO, kappa=2.0, abort_early=False,  # Push on past.
                              iterations_per_chunk=400))  # One compilation.
  result = pushing.push(ORACLE, images, labels, jax.random.key(0), settings)
  paper = pushing.push(ORACLE, images, labels, jax.random.key(0),
                       dataclasses.replace(UNTARGETED, zoo=settings.zoo))
  check_pushed(result, images, labels)

  def margins(x):
    top = np.sort(np.asarray(predict(x)), -1)
    return top[:, -1] - top[:, -2]

  ok_i, ok_ii = result.pushing_i.success, result.pushing_ii.success
  assert ok_i.sum() >= 4 and ok_ii.sum() >= 4
  assert (margins(result.pushing_i.images[ok_i]) < kappa).all()
  assert (margins(result.pushing_ii.images[ok_ii]) >= kappa).all()
  # Pushing-I no later than x^(t-1); Pushing-II no earlier than x^(t), and ZOO
  # ran past the first crossing to reach the margin on the other side.
  assert (result.pushing_i.iteration <= paper.pushing_i.iteration).all()
  later = result.pushing_ii.iteration >= paper.pushing_ii.iteration
  assert later[ok_ii].all()
  assert (result.pushing_ii.iteration > paper.pushing_ii.iteration).any()
  assert (margins(paper.pushing_ii.images[paper.pushing_ii.success]) < kappa).any()
  np.testing.assert_array_equal(result.iterations[ok_ii],
                                result.pushing_ii.iteration[ok_ii] + 1)
  with pytest.raises(ValueError, match="stop_margin"):
    pushing.PushSettings(stop_margin=0.1, pushing_ii="smallest_l2")
