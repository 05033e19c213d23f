"""The service's ledger of unlearned samples: L-infinity repeats, fast."""

import time

import numpy as np
import pytest

from ounl_jax import ledger as ledger_lib

SHAPE = (8, 8, 3)


def brute_force(stored, images, tolerance):
  """Every (index, 'ledger'|'request') the ledger must report, by full search."""
  found = set()
  for index, image in enumerate(images):
    if len(stored) and (np.abs(stored - image).reshape(len(stored), -1)
                        .max(1) <= tolerance).any():
      found.add((index, "ledger"))
    elif index and (np.abs(images[:index] - image).reshape(index, -1)
                    .max(1) <= tolerance).any():
      found.add((index, "request"))
  return found


@pytest.mark.parametrize("tolerance", [0.0, ledger_lib.DEFAULT_TOLERANCE, 0.05])
def test_matches_agree_with_a_full_search(tolerance):
  rng = np.random.default_rng(0)
  # Images on the 8-bit grid, as the datasets hold them, plus near copies.
  stored = (rng.integers(0, 256, (300,) + SHAPE) / 255 - 0.5).astype(np.float32)
  fresh = (rng.integers(0, 256, (100,) + SHAPE) / 255 - 0.5).astype(np.float32)
  picks = rng.integers(0, 300, 60)
  offsets = rng.choice([0.0, 1e-6, 0.4 / 255, 0.6 / 255, 0.04, 0.06], 60)
  near = np.clip(stored[picks] + offsets[:, None, None, None] * rng.choice(
      [-1, 1], (60,) + SHAPE), -0.5, 0.5).astype(np.float32)
  query = np.concatenate([fresh, near, fresh[:5] + np.float32(1e-7)])
  ledger = ledger_lib.SampleLedger(tolerance)
  ledger.add(stored)
  assert len(ledger) == 300
  got = ledger.matches(query)
  assert {(i, where) for i, where, _ in got} == brute_force(stored, query,
                                                           tolerance)
  for index, where, other in got:  # The reported partner is a real one.
    partner = stored[other] if where == "ledger" else query[other]
    assert np.abs(partner - query[index]).max() <= tolerance
  # Every exact copy at least (and the 1e-6 ones with a tolerance).
  assert len(got) >= int((offsets == 0).sum()) + (tolerance > 0) * int(
      (offsets == 1e-6).sum()) > 0


def test_thousands_of_entries_are_searched_quickly():
  rng = np.random.default_rng(1)
  stored = (rng.integers(0, 256, (5000, 32, 32, 3)) / 255 - 0.5).astype(np.float32)
  ledger = ledger_lib.SampleLedger()
  started = time.perf_counter()
  ledger.add(stored)
  query = np.concatenate([
      (rng.integers(0, 256, (1000, 32, 32, 3)) / 255 - 0.5).astype(np.float32),
      np.clip(stored[:50] + np.float32(1e-6), -0.5, 0.5)])
  got = ledger.matches(query)
  seconds = time.perf_counter() - started
  assert [(i, w, o) for i, w, o in got] == [(1000 + k, "ledger", k)
                                            for k in range(50)]
  # A full search is 5,000 x 1,050 x 3,072 comparisons (tens of seconds).
  assert seconds < 10, seconds


def test_bad_tolerance():
  for bad in (-1e-3, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="tolerance"):
      ledger_lib.SampleLedger(bad)
