"""Defences (paper Sec. VII): calibration, each detector, and the service hook."""

import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ounl_jax import data as data_lib
from ounl_jax import defences
from ounl_jax import models
from ounl_jax import service as service_lib
from ounl_jax import unlearning
from ounl_jax.defences import hashing
from ounl_jax.defences import margin
from ounl_jax.defences import membership
from ounl_jax.defences import screening
from ounl_jax.defences import utility

# ----------------------------------------------------------------------------------
# Shared helpers


def smooth_images(n, seed, size=32):
  """Smooth images: a random 8x8 colour grid, upsampled (energy spread over the
  low frequencies the pHash reads, as in natural images)."""
  grid = np.random.default_rng(seed).uniform(-0.45, 0.45, (n, 8, 8, 3))
  return np.asarray(jax.image.resize(grid, (n, size, size, 3), "linear"),
                    np.float32)


def jpeg(images, quality=75):
  """Round trip through JPEG (what a re-encoding upload does)."""
  out = []
  for image in hashing.quantise(images):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
  return data_lib.to_unit_range(np.stack(out))


def linear_model(scale):
  """logits = scale * mean colour (3 classes: the dominant channel)."""

  def apply(variables, x, *, train=False, rngs=None):
    del train, rngs
    return x.mean(axis=(1, 2)) @ variables["params"]["w"]

  def init(key):
    del key
    return {"params": {"w": scale * jnp.eye(3)}}

  return models.Model("linear", init, apply, (4, 4, 3), 3)


