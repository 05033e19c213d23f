"""Batched inference-mode log-probabilities of the server's own model."""

from __future__ import annotations

import functools

import jax
import numpy as np

from ounl_jax import models


@functools.lru_cache(maxsize=16)
def _log_softmax_fn(model: models.Model):
  return jax.jit(lambda variables, x: jax.nn.log_softmax(model.apply(variables, x)))


def log_probabilities(model: models.Model, variables, images, *,
                      batch_size: int = 500) -> np.ndarray:
  """(N, K) log-softmax in fixed-size batches (the last one padded: one compile)."""
  images = np.asarray(images, np.float32)
  fn = _log_softmax_fn(model)
  count = len(images)
  size = max(1, min(batch_size, count))
  out = []
  for start in range(0, count, size):
    chunk = images[start:start + size]
    pad = size - len(chunk)
    chunk = np.pad(chunk, ((0, pad),) + ((0, 0),) * (chunk.ndim - 1))
    out.append(np.asarray(fn(variables, chunk), np.float64)[:size - pad])
  return np.concatenate(out) if out else np.zeros((0, model.num_classes))
