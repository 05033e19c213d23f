"""Hash registry of the training images (paper Sec. VII, "Hashing as a Possible
Defense").

While it still holds its training set, the server (or the model owner) stores one
hash per training image; an unlearning request whose image hashes to nothing in the
registry is suspicious. Two hashes:

* ``exact``: sha256 of the image quantised back to uint8 (``round((x + 0.5) * 255)``,
  the inverse of the data pipeline's ``x / 255 - 0.5``). Any change to a pixel, a
  push or a lossy re-encoding alike, misses. Score 1 (not registered) or 0.
* ``perceptual``: a DCT pHash (64-bit-style, 63 AC bits): grey image resized to
  ``dct_size`` x ``dct_size``, 2-D DCT-II, the top-left ``hash_size`` x
  ``hash_size`` coefficients without the DC term, each bit = coefficient above their
  median. Score = the Hamming distance to the nearest registered hash (0..63):
  robust to JPEG re-encoding, so also blind to small perturbations such as a push.

The paper's two objections stand and are measured by ``experiments.defences``: the
registry discloses which images were trained on, and the exact hash falsely
rejects honest requests that were re-encoded on the way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import jax
import numpy as np

KINDS = ("exact", "perceptual")
# ITU-R BT.601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class HashSettings:
  """Attributes:
    kind: ``exact`` or ``perceptual`` (which hash ``score`` compares).
    dct_size: side of the grey image the DCT runs on (pHash: 32).
    hash_size: side of the low-frequency DCT block kept (8: 63 AC bits).
    chunk_size: query images compared against the registry at once (memory).
  """

  kind: str = "perceptual"
  dct_size: int = 32
  hash_size: int = 8
  chunk_size: int = 256

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown hash kind {self.kind!r}; choose one of {KINDS}.")
    if not 2 <= self.hash_size <= self.dct_size or self.hash_size ** 2 - 1 > 64:
      raise ValueError(f"hash_size must be in [2, min(dct_size, 8)], got "
                       f"{self.hash_size}.")


class HashRegistry(NamedTuple):
  """The stored hashes: sha256 hex digests and packed perceptual hashes (uint64)."""

  settings: HashSettings
  exact: frozenset
  perceptual: np.ndarray


def quantise(images) -> np.ndarray:
  """Images in [-0.5, 0.5] back to uint8 (``round((x + 0.5) * 255)``)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 0.5) * 255.0), 0, 255).astype(np.uint8)


def exact_hashes(images) -> list[str]:
  """sha256 of each uint8-quantised image (shape and bytes)."""
  quantised = quantise(images)
  return [hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()
          for image in quantised]


def _dct_matrix(n: int) -> np.ndarray:
  """Unnormalised DCT-II: D[k, m] = cos(pi * (2m + 1) * k / (2n))."""
  k = np.arange(n)[:, None]
  m = np.arange(n)[None, :]
  return np.cos(np.pi * (2 * m + 1) * k / (2 * n))


def perceptual_bits(images, settings: HashSettings = HashSettings()) -> np.ndarray:
  """(N, hash_size**2 - 1) booleans: the pHash bits of each image."""
  images = np.asarray(images, np.float32) + 0.5
  grey = images @ _LUMA if images.shape[-1] == 3 else images.mean(-1)
  size = settings.dct_size
  if grey.shape[1:] != (size, size):
    grey = np.asarray(jax.image.resize(grey, (len(grey), size, size), "linear",
                                       antialias=True))
  d = _dct_matrix(size)
  coefficients = np.einsum("ki,nij,lj->nkl", d, grey.astype(np.float64), d)
  block = coefficients[:, :settings.hash_size, :settings.hash_size]
  block = block.reshape(len(block), -1)[:, 1:]  # Drop the DC term.
  return block > np.median(block, axis=1, keepdims=True)


def pack(bits: np.ndarray) -> np.ndarray:
  """(N, B <= 64) booleans to (N,) uint64, bit i = column i."""
  weights = np.left_shift(np.uint64(1), np.arange(bits.shape[1], dtype=np.uint64))
  return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def perceptual_hashes(images, settings: HashSettings = HashSettings()) -> np.ndarray:
  return pack(perceptual_bits(images, settings))


def fit(settings: HashSettings, training_images) -> HashRegistry:
  """Hashes every training image (taken while the server still holds them)."""
  return HashRegistry(settings, frozenset(exact_hashes(training_images)),
                      np.unique(perceptual_hashes(training_images, settings)))


def nearest_distance(registry: HashRegistry, hashes: np.ndarray) -> np.ndarray:
  """Hamming distance from each packed hash to the nearest registered one."""
  stored = registry.perceptual
  out = np.empty(len(hashes), np.int64)
  step = registry.settings.chunk_size
  for start in range(0, len(hashes), step):
    chunk = hashes[start:start + step]
    out[start:start + step] = np.bitwise_count(
        np.bitwise_xor(chunk[:, None], stored[None, :])).min(axis=1)
  return out


def score(registry: HashRegistry, images, labels=None) -> np.ndarray:
  """Suspicion per sample: exact: 1.0 if its hash is not registered, else 0.0;
  perceptual: Hamming distance to the nearest registered pHash. Labels unused."""
  del labels
  if registry.settings.kind == "exact":
    return np.array([0.0 if h in registry.exact else 1.0
                     for h in exact_hashes(images)])
  return nearest_distance(
      registry, perceptual_hashes(images, registry.settings)).astype(np.float64)