def coloured(n, seed, low=0.05, high=0.4):
  """Class-k images whose channel k is brighter by a random amount."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  strength = rng.uniform(low, high, n)
  images = rng.uniform(-0.05, 0.05, (n, 4, 4, 3)) - 0.1
  images[np.arange(n), :, :, labels] += strength[:, None, None]
  return np.clip(images, -0.5, 0.5).astype(np.float32), labels


# ----------------------------------------------------------------------------------
# Calibration, rates, ROC AUC by hand


def test_calibrate_by_hand():
  scores = np.arange(1, 201, dtype=float)[::-1]  # 1..200, unsorted.
  # k = floor(0.01 * 200) = 2: threshold 198, so exactly 199 and 200 are flagged.
  assert screening.calibrate(scores, 0.01) == 198
  assert screening.flag_rate(scores, 198) == 0.01
  assert screening.calibrate(scores[:99], 0.01) == 200  # k = 0: the maximum.
  assert screening.calibrate(scores, 0.0) == 200
  # Ties: a binary score with 5% ones cannot be cut at 1%: nothing is flagged.
  binary = np.r_[np.zeros(95), np.ones(5)]
  assert screening.calibrate(binary, 0.01) == 1.0
  assert screening.flag_rate(binary, 1.0) == 0.0
  with pytest.raises(ValueError, match="at least one"):
    screening.calibrate([], 0.01)
  with pytest.raises(ValueError, match="rate"):
    screening.calibrate([1.0], 1.0)


def test_calibrate_with_confidence_by_hand_and_on_new_samples():
  scores = np.arange(1, 101, dtype=float)
  # P(Bin(100, .05) <= 1) = 0.037 <= 0.05 < P(<= 2) = 0.118: k = 1, threshold 99.
  assert screening.exceedances_allowed(100, 0.05, 0.95) == 1
  assert screening.calibrate(scores, 0.05, confidence=0.95) == 99
  assert screening.calibrate(scores, 0.05) == 95  # k = 5 without it.
  with pytest.raises(ValueError, match="confidence"):
    screening.calibrate(scores, 0.05, confidence=1.0)
  # Over many calibrations on 500 honest scores, the plain quantile lets more
  # than 1% of new honest samples through about half the time; with confidence
  # 0.95, about one time in twenty.
  rng = np.random.default_rng(0)
  over = {None: 0, 0.95: 0}
  for _ in range(400):
    honest = rng.normal(size=500)
    for confidence in over:
      threshold = screening.calibrate(honest, 0.01, confidence=confidence)
      over[confidence] += (1 - _normal_cdf(threshold)) > 0.01
  assert over[None] / 400 > 0.3 and over[0.95] / 400 < 0.09


def _normal_cdf(x: float) -> float:
  import math  # pylint: disable=g-import-not-at-top
  return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_roc_auc_by_hand():
  assert screening.roc_auc([0, 1], [2, 3]) == 1.0
  assert screening.roc_auc([2, 3], [0, 1]) == 0.0
  # Pairs (h, a): (1,1)=1/2, (1,2)=1, (3,1)=0, (3,2)=0 -> 1.5 / 4.
  assert screening.roc_auc([1, 3], [1, 2]) == 0.375
  fpr, tpr = screening.roc_curve([1, 3], [1, 2])
  assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
  assert np.trapezoid(tpr, fpr) == pytest.approx(0.375)


# ----------------------------------------------------------------------------------
# Hash registry


@pytest.fixture(scope="module")
def registry_data():
  train = smooth_images(300, seed=0)
  return train, {kind: hashing.fit(hashing.HashSettings(kind=kind), train)
                 for kind in hashing.KINDS}


def test_jpeg_reencoded_honest_image_passes_perceptual_fails_exact(registry_data):
  train, registries = registry_data
  original, reencoded = train[:50], jpeg(train[:50])
  assert not np.array_equal(hashing.quantise(reencoded), hashing.quantise(original))
  np.testing.assert_array_equal(hashing.score(registries["exact"], original), 0.0)
  np.testing.assert_array_equal(hashing.score(registries["exact"], reencoded), 1.0)
  np.testing.assert_array_equal(hashing.score(registries["perceptual"], original),
                                0.0)
  honest = hashing.score(registries["perceptual"], reencoded)
  unseen = hashing.score(registries["perceptual"], smooth_images(50, seed=1))
  assert honest.max() <= 6 < 12 <= unseen.min()
  assert screening.roc_auc(honest, unseen) == 1.0


def test_perceptual_hash_calibrated_rate_holds_on_held_out(registry_data):
  train, registries = registry_data
  reencoded = jpeg(train)
  scores = hashing.score(registries["perceptual"], reencoded)
  threshold = screening.calibrate(scores[:150], 0.01)
  assert screening.flag_rate(scores[150:], threshold) <= 0.03
  assert screening.flag_rate(hashing.score(registries["perceptual"],
                                           smooth_images(100, seed=3)),
                             threshold) == 1.0
  # Blending (Eq. 1, ratio 0.3) keeps much of the image's low frequencies: the
  # pHash ranks blends above honest re-encodings, but does not separate them.
  blended = 0.7 * train[:100] + 0.3 * smooth_images(100, seed=2)
  auc = screening.roc_auc(scores, hashing.score(registries["perceptual"], blended))
  assert 0.8 < auc < 1.0


def test_phash_bits_by_hand():
  # A left-to-right ramp: its energy is in the first horizontal frequency.
  ramp = np.broadcast_to(np.linspace(-0.5, 0.5, 32)[None, :, None],
                         (32, 32, 3)).astype(np.float32)[None]
  bits = hashing.perceptual_bits(ramp)
  assert bits.shape == (1, 63)
  assert hashing.pack(np.array([[True, False, True]])) == np.uint64(5)
  registry = hashing.fit(hashing.HashSettings(), ramp)
  assert hashing.nearest_distance(registry, registry.perceptual ^ np.uint64(0b1011)
                                  ).tolist() == [3]


# ----------------------------------------------------------------------------------
# Boundary margin


def to_boundary(model, variables, a, b, steps=40):
  """Bisection on the segment a -> b to where the prediction flips."""
  predict = lambda x: int(np.argmax(model.apply(variables, x[None])[0]))
  low, high = 0.0, 1.0
  start = predict(a)
  for _ in range(steps):
    mid = (low + high) / 2
    if predict((1 - mid) * a + mid * b) == start:
      low = mid
    else:
      high = mid
  return ((1 - low) * a + low * b).astype(np.float32)


def test_margin_separates_pushed_from_clean_samples():
  model = linear_model(scale=10.0)
  variables = model.init(None)
  detector = margin.fit(margin.MarginSettings(), model, variables)
  x, y = coloured(600, seed=0)
  honest = margin.score(detector, x, y)
  assert np.all((honest >= -1) & (honest <= 0))
  threshold = screening.calibrate(honest[:300], 0.01)
  assert screening.flag_rate(honest[300:], threshold) <= 0.03
  other = (y[:40] + 1) % 3
  targets = np.stack([x[np.flatnonzero(y == c)[0]] for c in other])
  pushed = np.stack([to_boundary(model, variables, x[i], targets[i])
                     for i in range(40)])
  attack = margin.score(detector, pushed, y[:40])
  assert attack.min() > -1e-3  # Top-2 probabilities equal to 3 decimals.
  assert screening.flag_rate(attack, threshold) == 1.0
  assert screening.roc_auc(honest, attack) == 1.0


def test_margins_by_hand():
  probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.45, 0.15]])
  np.testing.assert_allclose(margin.margins(probs), [0.5, 0.05])


# ----------------------------------------------------------------------------------
# Membership


def test_membership_loss_by_hand_and_separation():
  model = linear_model(scale=10.0)
  variables = model.init(None)
  x, y = coloured(3, seed=3)
  logits = 10.0 * x.mean(axis=(1, 2))
  expected = -(logits[np.arange(3), y] - np.log(np.exp(logits).sum(1)))
  np.testing.assert_allclose(membership.losses(model, variables, x, y), expected,
                             rtol=1e-5)
  members = coloured(800, seed=4, low=0.25, high=0.45)      # Fitted well.
  nonmembers = coloured(400, seed=5, low=0.0, high=0.1)     # Fitted poorly.
  check = membership.fit(membership.MembershipSettings(), model, variables,
                         (members[0][:400], members[1][:400]), nonmembers)
  assert check.member_rejection_rate <= 0.01
  assert check.nonmember_detection_rate >= 0.9 and check.auc > 0.99
  held_out = membership.score(check, members[0][400:], members[1][400:])
  assert screening.flag_rate(held_out, check.threshold) <= 0.03
  # A wrong submitted label looks like a non-member.
  wrong = membership.score(check, members[0][400:], (members[1][400:] + 1) % 3)
  assert screening.flag_rate(wrong, check.threshold) == 1.0


# ----------------------------------------------------------------------------------
# Utility guard


def test_utility_guard_by_hand():
  model = linear_model(scale=10.0)
  good = model.init(None)
  x = np.zeros((6, 4, 4, 3), np.float32)
  y = np.array([0, 0, 1, 1, 2, 2], np.int32)
  x[np.arange(6), :, :, y] = 0.3
  guard = utility.fit(utility.UtilitySettings(max_overall_drop=0.4,
                                              max_class_drop=0.6), model, good, x, y)
  assert guard.accuracy == 1.0
  np.testing.assert_array_equal(guard.per_class_accuracy, [1, 1, 1])
  assert utility.check(guard, good).ok
  # Class 2's column zeroed: logits tie at 0 on class 2, argmax picks 0.
  broken = {"params": {"w": good["params"]["w"].at[:, 2].set(0.0)}}
  verdict = utility.check(guard, broken)
  assert not verdict.ok and verdict.worst_class == 2
  assert verdict.overall_drop == pytest.approx(1 / 3)
  np.testing.assert_allclose(verdict.class_drops, [0, 0, 1])
  assert "class 2's held-out accuracy would fall by 100.0%" in verdict.reason
  assert "held-out accuracy would fall" in verdict.reason.split(";")[0]
  loose = guard._replace(settings=utility.UtilitySettings(1.0, 1.0))
  assert utility.check(loose, broken).ok


# ----------------------------------------------------------------------------------
# The service hook

SHAPE = (8, 8, 3)
K = 4


@pytest.fixture(scope="module")
def server_setup():
  model = models.get_model("vgg3", num_classes=K, width=2, input_shape=SHAPE)
  variables = jax.jit(model.init)(jax.random.key(0))
  x = smooth_images(24, seed=7, size=8)
  y = (np.arange(24) % K).astype(np.int32)
  return model, variables, data_lib.LabelledImages(x, y, np.arange(24))


def make_server(setup, tau=1e-2, **kwargs):
  model, variables, test = setup
  return service_lib.UnlearningService(
      model, variables, test, key=jax.random.key(88),
      settings=unlearning.FirstOrderSettings(tau=tau), **kwargs)


def exact_screen(setup):
  """The server's 'training set' is its first 16 images."""
  registry = hashing.fit(hashing.HashSettings(kind="exact"), setup[2].images[:16])
  return defences.hash_screen(registry, 0.5)


