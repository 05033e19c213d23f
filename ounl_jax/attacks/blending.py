"""Blending, the naive over-unlearning attack (Sec. III-B, Eq. 1; docs/protocol.md §10).

Each sample x of class A is mixed in pixel space with an image x_b of class B:

  Pi(x, x_b) = lambda * x + (1 - lambda) * x_b,      (Eq. 1)

The paper's tables and text give a **blending ratio** r in 0.1-0.5 with "higher
ratio = more of class B", so r is the weight on x_b and Eq. 1's lambda is 1 - r
(docs/protocol.md §10 and §16.8): ``blend(x, x_b, 0) == x`` and ``blend(x, x_b, 1) == x_b``.
Blended images stay in [-0.5, 0.5] and are kept as floats (not re-quantised).

The user cannot see the server's training data, so x_b is a seeded draw from a pool
of images the user holds (e.g. the held-out split): one image per sample
(``pairing='random'``, without replacement while the pool allows) or one image for
all (``'fixed'``). The submitted label is the server's prediction on the blended
image (``label_mode='prediction'``, the paper's choice, one counted query per
sample); ``original`` (class A) and ``target`` (class B) need no query.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import labels as labels_lib

PAIRINGS = ("random", "fixed")


def blend(images, class_b_images, ratio: float):
  """Eq. 1 with lambda = 1 - ratio: ``(1 - ratio) * x + ratio * x_b``.

  Args:
    images: (N, H, W, C) samples x of class A.
    class_b_images: (N, H, W, C) or (H, W, C) images x_b of class B.
    ratio: the blending ratio r in [0, 1], the weight on x_b.
  """
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"The blending ratio must lie in [0, 1], got {ratio}.")
  images = jnp.asarray(images, jnp.float32)
  return (1.0 - ratio) * images + ratio * jnp.asarray(class_b_images, jnp.float32)


def draw_class_b(key: jax.Array, pool_labels, class_b: int, count: int, *,
                 pairing: str = "random") -> np.ndarray:
  """Seeded indices into the user's pool of ``count`` class-B images.

  ``random`` draws without replacement when the pool holds at least ``count``
  class-B images, with replacement otherwise; ``fixed`` draws one image for all.

  Raises:
    ValueError: unknown pairing, or no class-B image in the pool.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"Unknown pairing {pairing!r}; choose one of {PAIRINGS}.")
  members = np.flatnonzero(np.asarray(pool_labels) == class_b)
  if len(members) == 0:
    raise ValueError(f"The user's pool holds no image of class {class_b}.")
  if pairing == "fixed":
    pick = jax.random.randint(key, (), 0, len(members))
    return np.full((count,), members[int(pick)], np.int64)
  pick = jax.random.choice(key, len(members), (count,),
                           replace=count > len(members))
  return members[np.asarray(pick)]


@dataclasses.dataclass(frozen=True)
class BlendSettings:
  """Blending settings (docs/protocol.md §10).

  Attributes:
    class_b: the class blended in (CIFAR-10: cat).
    ratio: blending ratio r, the weight on the class-B image (0.1-0.5 in the paper).
    label_mode: ``prediction`` (default; the paper), ``original`` or ``target``.
    pairing: ``random`` (one class-B image per sample) or ``fixed`` (one for all).
    evaluation_batch_size: images per prediction query.
  """

  class_b: int
  ratio: float = 0.3
  label_mode: str = "prediction"
  pairing: str = "random"
  evaluation_batch_size: int = 256

  def __post_init__(self):
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"The blending ratio must lie in [0, 1], got {self.ratio}.")
    if self.pairing not in PAIRINGS:
      raise ValueError(f"Unknown pairing {self.pairing!r}; choose one of {PAIRINGS}.")
    labels_lib.check_label_mode(self.label_mode)


class BlendResult(NamedTuple):
  """Blended samples and what was submitted with them.

  Attributes:
    images: (N, H, W, C) blended images.
    labels: (N,) submitted labels.
    class_b_indices: (N,) indices into the user's pool of the x_b used.
    predicted: (N,) the oracle's class for each blended image (-1 when not
      queried, i.e. label modes other than ``prediction``).
    queries: (N,) queries spent per sample (1 in ``prediction`` mode, else 0).
    oracle_state: the oracle state afterwards.
  """

  images: np.ndarray
  labels: np.ndarray
  class_b_indices: np.ndarray
  predicted: np.ndarray
  queries: np.ndarray
  oracle_state: oracle_lib.OracleState


def blending_attack(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
                    pool_images, pool_labels, settings: BlendSettings, *,
                    oracle_state: oracle_lib.OracleState | None = None
                    ) -> BlendResult:
  """Blends every sample with a class-B image from the user's pool (Eq. 1).

  Args:
    oracle: the black-box service (probabilities or labels).
    images: (N, H, W, C) samples of class A in [-0.5, 0.5]; labels: (N,) class A.
    key: typed PRNG key for the class-B draw.
    pool_images, pool_labels: images the user holds (not the server's training
      data), from which class-B images are drawn.
    settings: ``BlendSettings``.
    oracle_state: the user's query count so far (default ``oracle.init()``).
  """
  labels = np.asarray(labels, np.int32)
  oracle_state = oracle.init() if oracle_state is None else oracle_state
  index = draw_class_b(key, pool_labels, settings.class_b, len(labels),
                       pairing=settings.pairing)
  blended = np.asarray(blend(images, np.asarray(pool_images)[index], settings.ratio))
  predicted = np.full(labels.shape, -1, np.int32)
  queries = np.zeros(labels.shape, np.int32)
  if settings.label_mode == "prediction":
    predicted, oracle_state = labels_lib.oracle_predictions(
        oracle, oracle_state, blended, batch_size=settings.evaluation_batch_size)
    queries += 1
  submitted = labels_lib.submitted_labels(settings.label_mode, original=labels,
                                          target=settings.class_b,
                                          predicted=predicted)
  return BlendResult(blended, submitted, index, predicted, queries, oracle_state)
