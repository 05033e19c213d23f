"""The released sample rule's queue of saved blocks (experiments/attacks/pushing/sample_rules.py,
docs/protocol.md §4)."""

import dataclasses

import jax
import numpy as np

from experiments.attacks.pushing import artefact
from experiments.attacks.pushing import cache
from experiments.attacks.pushing import pushers
from experiments.attacks.pushing import blocks
from experiments.attacks.pushing import released_rule
from experiments.attacks.pushing import sample_rules
from experiments.attacks.pushing import screening
from ounl_jax import data as data_lib
from ounl_jax.attacks import labels as labels_lib
from tests.ounl_jax.attacks import test_pushing as tp

ROWS = ("ids", "pushing_i", "pushing_ii", "queries", "iterations")


def candidates(count=20):
  images, labels = tp.samples(count, seed=3)
  labels = labels.copy()
  labels[::5] = (labels[::5] + 1) % tp.CLASSES   # Some the model gets wrong.
  return data_lib.LabelledImages(images, labels, np.arange(100, 100 + count))


class RecordingStore(blocks.MemoryStore):
  """Remembers which blocks were read and written, and with how many rows."""

  def __init__(self):
    super().__init__()
    self.loads, self.saves = [], []

  def load(self, block):
    self.loads.append(block)
    return super().load(block)

  def save(self, block, rows):
    self.saves.append((block, len(rows["ids"])))
    super().save(block, rows)


def push(requested, store=None, size=4, per_sample_keys=True):
  attack = pushers.zoo_pusher(tp.UNTARGETED, None)._replace(
      per_sample_keys=per_sample_keys)
  return released_rule.push_released(tp.make_oracle(), candidates(), requested,
                              jax.random.key(7), attack, target_class=None,
                              size=size, store=store, show_progress=False)


def assert_same_rows(a, b):
  for name in ROWS:
    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6)


def test_small_n_is_the_prefix_of_large_n_and_reads_only_saved_rows():
  small_alone = push(3)
  store = RecordingStore()
  large = push(9, store)
  assert int(large["pushed_now"]) == released_rule.spare(9) and store.saves
  store.saves.clear()
  small = push(3, store)
  assert int(small["pushed_now"]) == 0 and bool(small["reused"])
  assert store.saves == [] and store.loads[-1] == 0
  rows = artefact.submitted_rows(small, 3)
  np.testing.assert_array_equal(small["ids"][rows],
                                large["ids"][artefact.submitted_rows(large, 9)[:3]])
  # ...and the same as the small request pushed from nothing (one key per sample).
  assert_same_rows(small, small_alone)
  assert small["candidates_tried"] == small_alone["candidates_tried"]
  assert small["oracle_queries"] == small_alone["oracle_queries"]
  # Misclassified candidates are skipped and counted, never pushed.
  assert int(small["candidates_misclassified"]) >= 1
  assert (small["original_labels"] == candidates().labels[
      np.isin(candidates().ids, small["ids"])]).all()


def test_large_n_after_small_n_pushes_only_the_positions_still_needed():
  store = RecordingStore()
  push(3, store)   # Pushes spare(3) = 4 positions: block 0, saved.
  first = int(artefact.successes(store.load(0)).sum())
  large = push(9, store)
  assert int(large["pushed_now"]) == released_rule.spare(9 - first)
  assert_same_rows(large, push(9))
  # A partly filled block is completed in place, never pushed twice.
  block, rows = store.saves[-1]
  assert rows <= 4 and block == (len(large["ids"]) - 1) // 4


def test_one_stream_pushes_exactly_the_shortfall():
  pushed = push(9)
  successes = int(artefact.successes(pushed).sum())
  assert successes == 9 or int(pushed["candidates_tried"]) == len(candidates())
  # Nothing beyond the ninth success was pushed.
  assert pushed["pushing_i_success"][-1] and pushed["pushing_ii_success"][-1]


def test_attackers_with_one_key_push_whole_blocks():
  store = RecordingStore()
  pushed = push(3, store, per_sample_keys=False)
  assert store.saves == [(0, 4)]
  assert int(pushed["pushed_now"]) == 4
  assert len(pushed["ids"]) <= 4   # Only the rows needed are submitted from it.