def test_screened_request_passes_when_nothing_is_flagged(server_setup):
  server = make_server(server_setup, screens=(exact_screen(server_setup),))
  test = server_setup[2]
  receipt = server.unlearn((test.images[:6], test.labels[:6]))
  assert receipt.num_samples == 6 and receipt.dropped == ()
  (summary,) = receipt.screening
  assert summary["screen"] == "exact_hash" and summary["flagged"] == 0


def test_refused_request_names_the_screen_and_leaves_params_bit_identical(
    server_setup):
  server = make_server(server_setup, screens=(exact_screen(server_setup),))
  before = server.model_fingerprint()
  test = server_setup[2]
  x = test.images[:6].copy()
  x[[2, 5]] = test.images[[20, 21]]                   # Not registered.
  with pytest.raises(service_lib.RequestRefused,
                     match=r"screen 'exact_hash': 2 of 6 samples not found among "
                           r"the hashes .*indices \[2, 5\]") as info:
    server.unlearn((x, test.labels[:6]))
  assert info.value.screen == "exact_hash" and info.value.flagged == (2, 5)
  assert isinstance(info.value, service_lib.InvalidRequestError)
  assert server.model_fingerprint() == before
  assert server.requests_served == 0


def test_drop_policy_unlearns_only_the_unflagged_samples(server_setup):
  model, variables, test = server_setup
  server = make_server(server_setup, screens=(exact_screen(server_setup),),
                       on_flagged="drop")
  x = test.images[:6].copy()
  x[[2, 5]] = test.images[[20, 21]]
  receipt = server.unlearn((x, test.labels[:6]))
  assert receipt.dropped == (2, 5) and receipt.num_samples == 4
  keep = [0, 1, 3, 4]
  expected = unlearning.unlearn(
      "first_order", model, variables, x[keep], test.labels[:6][keep],
      jax.random.fold_in(jax.random.key(88), 0),
      unlearning.FirstOrderSettings(tau=1e-2))
  assert server.model_fingerprint() == service_lib.fingerprint(
      jax.block_until_ready(expected))
  # Every sample flagged: nothing to unlearn, refused.
  before = server.model_fingerprint()
  with pytest.raises(service_lib.RequestRefused, match="every sample was flagged"):
    server.unlearn((test.images[20:22], test.labels[20:22]))
  assert server.model_fingerprint() == before
  with pytest.raises(ValueError, match="on_flagged"):
    make_server(server_setup, on_flagged="ignore")


