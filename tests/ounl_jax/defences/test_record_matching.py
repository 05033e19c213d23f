"""Record matching on hand-made smooth images: pushes and JPEG copies match their
record, novel images are refused, labels are never crossed, the radius calibrates."""

import time

import jax
import numpy as np
import pytest

from ounl_jax.defences import record_matching as rm
from ounl_jax.defences import screening

SETTINGS = rm.MatchSettings(block=4, chunk_size=64)  # Small chunks: many merges.
CLASSES = 3


def smooth_images(n, seed, size=32):
  """A random 8x8 colour grid, upsampled: natural-image-like low frequencies."""
  grid = np.random.default_rng(seed).uniform(-0.45, 0.45, (n, 8, 8, 3))
  return np.asarray(jax.image.resize(grid, (n, size, size, 3), "linear"),
                    np.float32)


def push(images, l2, seed):
  """A random perturbation of L2 norm ``l2`` per image (a push's size)."""
  d = np.random.default_rng(seed).normal(size=images.shape)
  d *= l2 / np.linalg.norm(d.reshape(len(d), -1), axis=1)[:, None, None, None]
  return (images + d).astype(np.float32)


@pytest.fixture(scope="module")
def store():
  images = smooth_images(300, 0)
  labels = np.arange(300) % CLASSES
  ids = 1000 + np.arange(300)  # Not positions: the ids must come back.
  index = rm.build_index(SETTINGS, images, labels, num_classes=CLASSES,
                         record_ids=ids)
  honest = rm.reencode_jpeg(images[:200], quality=75)
  radius = rm.calibrate_radius(index, honest, labels[:200])
  return images, labels, ids, index, radius


def test_embedding_distance_is_the_projected_l2_and_non_expansive():
  x, y = smooth_images(5, 1), smooth_images(5, 2)
  direct = np.linalg.norm((rm.project(x) - rm.project(y)).reshape(5, -1), axis=1)
  np.testing.assert_allclose(rm.distance(x, y, SETTINGS), direct, rtol=1e-5)
  assert np.all(rm.distance(x, y) <= np.linalg.norm((x - y).reshape(5, -1), axis=1))
  # What the projection drops costs nothing.
  high = x - rm.project(x)
  np.testing.assert_allclose(rm.distance(x + high, x), 0.0, atol=1e-5)


def test_pushed_copy_matches_its_record(store):
  images, labels, ids, index, radius = store
  pushed = push(images[:60], 0.25, seed=3)
  matches = rm.match(index, pushed, labels[:60], radius)
  assert matches.accepted.all()
  np.testing.assert_array_equal(matches.record_ids, ids[:60])
  np.testing.assert_array_equal(rm.matched_records(matches), ids[:60])


def test_jpeg_reencoded_record_matches(store):
  images, labels, ids, index, radius = store
  held = slice(200, 300)  # Not used for calibration.
  for quality in (75, 90):
    matches = rm.match(index, rm.reencode_jpeg(images[held], quality), labels[held],
                       radius)
    assert matches.accepted.mean() >= 0.95
    np.testing.assert_array_equal(matches.record_ids[matches.accepted],
                                  ids[held][matches.accepted])


def test_novel_images_are_refused(store):
  _, labels, _, index, radius = store
  novel = smooth_images(60, 99)
  matches = rm.match(index, novel, labels[:60], radius)
  assert not matches.accepted.any()
  assert (matches.record_ids == rm.NO_RECORD).all()
  assert len(rm.matched_records(matches)) == 0


def test_other_label_record_is_never_matched(store):
  images, labels, ids, index, radius = store
  wrong = (labels[:60] + 1) % CLASSES
  matches = rm.match(index, images[:60], wrong, radius)
  # The exact image, under another label: refused (nearest same-label is far).
  assert not matches.accepted.any()
  got, dist = rm.nearest_records(index, images[:60], wrong, k=5)
  label_of = dict(zip(ids, labels))
  assert all(label_of[i] == w for row, w in zip(got, wrong) for i in row)
  assert (dist > 0).all()
  # A label with no record at all.
  only_zero = rm.build_index(SETTINGS, images[labels == 0], labels[labels == 0],
                             num_classes=CLASSES)
  got, dist = rm.nearest_records(only_zero, images[:3], np.array([1, 2, 1]))
  assert (got == rm.NO_RECORD).all() and np.isinf(dist).all()


