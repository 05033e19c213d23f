"""The server's ledger of unlearned samples: each sample can be unlearned once.

A data-free unlearning method (paper Eq. 13) moves the model once per submitted
image, so a sample submitted again, whether bit for bit, in a later request, or
with a little noise added, would be unlearned twice. ``SampleLedger`` remembers
what the server has unlearned and finds, for each image of a new request, an
earlier one within ``tolerance`` in the L-infinity norm (every pixel within
``tolerance``), among the ledger's entries and the request's own earlier images.

The default tolerance is half an 8-bit grey level, ``0.5 / 255`` in the service's
``x / 255 - 0.5`` pixels: two different 8-bit images differ by at least one grey
level (``1 / 255``) in some pixel, so they are never confused, while any copy of a
sample that rounds back to the same 8-bit image (noise, re-encoding, float
rounding) is caught. A perturbation larger than that in some pixel is a different
image to the ledger (a pushed image, for instance, is not its original).

Search cost. Each image is summarised by ``features`` (the means of ``groups``
contiguous runs of its pixels), which move by at most ``tolerance`` when no pixel
moves by more (a mean is 1-Lipschitz in L-infinity). Entries are bucketed by
their overall mean (bucket width >= tolerance, so a match lies in the image's
bucket or a neighbour); the candidates of those buckets are pre-filtered on the
features, and only the survivors are compared pixel by pixel. A request of N
images against M entries costs O(N) dictionary look-ups plus a handful of
candidate comparisons per image for natural images, not O(N * M) pixel
comparisons.

Memory. With ``tolerance > 0`` the ledger keeps each unlearned image's float32
pixels (``H * W * C * 4`` bytes, 12 KiB for CIFAR) to compare them exactly; with
``tolerance == 0`` it keeps only a sha256 digest per image (exact repeats only).

>>> import numpy as np
>>> ledger = SampleLedger(tolerance=0.5 / 255)
>>> x = np.linspace(-0.5, 0.5, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
>>> ledger.matches(x)
[]
>>> ledger.add(x)
>>> ledger.matches(np.stack([x[1] + 1e-6, x[0] * 0.5]))
[(0, 'ledger', 1)]
>>> ledger.matches(np.stack([x[0] * 0.5, x[0] * 0.5 - 1e-6]))
[(1, 'request', 0)]
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# Half an 8-bit grey level in x / 255 - 0.5 pixels.
DEFAULT_TOLERANCE = 0.5 / 255
# Float slack on the pre-filter: features are float64 means of float32 pixels.
_SLACK = 1e-9


def _digest(image: np.ndarray) -> bytes:
  # + 0.0 turns -0.0 into 0.0: equal pixel values, equal bytes.
  return hashlib.sha256(
      np.ascontiguousarray(image, np.float32).tobytes()).digest()


class SampleLedger:
  """What a server has unlearned, searchable within an L-infinity tolerance.

  ``matches(images)`` finds repeats without changing the ledger; ``add(images)``
  records a request once its update is in the parameters (the service does both
  under its lock, so a refused request records nothing).
  """

  def __init__(self, tolerance: float = DEFAULT_TOLERANCE, *, groups: int = 48):
    if not (tolerance >= 0 and math.isfinite(tolerance)):
      raise ValueError(f"Ledger tolerance must be a finite number >= 0, got "
                       f"{tolerance}.")
    self.tolerance = float(tolerance)
    self._groups = groups
    self._count = 0
    self._digests: dict[bytes, int] = {}
    self._width = max(self.tolerance, 1e-6) * 2  # bucket width >= tolerance
    self._buckets: dict[int, list[int]] = {}
    self._features = np.zeros((0, 0))
    self._pixels: list[np.ndarray] = []

  def __len__(self) -> int:
    return self._count

  def _summaries(self, images: np.ndarray):
    flat = np.ascontiguousarray(images, np.float32).reshape(len(images), -1)
    groups = min(self._groups, flat.shape[1])
    bounds = np.linspace(0, flat.shape[1], groups + 1).astype(int)
    features = np.add.reduceat(flat.astype(np.float64), bounds[:-1], axis=1)
    features /= np.diff(bounds)
    means = flat.astype(np.float64).mean(axis=1)
    return flat, features, means

  def _bucket(self, mean: float) -> int:
    return int(math.floor(mean / self._width))

  def matches(self, images) -> list[tuple[int, str, int]]:
    """``(index, 'ledger', entry)`` or ``(index, 'request', earlier index)`` for
    every image of ``images`` (N, ...) within ``tolerance`` of an unlearned
    sample or of an earlier image of the same batch (the first such found)."""
    images = np.asarray(images, np.float32)
    found = []
    if self.tolerance == 0:
      seen: dict[bytes, int] = {}
      for index, image in enumerate(images):
        digest = _digest(image + np.float32(0.0))
        if digest in self._digests:
          found.append((index, "ledger", self._digests[digest]))
        elif digest in seen:
          found.append((index, "request", seen[digest]))
        else:
          seen[digest] = index
      return found
    flat, features, means = self._summaries(images)
    limit = self.tolerance + _SLACK
    local: dict[int, list[int]] = {}
    for index in range(len(flat)):
      bucket = self._bucket(means[index])
      hit = None
      for where, buckets, pool_features, pool_pixels in (
          ("ledger", self._buckets, self._features, self._pixels),
          ("request", local, features, flat)):
        candidates = [c for b in (bucket - 1, bucket, bucket + 1)
                      for c in buckets.get(b, ())]
        if not candidates:
          continue
        candidates = np.asarray(candidates)
        close = np.max(np.abs(pool_features[candidates] - features[index]),
                       axis=1) <= limit
        for candidate in candidates[close]:
          difference = np.max(np.abs(pool_pixels[candidate] - flat[index]))
          if difference <= self.tolerance:
            hit = (index, where, int(candidate))
            break
        if hit:
          break
      if hit:
        found.append(hit)
      local.setdefault(bucket, []).append(index)
    return found

  def add(self, images) -> None:
    """Records ``images`` (N, ...) as unlearned."""
    images = np.asarray(images, np.float32)
    if self.tolerance == 0:
      for image in images:
        self._digests.setdefault(_digest(image + np.float32(0.0)), self._count)
        self._count += 1
      return
    flat, features, means = self._summaries(images)
    if self._features.shape[0] < self._count + len(flat):  # grow by doubling
      grown = np.zeros((max(2 * self._features.shape[0], self._count + len(flat)),
                        features.shape[1]))
      if self._count:
        grown[:self._count] = self._features[:self._count]
      self._features = grown
    self._features[self._count:self._count + len(flat)] = features
    for row, mean in zip(flat, means):
      self._buckets.setdefault(self._bucket(mean), []).append(self._count)
      self._pixels.append(row.copy())
      self._count += 1