def test_utility_guard_rolls_back_a_damaging_update(server_setup):
  model, variables, test = server_setup
  # Held-out labels = the clean model's predictions: baseline accuracy 1 for every
  # class present, so any changed prediction is a drop.
  predictions = np.asarray(jnp.argmax(model.apply(variables, test.images), -1))
  guard = utility.fit(utility.UtilitySettings(max_overall_drop=0.05,
                                              max_class_drop=0.1),
                      model, variables, test.images, predictions)
  assert guard.accuracy == 1.0
  server = make_server(server_setup, tau=50.0, guard=guard)
  before = server.model_fingerprint()
  with pytest.raises(service_lib.RequestRefused,
                     match="utility guard: .*rolled back") as info:
    server.unlearn((test.images[:8], test.labels[:8]))
  assert info.value.screen == "utility_guard" and not info.value.verdict.ok
  assert server.model_fingerprint() == before
  assert server.requests_served == 0
  # A gentle update keeps every prediction: accepted, and the receipt says so.
  gentle = make_server(server_setup, tau=1e-9, guard=guard)
  receipt = gentle.unlearn((test.images[:8], test.labels[:8]))
  assert receipt.guard["ok"] and receipt.guard["overall_drop"] == 0.0
  assert gentle.model_fingerprint() != before


# ----------------------------------------------------------------------------------
# experiments.defences at smoke scale on mock data