def test_calibration_gives_about_one_percent_false_rejection(store):
  _, _, _, index, _ = store
  images = smooth_images(1200, 7)
  labels = np.arange(1200) % CLASSES
  big = rm.build_index(SETTINGS, images, labels, num_classes=CLASSES)
  rng = np.random.default_rng(0)
  order = rng.permutation(1200)
  calibration, measured = order[:600], order[600:]
  # Honest uploads: each re-encoded at some quality between 50 and 95.
  qualities = rng.integers(50, 96, 1200)
  honest = np.concatenate([rm.reencode_jpeg(images[i:i + 1], int(q))
                           for i, q in zip(range(1200), qualities)])
  radius = rm.calibrate_radius(big, honest[calibration], labels[calibration])
  assert radius > 0
  on_calibration = screening.flag_rate(
      rm.match_distance(big, honest[calibration], labels[calibration]), radius)
  assert on_calibration <= 0.01
  held_out = 1.0 - rm.match(big, honest[measured], labels[measured],
                            radius).accepted.mean()
  assert 0.0 <= held_out <= 0.03
  # A stricter rate gives a larger radius.
  assert rm.calibrate_radius(big, honest[calibration], labels[calibration],
                             rate=0.0) >= radius


def test_search_agrees_with_brute_force_and_excludes():
  images = smooth_images(150, 11)
  labels = np.random.default_rng(1).integers(0, CLASSES, 150)
  index = rm.build_index(SETTINGS, images, labels, num_classes=CLASSES)
  queries = push(images[:20], 2.0, seed=5)
  got, dist = rm.nearest_records(index, queries, labels[:20], k=3,
                                 exclude_ids=[0, 1, 2])
  full = np.linalg.norm(rm.embed(queries)[:, None].astype(np.float64)
                        - rm.embed(images)[None].astype(np.float64), axis=-1)
  full[labels[:20, None] != labels[None, :]] = np.inf
  full[:, :3] = np.inf
  expected = np.argsort(full, axis=1, kind="stable")[:, :3]
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_allclose(dist, np.take_along_axis(full, expected, 1),
                             rtol=1e-6, atol=1e-6)


def test_duplicates_unlearn_the_record_once(store):
  images, labels, ids, index, radius = store
  request = np.concatenate([images[:4], push(images[:4], 0.1, 1)])
  matches = rm.match(index, request, np.tile(labels[:4], 2), radius)
  np.testing.assert_array_equal(rm.matched_records(matches), ids[:4])


def test_index_size_and_search_speed_at_cifar_scale():
  # 40,000 records of 192 dimensions, as CIFAR's 32x32x3 with 4x4 tiles (here
  # 8x8x3 images with block 1, to spare the 0.5 GB of full-size images).
  settings = rm.MatchSettings(block=1)
  rng = np.random.default_rng(0)
  records = rng.uniform(-0.5, 0.5, (40_000, 8, 8, 3)).astype(np.float32)
  labels = np.arange(40_000) % 10
  index = rm.build_index(settings, records, labels, num_classes=10)
  # 192 float32 + label + id per record, plus the offsets.
  assert index.nbytes == 40_000 * (192 * 4 + 4 + 8) + 11 * 8
  start = time.perf_counter()
  ids, _ = rm.nearest_records(index, records[:400] + 0.001, labels[:400])
  seconds = time.perf_counter() - start
  np.testing.assert_array_equal(ids[:, 0], np.arange(400))
  assert seconds < 5.0  # About 0.2 s on the 2-core development machine.


def test_settings_and_shapes_are_checked():
  with pytest.raises(ValueError):
    rm.MatchSettings(block=0)
  with pytest.raises(ValueError):
    rm.embed(np.zeros((2, 30, 30, 3)), rm.MatchSettings(block=4))
  with pytest.raises(ValueError):
    rm.build_index(SETTINGS, np.zeros((2, 8, 8, 3)), np.array([0, 5]),
                   num_classes=3)


def test_as_a_service_screen(store):
  from ounl_jax import defences
  images, labels, _, index, radius = store
  screen = defences.record_matching_screen(index, radius)
  request = np.concatenate([images[:3], smooth_images(2, 123)])
  (outcome,) = defences.apply_screens([screen], request, labels[:5])
  assert outcome.flagged == (3, 4)
