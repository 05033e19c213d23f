"""ZOO black-box C&W (Eq. 4-8; docs/protocol.md §8 and §12) on small linear models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import estimators
from ounl_jax.attacks import margins
from ounl_jax.attacks import zoo
from ounl_jax.attacks import zoo_state

SHAPE = (4, 4, 3)
DIM = 48
CLASSES = 4
# One settings object for most tests, so that they share one compilation.
SETTINGS = zoo.ZooSettings(coordinates_per_iteration=8, max_iterations=400,
                           iterations_per_chunk=50, sample_chunk_size=8)


def linear_logits(scale=1.0, seed=0):
  weights = scale * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))
  return lambda x: x.reshape(x.shape[0], -1) @ weights


def linear_softmax(weights, x):
  return jax.nn.softmax(x.reshape(x.shape[0], -1) @ weights)


def linear_oracle(scale=1.0, seed=0, **kwargs):
  weights = scale * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))
  return oracle_lib.make_oracle(linear_softmax, weights, input_shape=SHAPE,
                                num_classes=CLASSES, **kwargs)


def images_and_labels(count, seed=1, scale=1.0):
  images = jax.random.uniform(jax.random.key(seed), (count,) + SHAPE,
                              minval=-0.45, maxval=0.45)
  labels = np.asarray(jnp.argmax(linear_logits(scale)(images), -1), np.int32)
  return np.asarray(images), labels


ORACLE = linear_oracle()


def reference_loss(modifier, anchor, logits, cls, settings):
  """Eq. 4 with Eq. 6's margin, from exact log-softmax (for jax.grad)."""
  image = jnp.tanh(modifier + anchor) / 2
  start = jnp.tanh(anchor) / 2
  logp = jax.nn.log_softmax(logits(image.reshape((1,) + SHAPE))[0])
  margin = margins.margin(logp, cls, settings.targeted)
  return (jnp.sum(jnp.square(image - start))
          + settings.c * jnp.maximum(margin, -settings.kappa))


def estimated_and_true_gradients(settings, scale, cls, seed=3):
  logits = linear_logits(scale)
  images, _ = images_and_labels(1, scale=scale)
  anchor = jnp.arctanh(settings.tanh_scale * jnp.asarray(images[0]).reshape(-1))
  modifier = 0.05 * jax.random.normal(jax.random.key(seed), (DIM,))
  coordinates = estimators.draw_coordinates(jax.random.key(seed + 1), DIM,
                                     settings.coordinates_per_iteration)

  @jax.jit
  def estimate(modifier):
    probes, values = estimators.coordinate_probes(modifier, anchor, coordinates,
                                                  settings)
    probabilities = jax.nn.softmax(logits(probes.reshape((-1,) + SHAPE)))
    return estimators.coordinate_gradient(probabilities, modifier, anchor,
                                          coordinates, values, cls, settings)

  true = jax.grad(reference_loss)(modifier, anchor, logits, cls, settings)
  return estimate(modifier), true[coordinates]


@pytest.mark.parametrize("targeted,difference,scale,tolerance", [
    (False, "symmetric", 1.0, 1e-2),
    (True, "symmetric", 1.0, 1e-2),
    (False, "forward", 1.0, 3e-2),
    # A confident model: the true class has p > 1 - 1e-6 (float32 rounds 1 - p).
    (False, "symmetric", 12.0, 2e-2),
])
def test_finite_difference_gradient_matches_autodiff(targeted, difference, scale,
                                                     tolerance):
  settings = dataclasses.replace(SETTINGS, targeted=targeted, difference=difference,
                                 coordinates_per_iteration=16)
  cls = 2 if targeted else int(images_and_labels(1, scale=scale)[1][0])
  probe, true = estimated_and_true_gradients(settings, scale, cls)
  assert probe.margin > 0  # Away from the kink of max(m, -kappa).
  np.testing.assert_allclose(probe.gradient, true, rtol=tolerance,
                             atol=tolerance * float(jnp.max(jnp.abs(true))))


