"""Record matching: the server unlearns its own stored records, never the pixels sent.

A defence the paper does not evaluate (its Sec. VII discusses screening and
hashing): while it still holds its training set, the server keeps an index of its
records. Each submitted image is matched to the nearest stored record *of the same
label*; the request is refused where no record is within ``radius`` of it, and the
stored record, not the submitted image, is what the server unlearns. A pushed or
blended image then unlearns at most its original (or another genuine record of its
label), never the boundary-hugging pixels that cause over-unlearning (paper
Sec. IV-V). ``radius`` is calibrated at 1% false rejection on JPEG re-encoded
honest samples (``calibrate_radius``, as every screen here: ``screening.calibrate``).

**The matching space (this project's choice): the low-pass projection of the
pixels.** ``embed`` averages each channel over ``block x block`` tiles (4 x 4 on
CIFAR: an 8 x 8 x 3 = 192-dimensional vector) and scales by ``block`` so that the
distance between two embeddings is the L2 norm of the low-pass part of the pixel
difference, ``||P (x - y)||_2`` with ``P`` the orthogonal projection onto
tile-constant images. Why this space rather than a perceptual hash or a feature
embedding:

* it is **non-expansive**: ``||P (x - y)|| <= ||x - y||``, so a push of L2 ``r``
  lands within ``r`` of its original, and the radius reads in pixel-L2 units;
* JPEG's error sits mostly in the high frequencies that the tile means discard
  (its 8 x 8 DCT quantisation keeps DC and the lowest coefficients finest), so
  re-encoded honest samples stay close to their record;
* it is model-free: a feature embedding would change with every unlearning update
  and could itself be attacked through the model; the 63-bit pHash is discrete
  (calibrating 1% on a handful of Hamming values is coarse) and so coarse that
  unrelated images collide;
* it is cheap and exact to search: 192 float32 per record (768 bytes; 30.7 MB for
  40,000 CIFAR records), a BLAS matrix product per label.

What an adaptive user can still do (the helpers ``distance``, ``project`` and
``within_radius`` are for that side): a perturbation in the null space of ``P``
(the high frequencies) costs no matching distance at all, and one within
``radius`` of another stored record of the same label makes the server unlearn that
record instead. Either way only genuine training records of the submitted label are
ever unlearned, at most one per submitted image (``matched_records`` de-duplicates).
"""

from __future__ import annotations

import dataclasses
import io
from typing import NamedTuple

import numpy as np

from ounl_jax.defences import screening

NO_RECORD = -1


@dataclasses.dataclass(frozen=True)
class MatchSettings:
  """Attributes:
    block: side of the square tiles averaged per channel (4: 32 x 32 -> 8 x 8).
      Larger tiles forgive more re-encoding error and tell fewer records apart.
    chunk_size: stored records compared with the queries at once; bounds the
      distance matrix at ``queries x chunk_size`` float64.
  """

  block: int = 4
  chunk_size: int = 4096

  def __post_init__(self):
    if self.block < 1:
      raise ValueError(f"block must be >= 1, got {self.block}.")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")


class RecordIndex(NamedTuple):
  """The stored records' embeddings, grouped by label.

  Attributes:
    settings: the ``MatchSettings`` the index was built with.
    embeddings: (M, D) float32, sorted by label (stable: record order kept).
    labels: (M,) int32, sorted.
    record_ids: (M,) int64: each row's id in the server's training set.
    offsets: (K + 1,) int64: label k's rows are ``offsets[k]:offsets[k + 1]``.
  """

  settings: MatchSettings
  embeddings: np.ndarray
  labels: np.ndarray
  record_ids: np.ndarray
  offsets: np.ndarray

  @property
  def nbytes(self) -> int:
    """Bytes the index holds (embeddings, labels, ids and offsets)."""
    return int(self.embeddings.nbytes + self.labels.nbytes + self.record_ids.nbytes
               + self.offsets.nbytes)

  @property
  def num_records(self) -> int:
    return len(self.labels)


class Matches(NamedTuple):
  """Each submitted image's nearest same-label record and the verdict.

  Attributes:
    record_ids: (N,) int64 training-set ids of the nearest record; ``NO_RECORD``
      (-1) where refused.
    distances: (N,) float64 distance to the nearest same-label record (inf when
      the index has no record of that label).
    accepted: (N,) bool, distance <= radius.
    radius: the radius the verdict used.
  """

  record_ids: np.ndarray
  distances: np.ndarray
  accepted: np.ndarray
  radius: float


# ----------------------------------------------------------------------------------
# The matching space