@pytest.fixture
def mock_cifar10(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tests.conftest import mock_prepared_folder  # pylint: disable=g-import-not-at-top
  folder = mock_prepared_folder(tmp_path)
  monkeypatch.setattr(data_lib, "find_prepared", lambda spec, d: folder)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "data"))
  with tfds.testing.mock_data(num_examples=200):
    yield tmp_path


@pytest.mark.heavy  # About 25 s of CPU (training and unlearning compiles).
def test_defences_experiment_writes_its_table_on_mock_data(mock_cifar10):
  from experiments.setup import configs  # pylint: disable=g-import-not-at-top
  from experiments.setup import overrides  # pylint: disable=g-import-not-at-top
  from experiments.server import screens  # pylint: disable=g-import-not-at-top
  from experiments.studies.defences import report  # pylint: disable=g-import-not-at-top
  from experiments import defences as experiment  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  workdir = mock_cifar10 / "run"
  config = overrides.override(
      configs.ExperimentConfig(), width=2, epochs=1, patience=1,
      max_train_per_class=12, max_test_per_class=4, fraction=0.5, max_samples=4,
      max_iterations=10, iterations_per_chunk=10)
  # A saved push (as experiments.pushing writes it): 3 rows, row 1 failed.
  rng = np.random.default_rng(0)
  pushed_path = str(mock_cifar10 / "pushed.npz")
  original = rng.uniform(-0.5, 0.5, (3, 32, 32, 3)).astype(np.float32)
  np.savez(pushed_path, ids=np.array([10**6, 10**6 + 1, 10**6 + 2]),
           original=original, pushing_i=original * 0.9,
           pushing_ii=original * 0.8, pushing_i_labels=np.zeros(3, np.int32),
           original_labels=np.zeros(3, np.int32),
           pushing_ii_labels=np.zeros(3, np.int32),
           pushing_i_success=np.array([True, False, True]),
           pushing_ii_success=np.array([True, True, True]),
           requested=np.asarray(3))
  settings = experiment.DefenceConfig(honest_samples=30, guard_requests=2,
                                      pushed=pushed_path, calibrate_on="as_sent",
                                      adaptive_kappas=(0.1,), mix_fractions=(0.5,))
  path = experiment.run(config, settings, str(workdir), show_progress=False)
  assert path == str(workdir / "defences.json")
  results = json.loads((workdir / "defences.json").read_text())
  assert set(results["sample_defences"]) == set(screens.DEFENCES)
  for entry in results["sample_defences"].values():
    assert entry["calibration_false_rejection"] <= 0.01 + 1e-9
    assert set(entry["attacks"]) == {
        "normal", *report.ATTACKS, "pushing_i_kappa0.1",
        "pushing_ii_kappa0.1", "mixed_0.5"}
    assert "scores" not in entry["attacks"]["blending"]
  # Honest halves are disjoint from each other and from the user's samples.
  assert results["honest"]["calibration"] == results["honest"]["evaluation"] == 30
  # Exact copies of training images are all registered; blends never are.
  exact = results["sample_defences"]["exact_hash"]
  assert exact["false_rejection"] == 0.0
  assert exact["attacks"]["blending"]["detection_rate"] == 1.0
  assert results["attack_notes"]["sizes"]["pushing_i"] == 2
  for attack in ("pushing_i", "pushing_ii"):  # Not training images.
    assert exact["attacks"][attack]["detection_rate"] == 1.0
  assert results["utility_guard"]["calibration_requests"] == 2
  md = (workdir / "defences.md").read_text()
  assert md.startswith("# Defences") and md.count("| Utility guard |") == 7
  for figure in ("defences_roc.png", "defences_tradeoff.png"):
    assert (workdir / figure).read_bytes()[:4] == b"\x89PNG"
  # The mixed request: half Pushing-II, half the same user's unmodified samples.
  assert results["attack_notes"]["sizes"]["mixed_0.5"] == 2
  # After screening: no screen passes everything; the exact hash drops every
  # non-training image, so the server ends as clean as it started.
  passed = results["after_screening"]
  assert passed["none"]["pushing_ii"]["passed"] == 2
  assert passed["exact_hash"]["pushing_ii"]["passed"] == 0
  assert (passed["exact_hash"]["pushing_ii"]["class_a_accuracy"]
          == passed["clean"]["class_a_accuracy"])
  assert "## What the server unlearns after screening" in md