def test_probe_images_move_one_coordinate_each():
  modifier = 0.1 * jax.random.normal(jax.random.key(0), (DIM,))
  anchor = jnp.zeros((DIM,))
  coordinates = jnp.array([3, 7, 11])
  settings = dataclasses.replace(SETTINGS, coordinates_per_iteration=3)
  probes, values = estimators.coordinate_probes(modifier, anchor, coordinates, settings)
  assert probes.shape == (settings.queries_per_iteration, DIM) == (7, DIM)
  centre = jnp.tanh(modifier) / 2
  np.testing.assert_array_equal(probes[0], centre)
  for row, (j, sign) in enumerate([(3, 1), (7, 1), (11, 1), (3, -1), (7, -1),
                                   (11, -1)], start=1):
    changed = np.flatnonzero(np.asarray(probes[row] != centre))
    assert list(changed) == [j]
    np.testing.assert_allclose(probes[row, j],
                               np.tanh(modifier[j] + sign * settings.h) / 2, rtol=1e-6)
    assert values[row - 1] == probes[row, j]


def test_coordinate_adam_matches_hand_computation():
  settings = SETTINGS
  modifier = np.linspace(-0.2, 0.2, 6).astype(np.float32)
  adam = estimators.CoordinateAdamState(jnp.zeros(6), jnp.zeros(6),
                                 jnp.zeros(6, jnp.int32))
  steps = [(np.array([1, 4]), np.array([0.5, -2.0], np.float32)),
           (np.array([4, 0]), np.array([1.5, 3.0], np.float32))]
  m, v, t, w = (np.zeros(6), np.zeros(6), np.zeros(6, int),
                modifier.astype(np.float64))
  b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-8
  for coordinates, gradient in steps:
    modifier, adam = estimators.coordinate_adam(jnp.asarray(modifier), adam,
                                         jnp.asarray(coordinates),
                                         jnp.asarray(gradient), settings)
    for j, g in zip(coordinates, gradient.astype(np.float64)):
      m[j] = b1 * m[j] + (1 - b1) * g
      v[j] = b2 * v[j] + (1 - b2) * g * g
      t[j] += 1
      w[j] -= lr * np.sqrt(1 - b2 ** t[j]) / (1 - b1 ** t[j]) * m[j] / (
          np.sqrt(v[j]) + eps)
  np.testing.assert_allclose(adam.m, m, rtol=1e-6)
  np.testing.assert_allclose(adam.v, v, rtol=1e-6)
  np.testing.assert_array_equal(adam.steps, t)
  np.testing.assert_allclose(modifier, w, rtol=1e-6, atol=1e-7)
  # Coordinate 4 took two steps with its own counter; 1 and 0 one each.
  assert list(np.asarray(adam.steps)) == [1, 1, 0, 0, 2, 0]


def test_coordinate_descent_is_eq7():
  modifier, adam = estimators.coordinate_descent(
      jnp.zeros(4), None, jnp.array([2]), jnp.array([3.0]),
      dataclasses.replace(SETTINGS, solver="descent", learning_rate=0.5))
  np.testing.assert_allclose(modifier, [0, 0, -1.5, 0])
  assert adam is None


def test_one_step_queries_once_per_probe():
  images, labels = images_and_labels(3)
  state = zoo_state.zoo_init(images, labels, jax.random.key(0), SETTINGS)
  step = jax.jit(functools.partial(zoo.zoo_step, oracle=ORACLE, settings=SETTINGS))
  state, oracle_state = step(state, ORACLE.init())
  assert SETTINGS.queries_per_iteration == 2 * 8 + 1
  np.testing.assert_array_equal(state.queries, [17, 17, 17])
  assert int(oracle_state.queries) == 3 * 17
  np.testing.assert_array_equal(state.iterations, [1, 1, 1])
  # Exactly B coordinates moved per sample, all with one ADAM step.
  np.testing.assert_array_equal(np.sum(np.asarray(state.adam.steps), 1), [8, 8, 8])
  np.testing.assert_array_equal(np.sum(np.asarray(state.modifier) != 0, 1),
                                [8, 8, 8])


@pytest.mark.parametrize("difference,per_iteration", [("symmetric", 17),
                                                      ("forward", 9)])
def test_query_accounting_is_exact(difference, per_iteration):
  settings = dataclasses.replace(SETTINGS, difference=difference, abort_early=False,
                                 max_iterations=7, iterations_per_chunk=3)
  images, labels = images_and_labels(3)
  reports = []
  result = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0), settings,
                          on_chunk=reports.append)
  np.testing.assert_array_equal(result.state.iterations, [7, 7, 7])
  np.testing.assert_array_equal(result.state.queries, [7 * per_iteration] * 3)
  assert int(result.oracle_state.queries) == 3 * 7 * per_iteration
  assert [r.iteration for r in reports] == [3, 6, 7]
  assert reports[-1].samples_done == 3