def _check_shape(images: np.ndarray, block: int) -> None:
  if images.ndim != 4:
    raise ValueError(f"Images must be (N, H, W, C), got shape {images.shape}.")
  if images.shape[1] % block or images.shape[2] % block:
    raise ValueError(f"Image side {images.shape[1:3]} is not a multiple of "
                     f"block={block}.")


def embed(images, settings: MatchSettings = MatchSettings()) -> np.ndarray:
  """(N, H/b * W/b * C) float32: per-channel means over b x b tiles, times b.

  Scaling by b (= sqrt of the tile's pixel count) makes embedding distances equal
  the L2 norm of the projected pixel difference: ``||P(x - y)||_2 <= ||x - y||_2``.
  """
  images = np.asarray(images, np.float32)
  b = settings.block
  _check_shape(images, b)
  n, h, w, c = images.shape
  tiles = images.reshape(n, h // b, b, w // b, b, c).mean(axis=(2, 4),
                                                          dtype=np.float64)
  return (tiles * b).reshape(n, (h // b) * (w // b) * c).astype(np.float32)


def project(images, settings: MatchSettings = MatchSettings()) -> np.ndarray:
  """P x: each tile replaced by its per-channel mean (what the matching sees).

  ``x - project(x)`` is invisible to the matching: an adaptive user may put any
  perturbation there at no matching cost.
  """
  images = np.asarray(images, np.float32)
  b = settings.block
  _check_shape(images, b)
  n, h, w, c = images.shape
  tiles = images.reshape(n, h // b, b, w // b, b, c).mean(axis=(2, 4),
                                                          keepdims=True)
  return np.broadcast_to(tiles, (n, h // b, b, w // b, b, c)).reshape(
      images.shape).astype(np.float32)


def distance(images_a, images_b, settings: MatchSettings = MatchSettings()
             ) -> np.ndarray:
  """(N,) matching distances between paired images: ``||P(a_i - b_i)||_2``."""
  a = embed(images_a, settings).astype(np.float64)
  b = embed(images_b, settings).astype(np.float64)
  return np.linalg.norm(a - b, axis=1)


def within_radius(images, targets, radius: float,
                  settings: MatchSettings = MatchSettings()) -> np.ndarray:
  """(N,) bool: image i is within ``radius`` of target i (an adaptive user's aim).

  Being within the radius of a target does not guarantee matching it: another
  record of the same label may be nearer still.
  """
  return distance(images, targets, settings) <= radius


def reencode_jpeg(images, quality: int = 75) -> np.ndarray:
  """Images in [-0.5, 0.5] through a JPEG round trip (uint8, PIL, 4:2:0).

  What an honest upload may go through; the server re-encodes a sample of its own
  records with it to calibrate the radius.
  """
  from PIL import Image  # Only the calibration needs PIL.

  images = np.asarray(images, np.float32)
  quantised = np.clip(np.round((images + 0.5) * 255.0), 0, 255).astype(np.uint8)
  out = []
  for image in quantised:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    out.append(decoded.reshape(image.shape))
  return (np.stack(out).astype(np.float32) / 255.0 - 0.5) if out else images.copy()


# ----------------------------------------------------------------------------------
# The index and its search


def build_index(settings: MatchSettings, images, labels, *, num_classes: int,
                record_ids=None) -> RecordIndex:
  """Embeds every stored record (while the server still holds its training set).

  Args:
    settings: ``MatchSettings``.
    images: (M, H, W, C) training images in [-0.5, 0.5].
    labels: (M,) their true labels.
    num_classes: K.
    record_ids: (M,) ids reported back by the search (default ``arange(M)``).
  """
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"Need one label per image: {len(images)} images, labels of "
                     f"shape {labels.shape}.")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Labels must be in [0, {num_classes}).")
  ids = (np.arange(len(labels), dtype=np.int64) if record_ids is None
         else np.asarray(record_ids, np.int64))
  if ids.shape != labels.shape:
    raise ValueError(f"record_ids of shape {ids.shape}; expected {labels.shape}.")
  order = np.argsort(labels, kind="stable")
  offsets = np.searchsorted(labels[order], np.arange(num_classes + 1)).astype(
      np.int64)
  return RecordIndex(settings, embed(images, settings)[order],
                     labels[order].astype(np.int32), ids[order], offsets)


def _nearest_rows(index: RecordIndex, queries: np.ndarray, label: int, k: int,
                  excluded: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Top-k (rows, squared distances) among label's records, in record chunks."""
  n = len(queries)
  best_rows = np.full((n, k), NO_RECORD, np.int64)
  best_d2 = np.full((n, k), np.inf)
  q_sq = np.einsum("nd,nd->n", queries, queries)[:, None]
  lo, hi = int(index.offsets[label]), int(index.offsets[label + 1])
  step = index.settings.chunk_size
  for start in range(lo, hi, step):
    stop = min(start + step, hi)
    records = index.embeddings[start:stop].astype(np.float64)
    d2 = q_sq + np.einsum("md,md->m", records, records)[None, :] - 2.0 * (
        queries @ records.T)
    np.maximum(d2, 0.0, out=d2)
    if excluded is not None:
      d2[:, excluded[start:stop]] = np.inf
    if stop - start > k:  # The chunk's own top k first (linear time).
      rows = np.argpartition(d2, k - 1, axis=1)[:, :k]
      d2 = np.take_along_axis(d2, rows, axis=1)
      rows = rows + start
    else:
      rows = np.broadcast_to(np.arange(start, stop), d2.shape)
    d2 = np.concatenate([best_d2, d2], axis=1)
    rows = np.concatenate([best_rows, rows], axis=1)
    keep = np.argsort(d2, axis=1, kind="stable")[:, :k]
    best_d2 = np.take_along_axis(d2, keep, axis=1)
    best_rows = np.take_along_axis(rows, keep, axis=1)
  best_rows = np.where(np.isinf(best_d2), NO_RECORD, best_rows)
  return best_rows, best_d2


def nearest_records(index: RecordIndex, images, labels, *, k: int = 1,
                    exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest stored records of each image's label, nearest first.

  Queries are grouped by label and compared with that label's records only (a
  record of another label is never returned), ``chunk_size`` records at a time.

  Args:
    index: the ``RecordIndex``.
    images: (N, H, W, C) queries.
    labels: (N,) their labels (the submitted labels).
    k: neighbours per query.
    exclude_ids: training-set ids never returned (e.g. records just unlearned).

  Returns:
    (ids, distances), each (N, k): training-set ids (``NO_RECORD`` past the
    label's records) and L2 distances in the matching space (inf there).
  """
  labels = np.asarray(labels, np.int64)
  queries = embed(images, index.settings).astype(np.float64)
  if labels.shape != (len(queries),):
    raise ValueError(f"Need one label per image: {len(queries)} images, labels "
                     f"of shape {labels.shape}.")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  excluded = None
  if exclude_ids is not None and len(exclude_ids):
    excluded = np.isin(index.record_ids, np.asarray(exclude_ids, np.int64))
  ids = np.full((len(labels), k), NO_RECORD, np.int64)
  d2 = np.full((len(labels), k), np.inf)
  num_classes = len(index.offsets) - 1
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if not 0 <= label < num_classes:
      continue  # No record has this label: inf, NO_RECORD.
    rows, dist2 = _nearest_rows(index, queries[members], int(label), k, excluded)
    ids[members] = np.where(rows >= 0, index.record_ids[np.maximum(rows, 0)],
                            NO_RECORD)
    d2[members] = dist2
  return ids, np.sqrt(d2)


def match_distance(index: RecordIndex, images, labels) -> np.ndarray:
  """(N,) distance to the nearest same-label record: the screen's score (higher =
  more suspicious), for ``calibrate_radius`` and ROC curves."""
  return nearest_records(index, images, labels, k=1)[1][:, 0]


def calibrate_radius(index: RecordIndex, honest_images, honest_labels, *,
                     rate: float = screening.DEFAULT_FALSE_REJECTION_RATE,
                     confidence: float | None = 0.95) -> float:
  """The radius refusing at most ``rate`` of honest samples (``screening.calibrate``),
  on new honest samples with probability ``confidence`` (None: on these).

  ``honest_images`` should be what honest users send: stored records after the
  re-encoding they may go through (``reencode_jpeg`` of a sample of the training
  set), calibrated on samples other than those the false rejection is measured on.
  """
  return screening.calibrate(match_distance(index, honest_images, honest_labels),
                             rate, confidence=confidence)


def match(index: RecordIndex, images, labels, radius: float) -> Matches:
  """Matches each image to its nearest same-label record; refuses beyond radius."""
  ids, distances = nearest_records(index, images, labels, k=1)
  distances = distances[:, 0]
  accepted = distances <= radius
  return Matches(np.where(accepted, ids[:, 0], NO_RECORD), distances, accepted,
                 float(radius))


def matched_records(matches: Matches) -> np.ndarray:
  """The distinct accepted record ids, in order of first submission: what the
  server unlearns (each record at most once)."""
  ids = matches.record_ids[matches.accepted]
  _, first = np.unique(ids, return_index=True)
  return ids[np.sort(first)]