def test_oracle_total_counts_screening_and_every_push():
  pushed = push(9)
  assert int(pushed["oracle_queries"]) == len(candidates()) + int(
      pushed["queries"].sum())
  # This run's oracle work also covers the spare positions, saved for a larger N.
  store = RecordingStore()
  pushed = push(9, store)
  saved = sum(int(rows["queries"].sum()) for rows in store.values())
  assert int(pushed["push_queries"]) == saved > int(pushed["queries"].sum())


def test_a_stream_where_most_fail_says_how_to_fix_it(capsys):
  short = dataclasses.replace(
      tp.UNTARGETED, zoo=dataclasses.replace(tp.ZOO, max_iterations=1))
  attack = pushers.zoo_pusher(short, None)
  pushed = released_rule.push_released(tp.make_oracle(), candidates(), 9,
                                jax.random.key(7), attack, target_class=None,
                                size=4, show_progress=False)
  # Every candidate was tried (the rule pushes on), and the user was told why.
  assert int(pushed["candidates_tried"]) == len(candidates())
  err = capsys.readouterr().err
  assert "no_crossing" in err and "--max_iterations" in err


def test_a_stream_admits_the_hardest_first_and_the_order_changes_no_row():
  seen = []
  base = pushers.zoo_pusher(tp.UNTARGETED, None)

  def recording(oracle, images, labels, key, state, on_chunk, **kwargs):
    seen.append(np.asarray(images))
    return base.push(oracle, images, labels, key, state, on_chunk, **kwargs)

  attack = base._replace(push=recording)
  oracle = tp.make_oracle()
  released_rule.push_released(oracle, candidates(), 9, jax.random.key(7), attack,
                       target_class=None, size=4, show_progress=False)
  answers, _ = labels_lib.oracle_answers(oracle, oracle.init(), seen[0])
  assert (np.diff(screening.screening_margin(answers)) <= 1e-6).all()
  # Admitted in the opposite order, every row is the same (one key per sample).
  samples = candidates().take(np.arange(8))
  keys = blocks.sample_keys(jax.random.key(7), np.arange(8), 4)
  margin = np.linspace(0.0, 1.0, 8)
  hardest_first, _, _ = released_rule._push_stream(oracle, samples, keys, base, margin, None)
  easiest_first, _, _ = released_rule._push_stream(oracle, samples, keys, base, -margin, None)
  assert_same_rows(hardest_first, easiest_first)
  np.testing.assert_array_equal(hardest_first["ids"], samples.ids)


def test_fraction_first_push_is_timed_once_and_not_when_read_back(tmp_path):
  attack = pushers.zoo_pusher(tp.UNTARGETED, None)
  samples = candidates(6)
  oracle = tp.make_oracle()
  run = lambda: sample_rules.push_fraction_first(oracle, samples, jax.random.key(7), attack,
                                           show_progress=False)
  first = cache.cached_push(str(tmp_path), "abc", run)
  # Every image the oracle answered is this run's push work (no screening here).
  assert int(first["pushed_now"]) == 6 and not first["reused"]
  assert 0.0 <= float(first["compile_seconds"]) <= float(first["seconds"])
  assert int(first["push_queries"]) == int(first["oracle_queries"]) == int(
      first["queries"].sum()) > 0
  again = cache.cached_push(str(tmp_path), "abc", run)
  assert int(again["pushed_now"]) == 0 and again["reused"]
  assert_same_rows(first, again)


def test_compile_clock_counts_a_new_compilation_and_not_a_cached_call():
  from experiments.run import compiling  # pylint: disable=g-import-not-at-top
  double = jax.jit(lambda x: 2.0 * x + 1.0)   # A new function: never compiled.
  x = np.arange(7.0, dtype=np.float32)
  before = compiling.compile_seconds()
  double(x).block_until_ready()
  compiled = compiling.compile_seconds()
  double(x).block_until_ready()
  assert compiled > before and compiling.compile_seconds() == compiled
