"""The released sample rule's fixed blocks (experiments/pushes.py, docs/protocol.md §4)."""

import jax
import numpy as np

from experiments import pushers
from experiments import pushes
from ounl_jax import data as data_lib
from ounl_jax.attacks import pushing
from tests import test_pushing as tp


def candidates(count=20):
  images, labels = tp.samples(count, seed=3)
  labels = labels.copy()
  labels[::5] = (labels[::5] + 1) % tp.CLASSES   # Some the model gets wrong.
  return data_lib.LabelledImages(images, labels, np.arange(100, 100 + count))


def push(requested, store, size=4):
  attack = pushers.make("zoo", tp.UNTARGETED, None)
  return pushes.push_released(tp.make_oracle(), candidates(), requested,
                              jax.random.key(7), attack, target_class=None,
                              size=size, block_store=store, show_progress=False)


def recording_store(saved, calls):
  def store(block, run):
    calls.append((block, block in saved))
    if block not in saved:
      saved[block] = run()
    return saved[block]
  return store


def test_small_n_is_the_prefix_of_large_n_and_reuses_its_blocks():
  small_alone = push(3, None)
  saved, calls = {}, []
  large = push(9, recording_store(saved, calls))
  assert [c[1] for c in calls] == [False] * len(calls) and len(calls) >= 3
  calls.clear()
  small = push(3, recording_store(saved, calls))
  # The small request only reads the first block(s) of the large one...
  assert calls == [(0, True)]
  rows = pushes.submitted_rows(small, 3)
  np.testing.assert_array_equal(rows, pushes.submitted_rows(large, 9)[:3])
  # ...and is bit-identical to the same request pushed from nothing.
  for name in ("ids", "pushing_i", "pushing_ii", "queries"):
    np.testing.assert_array_equal(small[name], small_alone[name])
  assert small["candidates_tried"] == small_alone["candidates_tried"]
  assert small["oracle_queries"] == small_alone["oracle_queries"]
  # Misclassified candidates are skipped and counted, never pushed.
  assert int(small["candidates_misclassified"]) >= 1
  assert (small["original_labels"] == candidates().labels[
      np.isin(candidates().ids, small["ids"])]).all()


def test_oracle_total_counts_screening_and_every_block():
  pushed = push(9, None)
  assert int(pushed["oracle_queries"]) == len(candidates()) + int(
      pushed["queries"].sum())
