"""The MLaaS server: predict/unlearn boundary, request validation, evaluation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax import service as service_lib
from ounl_jax import unlearning

SHAPE = (8, 8, 3)
K = 4


@pytest.fixture(scope="module")
def setup():
  model = models.get_model("vgg3", num_classes=K, width=2, input_shape=SHAPE)
  variables = jax.jit(model.init)(jax.random.key(0))
  x = np.asarray(jax.random.uniform(jax.random.key(1), (40,) + SHAPE,
                                    minval=-0.5, maxval=0.5))
  y = (np.arange(40) % K).astype(np.int32)
  test = data_lib.LabelledImages(x, y, np.arange(40))
  return model, variables, test


def make_service(setup, **kwargs):
  model, variables, test = setup
  kwargs.setdefault("settings", unlearning.FirstOrderSettings(tau=1e-2))
  return service_lib.UnlearningService(model, variables, test,
                                       key=jax.random.key(88), **kwargs)


def request(n=6, seed=2):
  x = np.asarray(jax.random.uniform(jax.random.key(seed), (n,) + SHAPE,
                                    minval=-0.5, maxval=0.5))
  return service_lib.UnlearningRequest(x, np.zeros(n, np.int32))


def test_predict_returns_probabilities_or_labels(setup):
  service = make_service(setup)
  x = request().images
  probs = service.predict(x)
  assert probs.shape == (6, K)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(service.predict(x), probs)  # No hidden state.
  labels = make_service(setup, output="labels").predict(x)
  np.testing.assert_array_equal(labels, np.argmax(probs, 1))


def test_unlearn_changes_the_model_and_returns_a_receipt(setup):
  service = make_service(setup)
  x = setup[2].images
  before = service.predict(x)
  receipt = service.unlearn(request())
  assert receipt.request_number == 0 and receipt.method == "first_order"
  assert receipt.num_samples == 6 and receipt.seconds > 0
  assert receipt.settings["tau"] == 1e-2
  after = service.predict(x)
  assert not np.allclose(before, after)
  assert service.unlearn(request(seed=3)).request_number == 1
  assert service.requests_served == 2


def test_unlearn_is_the_pure_method_with_the_request_key(setup):
  model, variables, _ = setup
  service = make_service(setup)
  req = request()
  service.unlearn(req)
  expected = unlearning.unlearn(
      "first_order", model, variables, req.images, req.labels,
      jax.random.fold_in(jax.random.key(88), 0),
      unlearning.FirstOrderSettings(tau=1e-2))
  np.testing.assert_allclose(
      service.predict(req.images),
      service_lib.predict_probabilities(model, expected, req.images), rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda r: (r.images[:0], r.labels[:0]), "Empty"),
    (lambda r: (r.images[:, :4], r.labels), "shape"),
    (lambda r: (r.images[0], r.labels[:1]), "shape"),
    (lambda r: ((r.images + 0.5) * 255, r.labels), "uint8"),
    (lambda r: (r.images + 0.2, r.labels), r"\[-0.5, 0.5\]"),
    (lambda r: (np.where(np.arange(6)[:, None, None, None] == 2, np.nan, r.images),
                r.labels), "NaN"),
    (lambda r: (r.images, np.full(6, K, np.int32)), "outside"),
    (lambda r: (r.images, np.full(6, -1, np.int32)), "outside"),
    (lambda r: (r.images, r.labels.astype(np.float32)), "integer"),
    (lambda r: (r.images, r.labels[:5]), "Expected 6 labels"),
    (lambda r: (r.images, np.eye(K, dtype=np.int32)[r.labels]), "one-hot"),
    (lambda r: r.images, "pair"),
])
def test_bad_requests_fail_clearly_and_leave_the_model_unchanged(setup, bad, match):
  service = make_service(setup)
  x = setup[2].images
  before = service.predict(x)
  with pytest.raises(service_lib.InvalidRequestError, match=match):
    service.unlearn(bad(request()))
  np.testing.assert_array_equal(service.predict(x), before)
  assert service.requests_served == 0


def test_predict_validates_images(setup):
  service = make_service(setup)
  with pytest.raises(service_lib.InvalidRequestError, match="Empty"):
    service.predict(np.zeros((0,) + SHAPE, np.float32))
  with pytest.raises(service_lib.InvalidRequestError, match="NaN"):
    service.predict(np.full((1,) + SHAPE, np.nan, np.float32))


def test_divergence_keeps_the_model(setup):
  def diverging_unlearn(model, variables, images, labels, key, *, settings):
    del model, images, labels, key, settings
    return jax.tree_util.tree_map(lambda p: p * jnp.inf, variables)

  method = unlearning.Method("diverging", diverging_unlearn,
                             unlearning.FirstOrderSettings)
  service = make_service(setup, method=method)
  x = setup[2].images
  before = service.predict(x)
  with pytest.raises(service_lib.UnlearningDiverged, match="unchanged"):
    service.unlearn(request())
  np.testing.assert_array_equal(service.predict(x), before)


def test_settings_must_match_the_method(setup):
  with pytest.raises(ValueError, match="FineTuneSettings"):
    make_service(setup, method="fine_tune")
  with pytest.raises(ValueError, match="Unknown unlearning method"):
    make_service(setup, method="retrain", settings=None)
  service = make_service(setup, method="fine_tune", settings=None)
  assert service.method == "fine_tune"
  assert service.settings == unlearning.FineTuneSettings()


def test_oracle_answers_like_predict_counts_and_hides_parameters(setup):
  service = make_service(setup)
  oracle = service.oracle(budget=10)
  x = request().images
  answers, state = jax.jit(oracle.query)(oracle.init(), x)
  np.testing.assert_allclose(answers, service.predict(x), rtol=1e-5, atol=1e-7)
  assert int(state.queries) == 6 and oracle.budget == 10
  assert not any(isinstance(leaf, (np.ndarray, jax.Array))
                 for leaf in jax.tree_util.tree_leaves(oracle))
  with pytest.raises(oracle_lib.QueryBudgetExceeded):
    oracle.query(state, x)
  # The oracle is a snapshot: unlearning does not change a handed-out oracle.
  service.unlearn(request())
  again, _ = oracle.query(oracle.init(), x)
  np.testing.assert_allclose(again, answers, rtol=1e-5, atol=1e-7)
  fresh, _ = service.oracle().query(service.oracle().init(), x)
  np.testing.assert_allclose(fresh, service.predict(x), rtol=1e-5, atol=1e-7)


def test_evaluate_reports_against_the_clean_model(setup):
  service = make_service(setup)
  test = setup[2]
  clean = service.evaluate(class_a=1)
  assert clean.histogram.sum() == clean.histogram[1]
  assert clean.histogram[1] == np.sum((clean.report.predictions == 1)
                                      & (test.labels == 1))
  service.unlearn(service_lib.UnlearningRequest(test.images[:8],
                                                test.labels[:8]))
  after = service.evaluate(class_a=1)
  assert after.histogram.sum() == clean.histogram.sum()
  assert after.report.accuracy == evaluation.accuracy(after.report.predictions,
                                                      test.labels)


def test_prediction_histogram_by_hand():
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 0])
  clean = np.array([0, 0, 0, 2, 1, 0, 2, 0])  # Clean gets 0 right on 4 samples.
  after = np.array([0, 2, 1, 0, 1, 1, 0, 2])
  hist = evaluation.prediction_histogram(clean, after, labels, 0, 3)
  np.testing.assert_array_equal(hist, [1, 1, 2])
  assert hist.sum() == 4
  assert evaluation.class_accuracy(after, labels, 0) == 0.4
  assert evaluation.accuracy_without_class(after, labels, 0) == pytest.approx(2 / 3)
  np.testing.assert_allclose(
      evaluation.per_class_accuracy(after, labels, 4), [0.4, 1.0, 0.0, np.nan])
  report = evaluation.report(after, labels, 4, class_a=0)
  assert report.accuracy == 0.5
  named = report.to_dict(("a", "b", "c", "d"))
  assert named["per_class_accuracy"]["b"] == 1.0
  assert named["class_a_accuracy"] == 0.4


def test_receipt_is_frozen(setup):
  receipt = make_service(setup).unlearn(request())
  with pytest.raises(dataclasses.FrozenInstanceError):
    receipt.num_samples = 0


# ----------------------------------------------------------------------------------
# Request bounds: size, dtype, duplicates (every refusal leaves the model bit-identical)


def test_fingerprint_is_bit_exact(setup):
  model, variables, _ = setup
  service = make_service(setup)
  assert service.model_fingerprint() == service_lib.fingerprint(variables)
  # One ulp in one leaf changes it.
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  first = np.asarray(leaves[0]).copy()
  first.flat[0] = np.nextafter(first.flat[0], np.float32(1))
  nudged = jax.tree_util.tree_unflatten(treedef, [first] + leaves[1:])
  assert service_lib.fingerprint(nudged) != service_lib.fingerprint(variables)


class NoCopy:
  """An array-like that fails the test if anything converts it to an array."""

  def __init__(self, shape):
    self.shape = shape
    self.dtype = np.dtype(np.float32)

  def __array__(self, *args, **kwargs):
    raise AssertionError("the request was copied before its size was checked")


def test_oversized_request_is_refused_before_any_copy(setup):
  service = make_service(setup, limits=service_lib.RequestLimits(
      max_request_images=5))
  before = service.model_fingerprint()
  with pytest.raises(service_lib.InvalidRequestError, match="limit of 5 images"):
    service.unlearn((NoCopy((6,) + SHAPE), np.zeros(6, np.int32)))
  with pytest.raises(service_lib.InvalidRequestError, match="limit of 5 images"):
    service.predict(NoCopy((6,) + SHAPE))
  # The default limit is documented and large enough for the paper's 2,000.
  assert service_lib.RequestLimits().max_request_images == 10_000
  with pytest.raises(service_lib.InvalidRequestError, match="10000"):
    make_service(setup).unlearn((NoCopy((10_001,) + SHAPE),
                                 np.zeros(10_001, np.int32)))
  # Exactly at the limit is served.
  assert service.unlearn(request(n=5)).num_samples == 5
  assert service.model_fingerprint() != before
  with pytest.raises(ValueError, match=">= 1"):
    service_lib.RequestLimits(max_request_images=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32, bool])
def test_integer_images_are_refused_with_the_mapping(setup, dtype):
  service = make_service(setup)
  before = service.model_fingerprint()
  zeros = np.zeros((3,) + SHAPE, dtype)   # Would have been "mid-grey" before.
  with pytest.raises(service_lib.InvalidRequestError,
                     match=r"float32 pixels mapped as x / 255 - 0.5"):
    service.unlearn((zeros, np.zeros(3, np.int32)))
  with pytest.raises(service_lib.InvalidRequestError, match="floating point"):
    service.predict(zeros)
  assert service.model_fingerprint() == before
  assert service.requests_served == 0


def test_float64_and_lists_are_still_accepted(setup):
  service = make_service(setup)
  req = request(n=2)
  probs = service.predict(req.images)
  np.testing.assert_allclose(service.predict(req.images.astype(np.float64)), probs,
                             rtol=1e-6)
  np.testing.assert_allclose(service.predict(req.images.tolist()), probs,
                             rtol=1e-6)


def test_duplicate_images_are_refused_by_default(setup):
  service = make_service(setup)
  before = service.model_fingerprint()
  req = request(n=6)
  images = req.images.copy()
  images[4] = images[1]
  images[5] = images[1]
  with pytest.raises(service_lib.InvalidRequestError,
                     match=r"2 duplicate images \(1 images sent more than once, "
                           r"e.g. indices \[1, 4, 5\]\)"):
    service.unlearn((images, req.labels))
  # 50 copies of one image, even with different labels.
  fifty = np.repeat(req.images[:1], 50, axis=0)
  with pytest.raises(service_lib.InvalidRequestError, match="49 duplicate"):
    service.unlearn((fifty, np.arange(50, dtype=np.int32) % K))
  # -0.0 and 0.0 are the same pixel value.
  zero = np.zeros((2,) + SHAPE, np.float32)
  zero[1, 0, 0, 0] = -0.0
  with pytest.raises(service_lib.InvalidRequestError, match="1 duplicate"):
    service.unlearn((zero, np.zeros(2, np.int32)))
  assert service.model_fingerprint() == before
  assert service.requests_served == 0
  # Differing in one pixel by one ulp is not an exact duplicate, but the ledger
  # sees the same sample within its tolerance.
  images = np.repeat(req.images[:1], 2, axis=0)
  images[1, 0, 0, 0] = np.nextafter(images[1, 0, 0, 0], np.float32(0))
  with pytest.raises(service_lib.AlreadyUnlearned, match="index 1 repeats 0"):
    service.unlearn((images, np.zeros(2, np.int32)))
  # With an exact-only ledger (tolerance 0) it is a different image.
  exact = make_service(setup, limits=service_lib.RequestLimits(
      duplicate_tolerance=0.0))
  assert exact.unlearn((images, np.zeros(2, np.int32))).num_samples == 2


def test_duplicates_can_be_allowed_and_then_count_twice(setup):
  model, variables, _ = setup
  service = make_service(setup, limits=service_lib.RequestLimits(
      allow_duplicates=True))
  req = request(n=1)
  twice = np.repeat(req.images, 2, axis=0)
  assert service.unlearn((twice, np.zeros(2, np.int32))).num_samples == 2
  expected = unlearning.unlearn(
      "first_order", model, variables, twice, np.zeros(2, np.int32),
      jax.random.fold_in(jax.random.key(88), 0),
      unlearning.FirstOrderSettings(tau=1e-2))
  assert service.model_fingerprint() == service_lib.fingerprint(
      jax.block_until_ready(expected))


def test_duplicate_groups_by_hand():
  x = np.zeros((5, 2, 2, 1), np.float32)
  x[1] += 0.1
  x[3] += 0.1
  x[4] += 0.2
  assert service_lib.duplicate_groups(x) == [[0, 2], [1, 3]]


def _sequential(setup, requests):
  """The pure method applied to ``requests`` in order, keys 0, 1, ..."""
  model, variables, _ = setup
  for number, req in enumerate(requests):
    variables = jax.block_until_ready(unlearning.unlearn(
        "first_order", model, variables, req.images, req.labels,
        jax.random.fold_in(jax.random.key(88), number),
        unlearning.FirstOrderSettings(tau=1e-2)))
  return variables


def test_concurrent_unlearns_are_applied_one_at_a_time_in_receipt_order(setup):
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from ounl_jax.defences import screening  # pylint: disable=g-import-not-at-top

  def slow_score(images, labels):  # Widens the window in which updates race.
    time.sleep(0.2)
    return np.zeros(len(labels))
  service = make_service(setup, screens=[screening.Screen(
      "slow", slow_score, 1.0, "never flags")])
  requests = [request(seed=10 + i) for i in range(3)]
  barrier = threading.Barrier(len(requests))
  receipts = [None] * len(requests)

  def worker(i):
    barrier.wait()
    receipts[i] = service.unlearn(requests[i])
  threads = [threading.Thread(target=worker, args=(i,))
             for i in range(len(requests))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  numbers = [r.request_number for r in receipts]
  assert sorted(numbers) == [0, 1, 2] and service.requests_served == 3
  in_receipt_order = [requests[numbers.index(n)] for n in range(3)]
  assert service.model_fingerprint() == service_lib.fingerprint(
      _sequential(setup, in_receipt_order))
  assert service.samples_unlearned == 18


def test_a_model_answering_non_finite_values_is_refused(setup):
  model, variables, test = setup
  settings = unlearning.FirstOrderSettings(tau=1e30)
  req = request()
  # The case: finite parameters, NaN/inf answers.
  updated = unlearning.unlearn("first_order", model, variables, req.images,
                               req.labels, jax.random.fold_in(jax.random.key(88), 0),
                               settings)
  assert service_lib._all_finite(updated)  # pylint: disable=protected-access
  assert service_lib.non_finite_answers(model, updated, test.images) > 0
  with pytest.raises(evaluation.NonFiniteOutputs, match="NaN or infinite"):
    evaluation.predict_labels(model, updated, test.images)
  service = make_service(setup, settings=settings)
  before = service.model_fingerprint()
  with pytest.raises(service_lib.UnlearningDiverged, match="probe images"):
    service.unlearn(req)
  assert service.model_fingerprint() == before
  assert service.requests_served == 0 and service.samples_unlearned == 0
  assert np.isfinite(service.predict(test.images)).all()
  assert 0 <= service.evaluate(0).report.accuracy <= 1


def test_a_sample_is_unlearned_once_across_requests_and_noise(setup):
  service = make_service(setup)
  first = request(n=6, seed=20)
  service.unlearn(first)
  after_first = service.model_fingerprint()
  # Resubmitted in a later request (with new samples around it): refused whole.
  fresh = request(n=4, seed=21)
  mixed = (np.concatenate([fresh.images, first.images[2:3]]), np.zeros(5, np.int32))
  with pytest.raises(service_lib.AlreadyUnlearned, match=r"indices \[4\]") as info:
    service.unlearn(mixed)
  assert info.value.repeats == ((4, "ledger", 2),)
  # With +-1e-6 noise (clipped to the pixel range), and with a uniform noise of
  # 0.4 / 255: still within half a grey level.
  rng = np.random.default_rng(0)
  for scale in (1e-6, 0.4 / 255):
    noised = np.clip(first.images + rng.uniform(-scale, scale, first.images.shape)
                     .astype(np.float32), -0.5, 0.5)
    with pytest.raises(service_lib.AlreadyUnlearned, match="6 were unlearned"):
      service.unlearn((noised, first.labels))
  assert service.model_fingerprint() == after_first
  assert service.requests_served == 1 and service.samples_unlearned == 6
  # One pixel a full grey level away is another image; so are the new samples.
  moved = first.images[:1].copy()
  moved[0, 0, 0, 0] += 1 / 255 if moved[0, 0, 0, 0] < 0 else -1 / 255
  assert service.unlearn((moved, np.zeros(1, np.int32))).num_samples == 1
  assert service.unlearn(fresh).num_samples == 4
  assert service.samples_unlearned == 11
  # Near-repeats inside one request are refused too.
  twin = request(n=3, seed=22)
  images = twin.images.copy()
  images[2] = np.clip(images[0] + 1e-6, -0.5, 0.5)
  with pytest.raises(service_lib.AlreadyUnlearned, match="index 2 repeats 0"):
    service.unlearn((images, twin.labels))


def test_only_what_was_unlearned_enters_the_ledger(setup):
  from ounl_jax.defences import screening  # pylint: disable=g-import-not-at-top
  req = request(n=4, seed=30)
  marker = req.images[0, 0, 0, 0]

  def score(images, labels):
    return (images[:, 0, 0, 0] == marker).astype(float)
  service = make_service(setup, on_flagged="drop", screens=[screening.Screen(
      "marker", score, 0.5, "is the marked image")])
  receipt = service.unlearn(req)
  assert receipt.dropped == (0,) and service.samples_unlearned == 3
  with pytest.raises(service_lib.AlreadyUnlearned):
    service.unlearn((req.images[1:2], req.labels[1:2]))
  # A refused request leaves no entry: the diverging server keeps none.
  diverging = make_service(setup, settings=unlearning.FirstOrderSettings(tau=1e30))
  with pytest.raises(service_lib.UnlearningDiverged):
    diverging.unlearn(req)
  assert diverging.samples_unlearned == 0
  with pytest.raises(ValueError, match="duplicate_tolerance"):
    service_lib.RequestLimits(duplicate_tolerance=-1.0)


def test_the_service_oracle_has_the_request_cap(setup):
  service = make_service(setup, limits=service_lib.RequestLimits(
      max_request_images=5))
  oracle = service.oracle(budget=100)
  assert oracle.query.max_query_images == 5
  with pytest.raises(oracle_lib.QueryTooLarge, match="limit of 5 images"):
    oracle.query(oracle.init(), NoCopy((6,) + SHAPE))