def test_untargeted_attack_crosses_and_stops_there():
  images, labels = images_and_labels(5)
  settings = dataclasses.replace(SETTINGS, stop_at_first_crossing=True)
  state = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0), settings).state
  assert state.crossed.all()
  assert (state.first_crossing.predicted != labels).all()
  assert (state.last_within.predicted == labels).all()
  # Stopped at the first crossing; x^(t-1) is the iterate just before.
  np.testing.assert_array_equal(state.iterations, state.first_crossing.iteration + 1)
  np.testing.assert_array_equal(state.last_within.iteration,
                                state.first_crossing.iteration - 1)
  np.testing.assert_array_equal(state.queries, 17 * state.iterations)
  # stop_margin = 0 (default): the adaptive-stop iterates are never tracked.
  assert (state.near_within.iteration == -1).all()
  assert (state.far_across.iteration == -1).all()
  # The remembered images are the iterates' pixels, with their true L2.
  l2 = np.linalg.norm(state.first_crossing.image - images.reshape(5, -1), axis=1)
  np.testing.assert_allclose(state.first_crossing.l2, l2, rtol=1e-5)
  predicted = np.argmax(ORACLE.query(ORACLE.init(), state.first_crossing.image
                                     .reshape((-1,) + SHAPE))[0], -1)
  np.testing.assert_array_equal(predicted, state.first_crossing.predicted)


def test_targeted_attack_reaches_the_target():
  images, labels = images_and_labels(6)
  target = 1
  keep = labels != target
  settings = dataclasses.replace(SETTINGS, targeted=True, abort_early=False)
  state = zoo.zoo_attack(ORACLE, images[keep], labels[keep], jax.random.key(0),
                         settings, targets=target).state
  assert state.crossed.all()
  assert (state.closest_crossing.predicted == target).all()
  assert (state.first_crossing.predicted == target).all()
  assert (state.closest_crossing.l2 <= state.first_crossing.l2).all()
  assert (state.farthest_within.predicted == labels[keep]).all()


def test_same_key_is_bit_identical_and_other_key_differs():
  images, labels = images_and_labels(3)
  settings = dataclasses.replace(SETTINGS, max_iterations=60)
  first = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(7), settings).state
  second = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(7), settings).state
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
  other = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(8), settings).state
  assert not np.array_equal(first.modifier, other.modifier)


def test_trajectory_does_not_depend_on_batch_mates():
  images, labels = images_and_labels(3)
  settings = dataclasses.replace(SETTINGS, abort_early=False, max_iterations=40)
  run = zoo.compiled_chunk(ORACLE, settings)

  def sample_zero_with(partner):
    index = np.array([0, partner])
    state = zoo_state.zoo_init(images[index], labels[index], jax.random.key(0),
                               settings, sample_ids=index)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[0],
                                  run(state, ORACLE.init())[0]._replace(keys=None))

  jax.tree_util.tree_map(np.testing.assert_array_equal, sample_zero_with(1),
                         sample_zero_with(2))


def test_sample_chunks_and_refill_give_the_same_samples():
  images, labels = images_and_labels(7)
  settings = dataclasses.replace(SETTINGS, stop_at_first_crossing=True)
  together = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0), settings)
  chunked = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0),
                           dataclasses.replace(settings, sample_chunk_size=2,
                                               iterations_per_chunk=7))
  np.testing.assert_array_equal(together.state.iterations, chunked.state.iterations)
  np.testing.assert_array_equal(together.state.queries, chunked.state.queries)
  np.testing.assert_allclose(together.state.first_crossing.image,
                             chunked.state.first_crossing.image, atol=1e-6)
  # Finished and padding rows are masked out: the oracle answered exactly the
  # queries the samples report.
  for result in (together, chunked):
    assert int(result.oracle_state.queries) == int(np.sum(result.state.queries))


def test_inactive_samples_are_never_queried():
  images, labels = images_and_labels(3)
  result = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0),
                          dataclasses.replace(SETTINGS, max_iterations=5),
                          active=np.array([True, False, True]))
  np.testing.assert_array_equal(result.state.queries, [5 * 17, 0, 5 * 17])
  assert int(result.oracle_state.queries) == 2 * 5 * 17
  assert result.state.last_within.iteration[1] == -1


