"""Blending (Sec. III-B, Eq. 1; docs/protocol.md §9-§10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import blending

SHAPE = (4, 4, 3)
WEIGHTS = jax.random.normal(jax.random.key(0), (48, 3))


def predict(images):
  return jax.nn.softmax(images.reshape(images.shape[0], -1) @ WEIGHTS)


def make_oracle(output="probabilities"):
  return oracle_lib.make_oracle(predict, input_shape=SHAPE, num_classes=3,
                                output=output)


def data(count, seed):
  images = np.asarray(jax.random.uniform(jax.random.key(seed), (count,) + SHAPE,
                                         minval=-0.5, maxval=0.5))
  return images, np.arange(count, dtype=np.int32) % 3


SAMPLES, SAMPLE_LABELS = data(5, 1)
SAMPLE_LABELS = np.zeros(5, np.int32)
POOL, POOL_LABELS = data(30, 2)  # Ten images of each class; class B = 2.


def attack(key=0, **kwargs):
  settings = blending.BlendSettings(**{"class_b": 2, **kwargs})
  return blending.blending_attack(make_oracle(), SAMPLES, SAMPLE_LABELS,
                                  jax.random.key(key), POOL, POOL_LABELS, settings)


def test_ratio_zero_is_the_original_and_one_the_class_b_image():
  x_b = POOL[:5]
  np.testing.assert_array_equal(blending.blend(SAMPLES, x_b, 0.0), SAMPLES)
  np.testing.assert_array_equal(blending.blend(SAMPLES, x_b, 1.0), x_b)
  # Eq. 1 with lambda = 1 - ratio.
  np.testing.assert_allclose(blending.blend(SAMPLES, x_b, 0.3),
                             0.7 * SAMPLES + 0.3 * x_b, rtol=1e-6, atol=1e-7)
  for ratio, expected in ((0.0, SAMPLES), (1.0, None)):
    result = attack(ratio=ratio, label_mode="original")
    expected = POOL[result.class_b_indices] if expected is None else expected
    np.testing.assert_array_equal(result.images, expected)


def test_class_b_images_are_a_seeded_draw_from_the_pool():
  first, second, other = attack(0), attack(0), attack(1)
  np.testing.assert_array_equal(first.class_b_indices, second.class_b_indices)
  np.testing.assert_array_equal(first.images, second.images)
  assert not np.array_equal(first.class_b_indices, other.class_b_indices)
  assert (POOL_LABELS[first.class_b_indices] == 2).all()
  # Enough class-B images in the pool: no image used twice.
  assert len(set(first.class_b_indices)) == len(SAMPLES)
  fixed = attack(0, pairing="fixed")
  assert len(set(fixed.class_b_indices)) == 1


def test_small_pool_draws_with_replacement():
  indices = blending.draw_class_b(jax.random.key(0), POOL_LABELS, 2, 25)
  assert len(indices) == 25 and (POOL_LABELS[indices] == 2).all()


def test_label_modes():
  predicted = attack(label_mode="prediction")
  expected = np.asarray(jnp.argmax(predict(predicted.images), -1))
  np.testing.assert_array_equal(predicted.labels, expected)
  np.testing.assert_array_equal(predicted.predicted, expected)
  np.testing.assert_array_equal(predicted.queries, [1] * 5)
  assert int(predicted.oracle_state.queries) == 5
  original = attack(label_mode="original")
  np.testing.assert_array_equal(original.labels, SAMPLE_LABELS)
  assert int(original.oracle_state.queries) == 0 and (original.predicted == -1).all()
  target = attack(label_mode="target")
  np.testing.assert_array_equal(target.labels, [2] * 5)


def test_labels_only_oracle_is_enough():
  settings = blending.BlendSettings(class_b=2, ratio=0.5)
  result = blending.blending_attack(make_oracle("labels"), SAMPLES, SAMPLE_LABELS,
                                    jax.random.key(0), POOL, POOL_LABELS, settings)
  np.testing.assert_array_equal(
      result.labels, np.asarray(jnp.argmax(predict(result.images), -1)))


def test_invalid_settings_are_refused():
  with pytest.raises(ValueError, match="ratio"):
    blending.BlendSettings(class_b=2, ratio=1.5)
  with pytest.raises(ValueError, match="pairing"):
    blending.BlendSettings(class_b=2, pairing="nearest")
  with pytest.raises(ValueError, match="label mode"):
    blending.BlendSettings(class_b=2, label_mode="random")
  with pytest.raises(ValueError, match="no image of class"):
    blending.draw_class_b(jax.random.key(0), POOL_LABELS, 7, 3)
