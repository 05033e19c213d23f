"""Unlearning methods: Eq. 13 by hand, the released code's behaviour, fine-tuning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import service as service_lib
from ounl_jax import train as train_lib
from ounl_jax import unlearning
from ounl_jax.unlearning import first_order

NUM_CLASSES = 5
SHAPE = (2, 2, 3)  # 12 input features.
HIDDEN = 4


def linear_model() -> models.Model:
  """A two-layer linear classifier: ``features`` (not head) and ``logits`` (head)."""

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"params": {
        "features": {"kernel": jax.random.normal(k1, (12, HIDDEN)) * 0.5},
        "logits": {"kernel": jax.random.normal(k2, (HIDDEN, NUM_CLASSES)) * 0.5,
                   "bias": jax.random.normal(k3, (NUM_CLASSES,)) * 0.1}},
            "batch_stats": {}}

  def apply(variables, x, *, train=False, rngs=None):
    del rngs
    p = variables["params"]
    h = x.reshape((x.shape[0], -1)) @ p["features"]["kernel"]
    logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]
    return (logits, variables["batch_stats"]) if train else logits

  return models.Model("linear", init, apply, SHAPE, NUM_CLASSES)


LINEAR = linear_model()


def as64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def hand_gradients(params, x, y, weights):
  """sum_i w_i grad L(x_i, y_i) of the linear model, written out in numpy."""
  p = as64(params)
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  h = x @ p["features"]["kernel"]
  logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  g = (prob - np.eye(NUM_CLASSES)[y]) * np.asarray(weights, np.float64)[:, None]
  return {"features": {"kernel": x.T @ (g @ p["logits"]["kernel"].T)},
          "logits": {"kernel": h.T @ g, "bias": g.sum(0)}}


def hand_eq13(params, x, y, x_hat, hat_weights, *, tau, reduction, scope):
  """theta - tau * (sum w_hat grad L(z_hat) - sum grad L(z)), Eq. 13 by hand."""
  g_hat = hand_gradients(params, x_hat, y, hat_weights)
  g = hand_gradients(params, x, y, np.ones(len(y)))
  scale = 1.0 / len(y) if reduction == "mean" else 1.0
  p = as64(params)
  expected = {}
  for layer in p:
    in_scope = scope == "all" or layer == "logits"
    expected[layer] = {
        name: (value - tau * scale * (g_hat[layer][name] - g[layer][name])
               if in_scope else value)
        for name, value in p[layer].items()}
  return expected


@pytest.fixture(scope="module")
def linear_setup():
  variables = LINEAR.init(jax.random.key(0))
  x = np.asarray(jax.random.uniform(jax.random.key(1), (300,) + SHAPE,
                                    minval=-0.5, maxval=0.5))
  y = np.asarray(jax.random.randint(jax.random.key(2), (300,), 0, NUM_CLASSES))
  return variables, x, y


def assert_params_close(got, expected):
  for layer in expected:
    for name in expected[layer]:
      np.testing.assert_allclose(np.asarray(got[layer][name], np.float64),
                                 expected[layer][name], rtol=2e-5, atol=2e-6,
                                 err_msg=f"{layer}/{name}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("scope", ["head", "all"])
def test_first_order_equals_eq13_by_hand(linear_setup, reduction, scope):
  variables, x, y = linear_setup
  x, y = x[:40], y[:40]
  settings = unlearning.FirstOrderSettings(tau=1e-2, reduction=reduction,
                                           scope=scope, replacement="noise",
                                           batch_size=16)
  key = jax.random.key(7)
  x_hat = first_order.replacement_images(key, jnp.asarray(x), replacement="noise")
  new = unlearning.first_order_unlearn(LINEAR, variables, x, y, key,
                                       settings=settings)
  expected = hand_eq13(variables["params"], x, y, x_hat, np.ones(40), tau=1e-2,
                       reduction=reduction, scope=scope)
  assert_params_close(new["params"], expected)
  kernel = np.asarray(new["params"]["features"]["kernel"])
  original = np.asarray(variables["params"]["features"]["kernel"])
  if scope == "head":  # Out of scope: bit-identical.
    assert kernel.tobytes() == original.tobytes()
  else:
    assert not np.array_equal(kernel, original)
  assert not np.array_equal(new["params"]["logits"]["kernel"],
                            variables["params"]["logits"]["kernel"])


@pytest.mark.parametrize("replacement, shared", [("noise", False),
                                                  ("white", True)])
def test_other_replacements_by_hand(linear_setup, replacement, shared):
  variables, x, y = linear_setup
  x, y = x[:40], y[:40]
  key = jax.random.key(8)
  settings = unlearning.FirstOrderSettings(tau=1e-2, scope="all",
                                           replacement=replacement,
                                           shared_noise=shared, batch_size=16)
  x_hat = first_order.replacement_images(key, jnp.asarray(x),
                                         replacement=replacement,
                                         shared_noise=shared)
  new = unlearning.first_order_unlearn(LINEAR, variables, x, y, key,
                                       settings=settings)
  assert_params_close(new["params"], hand_eq13(
      variables["params"], x, y, x_hat, np.ones(40), tau=1e-2, reduction="sum",
      scope="all"))


def test_sum_is_n_times_mean_step(linear_setup):
  variables, x, y = linear_setup
  x, y = x[:50], y[:50]
  key = jax.random.key(3)
  base = dataclasses.replace(unlearning.FirstOrderSettings(), replacement="black")
  summed = unlearning.first_order_unlearn(LINEAR, variables, x, y, key,
                                          settings=base)
  mean = unlearning.first_order_unlearn(
      LINEAR, variables, x, y, key,
      settings=dataclasses.replace(base, reduction="mean", tau=base.tau * 50))
  np.testing.assert_allclose(summed["params"]["logits"]["kernel"],
                             mean["params"]["logits"]["kernel"], rtol=1e-5,
                             atol=1e-7)


def test_replacement_weights_follow_the_released_code():
  weights = lambda n, ref: np.asarray(first_order.replacement_weights(
      n, replacement="noise", reference_code=ref))
  # docs/protocol.md §5: 400 = 256 + 144, 2000 = 7 * 256 + 208.
  assert weights(400, True).sum() == 144 and weights(400, True)[:256].sum() == 0
  assert weights(2000, True).sum() == 208
  assert weights(200, True).sum() == 200 and weights(512, True).sum() == 0
  assert weights(400, False).sum() == 400
  assert np.asarray(first_order.replacement_weights(
      10, replacement="none", reference_code=False)).sum() == 0


@pytest.mark.parametrize("count,batch,kept", [
    # Hand counts: N - batch * floor(N / batch) samples keep their noise term.
    (100, 256, 100), (300, 256, 44), (400, 256, 144),
    (100, 64, 36), (300, 128, 44), (400, 144, 112),
])
def test_noise_term_share_at_any_n(count, batch, kept):
  code = unlearning.FirstOrderSettings(reference_code=True,
                                       reference_batch_size=batch)
  assert unlearning.noise_term_count(count, code) == kept
  weights = np.asarray(first_order.replacement_weights(
      count, replacement="noise", reference_code=True, reference_batch_size=batch))
  assert weights.sum() == kept and weights[count - kept:].all()
  paper = unlearning.FirstOrderSettings(reference_batch_size=batch)
  assert unlearning.noise_term_count(count, paper) == count


def test_reference_batch_size_moves_the_dropped_noise_terms(linear_setup):
  variables, x, y = linear_setup
  x, y = x[:100], y[:100]  # 100 = 64 + 36: the first 64 lose their noise term.
  key = jax.random.key(3)
  code = unlearning.FirstOrderSettings(tau=1e-3, scope="all", reference_code=True,
                                       reference_batch_size=64)
  x_hat = first_order.replacement_images(key, jnp.asarray(x), replacement="noise")
  got = unlearning.first_order_unlearn(LINEAR, variables, x, y, key, settings=code)
  assert_params_close(got["params"], hand_eq13(
      variables["params"], x, y, x_hat, np.r_[np.zeros(64), np.ones(36)], tau=1e-3,
      reduction="sum", scope="all"))


def test_negative_or_zero_tau_is_refused():
  for tau in (-1.0, 0.0):
    with pytest.raises(ValueError, match="tau must be > 0"):
      unlearning.FirstOrderSettings(tau=tau)


def test_reference_code_drops_noise_on_full_batches_only(linear_setup):
  variables, x, y = linear_setup  # 300 = 256 + 44.
  key = jax.random.key(11)
  paper = unlearning.FirstOrderSettings(tau=1e-3, scope="all")
  code = dataclasses.replace(paper, reference_code=True)
  x_hat = first_order.replacement_images(key, jnp.asarray(x), replacement="noise")
  got_code = unlearning.first_order_unlearn(LINEAR, variables, x, y, key,
                                            settings=code)
  got_paper = unlearning.first_order_unlearn(LINEAR, variables, x, y, key,
                                             settings=paper)
  hat_weights = np.r_[np.zeros(256), np.ones(44)]
  assert_params_close(got_code["params"], hand_eq13(
      variables["params"], x, y, x_hat, hat_weights, tau=1e-3, reduction="sum",
      scope="all"))
  # The difference is exactly tau * sum_{i < 256} grad L(z_hat_i).
  lost = hand_gradients(variables["params"], x_hat[:256], y[:256], np.ones(256))
  np.testing.assert_allclose(
      np.asarray(got_code["params"]["logits"]["kernel"], np.float64)
      - np.asarray(got_paper["params"]["logits"]["kernel"], np.float64),
      1e-3 * lost["logits"]["kernel"], rtol=1e-3, atol=1e-6)


def test_reference_code_is_gradient_ascent_on_full_batches(linear_setup):
  variables, x, y = linear_setup
  x2, y2 = np.concatenate([x, x[:212]]), np.concatenate([y, y[:212]])  # 512.
  key = jax.random.key(5)
  code = unlearning.FirstOrderSettings(reference_code=True, scope="all")
  ascent = unlearning.GradientAscentSettings(scope="all")
  got = unlearning.first_order_unlearn(LINEAR, variables, x2, y2, key,
                                       settings=code)
  want = unlearning.gradient_ascent_unlearn(LINEAR, variables, x2, y2, key,
                                            settings=ascent)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  # A single partial batch keeps every noise term: identical to the paper.
  small = dict(settings=unlearning.FirstOrderSettings(reference_code=True))
  paper = dict(settings=unlearning.FirstOrderSettings())
  a = unlearning.first_order_unlearn(LINEAR, variables, x[:200], y[:200], key, **small)
  b = unlearning.first_order_unlearn(LINEAR, variables, x[:200], y[:200], key, **paper)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_gradient_ascent_by_hand(linear_setup):
  variables, x, y = linear_setup
  x, y = x[:30], y[:30]
  settings = unlearning.GradientAscentSettings(tau=1e-2, scope="all")
  new = unlearning.unlearn("gradient_ascent", LINEAR, variables, x, y,
                           jax.random.key(0), settings)
  g = hand_gradients(variables["params"], x, y, np.ones(30))
  p = as64(variables["params"])
  expected = {layer: {n: p[layer][n] + 1e-2 * g[layer][n] for n in p[layer]}
              for layer in p}
  assert_params_close(new["params"], expected)


def test_noise_replacements_are_seeded_uint8_noise():
  images = jnp.zeros((6,) + SHAPE)
  key = jax.random.key(0)
  shared = np.asarray(first_order.replacement_images(key, images,
                                                     replacement="noise"))
  again = np.asarray(first_order.replacement_images(key, images,
                                                    replacement="noise"))
  other = np.asarray(first_order.replacement_images(jax.random.key(1), images,
                                                    replacement="noise"))
  own = np.asarray(first_order.replacement_images(key, images, replacement="noise",
                                                  shared_noise=False))
  np.testing.assert_array_equal(shared, again)
  assert not np.array_equal(shared, other)
  assert all(np.array_equal(shared[0], s) for s in shared)  # One image, replicated.
  assert not np.array_equal(own[0], own[1])
  levels = (shared + 0.5) * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert shared.min() >= -0.5 and shared.max() <= 0.5
  for name, value in (("black", -0.5), ("white", 0.5)):
    assert np.all(np.asarray(first_order.replacement_images(
        key, images, replacement=name)) == value)


def test_batching_and_steps(linear_setup):
  variables, x, y = linear_setup
  x, y = x[:30], y[:30]
  key = jax.random.key(9)
  one = unlearning.FirstOrderSettings(tau=1e-2)
  small_batches = unlearning.first_order_unlearn(
      LINEAR, variables, x, y, key,
      settings=dataclasses.replace(one, batch_size=7))
  whole = unlearning.first_order_unlearn(LINEAR, variables, x, y, key, settings=one)
  np.testing.assert_allclose(small_batches["params"]["logits"]["kernel"],
                             whole["params"]["logits"]["kernel"], rtol=1e-5)
  twice = unlearning.first_order_unlearn(LINEAR, whole, x, y, key, settings=one)
  two_steps = unlearning.first_order_unlearn(
      LINEAR, variables, x, y, key, settings=dataclasses.replace(one, steps=2))
  np.testing.assert_allclose(two_steps["params"]["logits"]["kernel"],
                             twice["params"]["logits"]["kernel"], rtol=1e-5)


def test_no_recompilation_for_the_same_shapes(linear_setup):
  variables, x, y = linear_setup
  settings = unlearning.FirstOrderSettings(tau=3e-4)
  unlearning.first_order_unlearn(LINEAR, variables, x[:20], y[:20],
                                 jax.random.key(0), settings=settings)
  size = unlearning.first_order_unlearn._cache_size()
  unlearning.first_order_unlearn(LINEAR, variables, x[20:40], y[20:40],
                                 jax.random.key(1), settings=settings)
  assert unlearning.first_order_unlearn._cache_size() == size


@pytest.fixture(scope="module")
def tiny_vgg():
  model = models.get_model("vgg3", num_classes=NUM_CLASSES, width=2,
                           input_shape=(8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0))
  # Non-trivial BatchNorm statistics, so inference vs training mode differ.
  variables["batch_stats"] = jax.tree_util.tree_map(
      lambda s: s + 0.3, variables["batch_stats"])
  x = np.asarray(jax.random.uniform(jax.random.key(1), (12, 8, 8, 3),
                                    minval=-0.5, maxval=0.5))
  y = np.arange(12) % NUM_CLASSES
  return model, variables, x, y


def test_first_order_on_vgg_matches_per_sample_gradients(tiny_vgg):
  """Inference-mode BatchNorm: the batched update equals a per-sample sum."""
  model, variables, x, y = tiny_vgg
  key = jax.random.key(4)
  settings = unlearning.FirstOrderSettings(tau=1e-2, scope="all")
  new = unlearning.first_order_unlearn(model, variables, x, y, key,
                                       settings=settings)
  x_hat = first_order.replacement_images(key, jnp.asarray(x), replacement="noise")

  def loss(params, image, label):
    logits = model.apply({**variables, "params": params}, image[None])
    return train_lib.cross_entropy(logits, label[None])[0]

  grad = jax.jit(jax.grad(loss))
  total = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
  for i in range(len(y)):
    diff = jax.tree_util.tree_map(jnp.subtract,
                                  grad(variables["params"], x_hat[i], y[i]),
                                  grad(variables["params"], x[i], y[i]))
    total = jax.tree_util.tree_map(jnp.add, total, diff)
  expected = jax.tree_util.tree_map(lambda p, d: p - 1e-2 * d,
                                    variables["params"], total)
  for a, b in zip(jax.tree_util.tree_leaves(new["params"]),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(new["batch_stats"]),
                  jax.tree_util.tree_leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)


def test_head_scope_touches_exactly_the_last_six_tensors(tiny_vgg):
  model, variables, x, y = tiny_vgg
  new = unlearning.unlearn("first_order", model, variables, x, y, jax.random.key(0),
                           unlearning.FirstOrderSettings(tau=1e-2))
  flat_old = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  flat_new = jax.tree_util.tree_leaves(new["params"])
  changed = {jax.tree_util.keystr(path) for (path, old), now in zip(flat_old, flat_new)
             if np.asarray(old).tobytes() != np.asarray(now).tobytes()}
  assert len(changed) == 6
  assert all(any(layer in c for layer in models.HEAD_LAYERS) for c in changed)


def test_random_wrong_labels_never_equal_the_true_label():
  labels = jnp.asarray(np.arange(20000) % 10)
  wrong = np.asarray(unlearning.random_wrong_labels(jax.random.key(0), labels, 10))
  assert np.all(wrong != np.asarray(labels))
  assert wrong.min() >= 0 and wrong.max() <= 9
  # Uniform over the 9 other classes: each about 1/9 of class 0's relabels.
  counts = np.bincount(wrong[np.asarray(labels) == 0], minlength=10)[1:]
  assert counts.min() > 150 and counts.max() < 300  # 2000 / 9 = 222.
  used = np.asarray(unlearning.fine_tune_labels(jax.random.key(1), labels, 10))
  assert np.all(used != np.asarray(labels))


def test_fine_tune_updates_everything_in_training_mode(tiny_vgg):
  model, variables, x, y = tiny_vgg
  settings = unlearning.FineTuneSettings(batch_size=5)  # 12 = 5 + 5 + 2.
  a = unlearning.fine_tune_unlearn(model, variables, x, y, jax.random.key(0),
                                   settings=settings)
  b = unlearning.fine_tune_unlearn(model, variables, x, y, jax.random.key(0),
                                   settings=settings)
  c = unlearning.fine_tune_unlearn(model, variables, x, y, jax.random.key(1),
                                   settings=settings)
  for old, new, same in zip(jax.tree_util.tree_leaves(variables),
                            jax.tree_util.tree_leaves(a),
                            jax.tree_util.tree_leaves(b)):
    assert not np.array_equal(old, new)  # All parameters and BN statistics move.
    np.testing.assert_array_equal(new, same)  # Seeded.
  assert not np.array_equal(a["params"]["logits"]["kernel"],
                            c["params"]["logits"]["kernel"])


def test_registry_and_settings_errors(linear_setup):
  variables, x, y = linear_setup
  assert set(unlearning.METHODS) == {"first_order", "fine_tune", "gradient_ascent"}
  assert unlearning.default_settings("first_order").tau == 2e-4
  with pytest.raises(ValueError, match="first_order"):
    unlearning.get_method("first_ordr")
  with pytest.raises(ValueError, match="FirstOrderSettings"):
    unlearning.unlearn("first_order", LINEAR, variables, x, y, jax.random.key(0),
                       unlearning.FineTuneSettings())
  with pytest.raises(ValueError, match="scope"):
    unlearning.FirstOrderSettings(scope="body")
  with pytest.raises(ValueError, match="replacement"):
    unlearning.FirstOrderSettings(replacement="gray")
  with pytest.raises(ValueError, match="reduction"):
    unlearning.GradientAscentSettings(reduction="max")


def submitted_log_likelihood(model, variables, unlearn_set):
  probs = service_lib.predict_probabilities(model, variables, unlearn_set.images)
  return np.log(probs[np.arange(len(unlearn_set)), unlearn_set.labels]).mean()


@pytest.mark.realdata
def test_normal_unlearning_is_gentle_on_real_cifar10(trained_vgg):
  """10% of airplanes, first-order update: class A drops only a few points.

  The fixture's model (width 16, 3 epochs, ~44% test accuracy) is far less trained
  than the paper's. On it the released tau=2e-4 with summed gradients takes ~29
  points off airplane (and ~37 off frog, through the noise term), so this test uses
  Warnecke's CIFAR tau=2e-5 (docs/protocol.md §7); the other settings are the
  released code's. (On the cpu-scale model, 12 epochs, tau=2e-4 costs airplane 2.2
  points for 10%.)
  """
  splits = trained_vgg.splits
  unlearn_set = data_lib.select_unlearn_set(splits.train, 0, 0.1, 88)
  server = service_lib.UnlearningService(
      trained_vgg.model, trained_vgg.variables, splits.test,
      key=jax.random.key(88), method="first_order",
      settings=unlearning.FirstOrderSettings(tau=first_order.WARNECKE_CIFAR_TAU))
  rows = np.arange(len(unlearn_set))
  likelihood = lambda: np.log(server.predict(unlearn_set.images)[
      rows, unlearn_set.labels]).mean()
  before = server.evaluate(class_a=0)
  np.testing.assert_array_equal(before.report.predictions,
                                trained_vgg.test_eval.predictions)
  likelihood_before = likelihood()
  server.unlearn(service_lib.UnlearningRequest(unlearn_set.images,
                                               unlearn_set.labels))
  after = server.evaluate(class_a=0)
  drop = before.report.class_a_accuracy - after.report.class_a_accuracy
  assert -0.01 <= drop <= 0.05, (before.report, after.report)
  others = np.delete(after.report.per_class_accuracy
                     - before.report.per_class_accuracy, 0)
  assert np.mean(np.abs(others)) <= 0.02 and np.max(np.abs(others)) <= 0.07, others
  assert abs(after.report.accuracy - before.report.accuracy) <= 0.01
  assert after.histogram.sum() == before.histogram.sum()
  # The update did act: the submitted samples became less likely.
  assert likelihood() < likelihood_before - 0.005


@pytest.mark.realdata
def test_fine_tune_forgets_the_submitted_samples(trained_vgg):
  """Default settings (1 epoch, 2 SGD steps here): true labels become less likely."""
  splits = trained_vgg.splits
  unlearn_set = data_lib.select_unlearn_set(splits.train, 0, 0.1, 88)
  new = unlearning.unlearn("fine_tune", trained_vgg.model, trained_vgg.variables,
                           unlearn_set.images, unlearn_set.labels,
                           jax.random.key(88))
  acc = lambda v: evaluation.accuracy(
      evaluation.predict_labels(trained_vgg.model, v, unlearn_set.images),
      unlearn_set.labels)
  assert acc(new) < acc(trained_vgg.variables)
  assert (submitted_log_likelihood(trained_vgg.model, new, unlearn_set)
          < submitted_log_likelihood(trained_vgg.model, trained_vgg.variables,
                                     unlearn_set) - 0.03)


def test_head_scope_needs_a_head():
  params = {"conv": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="scope='all'"):
    first_order.scope_mask(params, "head")
  assert first_order.scope_mask(params, "all") == {"conv": {"kernel": True}}