def test_early_abort_stops_a_stalled_sample():
  # A constant model: the margin never moves, w stays 0, the loss stalls.
  oracle = oracle_lib.make_oracle(
      lambda x: jnp.tile(jnp.array([[0.7, 0.1, 0.1, 0.1]]), (x.shape[0], 1)),
      input_shape=SHAPE, num_classes=CLASSES)
  images, _ = images_and_labels(1)
  state = zoo.zoo_attack(oracle, images, np.zeros(1, np.int32), jax.random.key(0),
                         SETTINGS).state
  assert int(state.iterations[0]) == SETTINGS.early_abort_every + 1
  assert not state.crossed[0]


def test_adam_resets_at_first_success():
  images, labels = images_and_labels(2)
  settings = dataclasses.replace(SETTINGS, stop_at_first_crossing=True,
                                 iterations_per_chunk=400)
  state = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0), settings).state
  # Stopped at the first crossing, which is also the first success (kappa = 0):
  # the ADAM state was zeroed after that iteration's update.
  assert state.succeeded.all()
  assert not np.asarray(state.adam.steps).any()
  assert not np.asarray(state.adam.m).any()


def test_labels_only_oracle_is_refused():
  images, labels = images_and_labels(1)
  with pytest.raises(ValueError, match="probabilities"):
    zoo.zoo_attack(linear_oracle(output="labels"), images, labels,
                   jax.random.key(0), SETTINGS)


def test_budget_is_enforced():
  images, labels = images_and_labels(2)
  with pytest.raises(oracle_lib.QueryBudgetExceeded):
    zoo.zoo_attack(linear_oracle(budget=100), images, labels, jax.random.key(0),
                   SETTINGS)


def test_invalid_settings_are_refused():
  with pytest.raises(ValueError, match="solver"):
    zoo.ZooSettings(solver="newton")
  with pytest.raises(ValueError, match="difference"):
    zoo.ZooSettings(difference="central")
  with pytest.raises(ValueError, match="stop_margin"):
    zoo.ZooSettings(stop_margin=1.0)
  with pytest.raises(ValueError, match="targets"):
    zoo_state.zoo_init(*images_and_labels(1), jax.random.key(0),
                 dataclasses.replace(SETTINGS, targeted=True))


def test_careful_log_probabilities():
  p = jnp.array([[1.0, 1e-9, 2e-9, 0.0], [0.25, 0.25, 0.25, 0.25]], jnp.float32)
  logp = margins.log_probabilities(p)
  np.testing.assert_allclose(logp[0, 0], -3e-9, rtol=1e-5)  # Not log(1.0) = 0.
  np.testing.assert_allclose(logp[0, 3], np.log(1e-30), rtol=1e-6)  # +1e-30.
  np.testing.assert_allclose(logp[1], np.log(0.25), rtol=1e-6)


# Random-direction estimator (estimator='directions'; not the released ZOO).
DIRECTIONS = dataclasses.replace(SETTINGS, estimator="directions",
                                 directions_per_iteration=4, direction_h=1e-2)


def draw_directions(key, settings):
  """ZOO's draw for one sample and iteration (as ``zoo.zoo_step``)."""
  return estimators.draw_directions(
      key, settings.directions_per_iteration, SHAPE,
      resolution=settings.direction_resolution,
      distribution=settings.direction_distribution)


def test_direction_probes_are_antithetic_pairs():
  modifier = 0.1 * jax.random.normal(jax.random.key(0), (DIM,))
  anchor = 0.2 * jax.random.normal(jax.random.key(1), (DIM,))
  directions = draw_directions(jax.random.key(2), DIRECTIONS)
  assert directions.shape == (4, DIM)
  probes = estimators.direction_probes(modifier, anchor, directions, DIRECTIONS)
  assert probes.shape == (DIRECTIONS.queries_per_iteration, DIM) == (9, DIM)
  np.testing.assert_allclose(probes[0], np.tanh(modifier + anchor) / 2, rtol=1e-6)
  for i in range(4):
    for row, sign in ((1 + i, 1), (5 + i, -1)):
      np.testing.assert_allclose(
          probes[row], np.tanh(modifier + sign * 1e-2 * directions[i] + anchor) / 2,
          rtol=1e-5, atol=1e-7)


def test_direction_draws():
  rademacher = dataclasses.replace(DIRECTIONS, direction_distribution="rademacher",
                                   directions_per_iteration=3)
  u = np.asarray(draw_directions(jax.random.key(0), rademacher))
  assert u.shape == (3, DIM) and set(np.unique(u)) == {-1.0, 1.0}
  # At resolution 1 every pixel of a channel moves together.
  coarse = dataclasses.replace(DIRECTIONS, direction_resolution=1)
  u = np.asarray(draw_directions(jax.random.key(0), coarse))
  u = u.reshape((4,) + SHAPE)
  np.testing.assert_allclose(u, np.broadcast_to(u[:, :1, :1, :], u.shape), rtol=1e-6)


def test_direction_gradient_is_the_antithetic_estimate():
  """Hand formula on exact losses, and near the true gradient for many directions."""
  logits = linear_logits()
  images, labels = images_and_labels(1)
  anchor = jnp.arctanh(SETTINGS.tanh_scale * jnp.asarray(images[0]).reshape(-1))
  modifier = 0.05 * jax.random.normal(jax.random.key(3), (DIM,))
  cls = int(labels[0])

  @functools.partial(jax.jit, static_argnums=0)
  def estimate(settings, key):
    directions = draw_directions(key, settings)
    probes = estimators.direction_probes(modifier, anchor, directions, settings)
    probabilities = jax.nn.softmax(logits(probes.reshape((-1,) + SHAPE)))
    return directions, estimators.direction_gradient(probabilities, probes, anchor,
                                              directions, cls, settings)

  directions, probe = estimate(DIRECTIONS, jax.random.key(4))
  loss = jax.vmap(functools.partial(reference_loss, anchor=anchor, logits=logits,
                                    cls=cls, settings=DIRECTIONS))
  changes = loss(modifier + 1e-2 * directions) - loss(modifier - 1e-2 * directions)
  by_hand = changes @ directions / (2 * 1e-2 * 4)
  np.testing.assert_allclose(probe.gradient, by_hand, rtol=2e-3,
                             atol=2e-3 * float(jnp.max(jnp.abs(by_hand))))
  np.testing.assert_allclose(probe.loss, loss(modifier[None])[0], rtol=1e-5)
  many = dataclasses.replace(DIRECTIONS, directions_per_iteration=4000,
                             direction_h=1e-3)
  true = jax.grad(lambda w: loss(w[None])[0])(modifier)
  estimated = estimate(many, jax.random.key(5))[1].gradient
  cosine = jnp.dot(estimated, true) / jnp.linalg.norm(estimated) / jnp.linalg.norm(true)
  assert cosine > 0.95


def test_direction_estimator_crosses_with_exact_query_counts():
  images, labels = images_and_labels(5)
  settings = dataclasses.replace(DIRECTIONS, stop_at_first_crossing=True,
                                 iterations_per_chunk=400)  # One compiled chunk.
  result = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0), settings)
  state = result.state
  assert state.crossed.all()
  assert (state.first_crossing.predicted != labels).all()
  assert (state.last_within.predicted == labels).all()
  np.testing.assert_array_equal(state.iterations, state.first_crossing.iteration + 1)
  np.testing.assert_array_equal(state.queries, 9 * state.iterations)
  assert int(result.oracle_state.queries) == int(np.sum(state.queries))
  assert (state.first_crossing.l2 <= 20).all()
  predicted = np.argmax(ORACLE.query(ORACLE.init(), state.first_crossing.image
                                     .reshape((-1,) + SHAPE))[0], -1)
  np.testing.assert_array_equal(predicted, state.first_crossing.predicted)
  # Fewer queries than the released coordinate ZOO on the same samples.
  released = zoo.zoo_attack(ORACLE, images, labels, jax.random.key(0),
                            dataclasses.replace(SETTINGS, stop_at_first_crossing=True))
  assert np.median(state.queries) < np.median(released.state.queries)


def test_query_efficient_settings_are_opt_in():
  assert zoo.ZooSettings().estimator == "coordinates"
  assert zoo.ZooSettings().queries_per_iteration == 257
  settings = zoo.query_efficient_settings(max_iterations=50)
  assert settings.estimator == "directions" and settings.max_iterations == 50
  assert settings.queries_per_iteration == 21
  with pytest.raises(ValueError, match="estimator"):
    zoo.ZooSettings(estimator="nes")
  with pytest.raises(ValueError, match="distribution"):
    zoo.ZooSettings(direction_distribution="uniform")
