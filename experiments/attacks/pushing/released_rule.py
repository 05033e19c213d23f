"""The released sample rule (the authors' code, the default; docs/protocol.md §4).

N = ``fraction`` x (class A's training samples). The user pushes class-A training
samples in a seeded order until N of them have been pushed by both Pushing-I and
Pushing-II (or the class runs out), and submits exactly those N. Every candidate
is first classified with one (counted) query; the misclassified ones are skipped.
The pushes are kept in fixed blocks of queue positions, so every fraction reuses
the blocks of the others (``cache.block_cache`` keeps them on disk).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np

from experiments.attacks.pushing import artefact
from experiments.attacks.pushing import blocks
from experiments.attacks.pushing import sample_rules
from experiments.run import compiling
from experiments.run import errors
from experiments.run import progress
from ounl_jax import data as data_lib
from ounl_jax.attacks import labels as labels_lib

def spare(needed: int) -> int:
  """Positions pushed for ``needed`` successes: 2% more (at least one), so that
  the usual few failures (1.2% on the cpu-scale model) need no second push whose
  slowest sample runs alone; the spares are saved for a larger N.

  >>> spare(400), spare(3)
  (408, 4)
  """
  return needed + max(1, needed // 50)


def _enough(rows: dict, needed: int) -> int:
  """How many leading rows hold ``needed`` successes (all rows if they do not)."""
  hits = np.flatnonzero(artefact.successes(rows))
  return int(hits[needed - 1]) + 1 if len(hits) >= needed else len(rows["ids"])


def screening_margin(answers: np.ndarray) -> np.ndarray:
  """log p_top1 - log p_top2 of each screening answer (zeros for labels).

  How far the clean model puts a sample from its boundary: it ranks the ZOO
  iterations a sample needs (Spearman 0.88 on the cpu-scale model's 768 first
  candidates).

  >>> screening_margin(np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]])).round(2)
  array([1.25, 0.22])
  """
  if answers.ndim == 1:
    return np.zeros(answers.shape, np.float32)
  top = np.sort(np.log(np.maximum(answers, 1e-30)), axis=-1)
  return top[:, -1] - top[:, -2]


def _push_stream(oracle, samples, keys, attack, hardness, on_chunk):
  """One stream, hardest (largest ``hardness``) admitted first, so that the slow
  samples do not start last; rows come back in queue order (each sample draws
  from its own key, so the order changes nothing else)."""
  order = np.argsort(-hardness, kind="stable")
  result = attack.push(oracle, samples.images[order], samples.labels[order],
                       keys[order], oracle.init(), on_chunk)
  arrays = artefact.to_arrays(samples.take(order), result)
  back = np.argsort(order)
  return ({k: v[back] for k, v in arrays.items()},
          int(result.oracle_state.queries), artefact.occupancy_counts(result))


def _push_positions(oracle, candidates, queue, begin, end, key, attack, size, bar,
                    offset, hardness):
  """Pushes queue positions [begin, end): one stream, or one call per block."""
  if attack.per_sample_keys:
    samples = candidates.take(queue[begin:end])
    keys = blocks.sample_keys(key, np.arange(begin, end), size)
    return _push_stream(oracle, samples, keys, attack, hardness[queue[begin:end]],
                        sample_rules.bar_callback(bar, offset))
  parts, queries, counts = [], 0, []
  for b in range(begin // size, -(-end // size)):  # Whole blocks: fold_in(key, b).
    first, last = b * size, min((b + 1) * size, end)
    samples = candidates.take(queue[first:last])
    result = attack.push(oracle, samples.images, samples.labels,
                         jax.random.fold_in(key, b), oracle.init(),
                         sample_rules.bar_callback(bar, offset + first - begin))
    parts.append(artefact.to_arrays(samples, result))
    queries += int(result.oracle_state.queries)
    counts.append(artefact.occupancy_counts(result))
  return artefact.concatenate(parts), queries, {
      k: np.asarray(sum(int(c[k]) for c in counts)) for k in counts[0]}


def push_released(oracle, candidates: data_lib.LabelledImages, requested: int,
                  key: jax.Array, attack, *, target_class: int | None,
                  size: int = blocks.BLOCK_SIZE, store=None,
                  show_progress: bool = True) -> dict:
  """The released sample rule: push candidates in order until ``requested`` succeed.

  The correctly classified candidates (one counted query each) form a queue; queue
  position p is row ``p % size`` of block ``p // size`` and draws from
  ``sample_keys`` alone, so a run at 10% pushes exactly the first positions of a
  run at 50%, and blocks saved in ``store`` (``cache.block_cache``) serve
  every fraction. The user pushes exactly the positions still needed, all in one
  stream whose finished samples are replaced at once (attackers with
  ``per_sample_keys``, hardest first by ``screening_margin``; the others push
  whole blocks, one call each), with a few ``spare`` positions, and pushes the
  shortfall again if more fail. Returns the used positions' arrays, with
  ``candidates_tried`` (candidates examined, in order), the misclassified among
  them, the screening queries, ``oracle_queries`` (screening plus the used
  positions' queries: the same whether pushed now or read) and ``push_queries``,
  ``seconds`` and ``compile_seconds`` (JAX compiling, within ``seconds``) of this
  run's pushes (spare positions included).
  """
  store = blocks.MemoryStore() if store is None else store
  queue = _screen(oracle, candidates, target_class)
  stream = _Stream(queue, requested, size, store, progress.progress(
      total=requested, desc="pushing", unit="sample", enabled=show_progress))
  while stream.done < requested and stream.position < len(queue.order):
    _take_next(stream, oracle, candidates, key, attack)
  stream.bar.close()
  if not stream.taken:
    raise errors.UserError(
        f"The model misclassifies all {len(candidates)} training samples of class "
        "A, so none can be pushed; train the model longer (--epochs).")
  return _summary(stream, queue, len(candidates))


def push_block(oracle, candidates: data_lib.LabelledImages, key: jax.Array,
               attack, *, target_class: int | None, size: int, store, block: int,
               end: int) -> dict:
  """Pushes into ``store`` block ``block``'s queue positions before ``end`` that it
  does not hold yet: the positions ``push_released`` would push there (same queue,
  same per-position keys; a whole block for attackers without ``per_sample_keys``).
  A grid runs a push's blocks as independent tasks (``experiments/run/grid.py``).
  Returns the ``rows`` pushed, their ``queries``, ``seconds`` and slot-iterations.
  """
  queue = _screen(oracle, candidates, target_class)
  first, kept = block * size, store.load(block)
  end = min(end if attack.per_sample_keys else first + size, first + size,
            len(queue.order))
  begin = first + (0 if kept is None else len(kept["ids"]))
  done = {"rows": max(end - begin, 0), "queries": 0, "seconds": 0.0}
  if begin < end:
    started = time.time()
    rows, done["queries"], counts = _push_positions(
        oracle, candidates, queue.order, begin, end, key, attack, size,
        progress.progress(total=end - begin, enabled=False), 0, queue.hardness)
    blocks.save_blocks(store, {block: kept}, rows, begin, size)
    done.update({k: int(v) for k, v in counts.items()},
                seconds=time.time() - started)
  return done


class _Queue(NamedTuple):
  """The screened candidates: pushable ones in order, and how hard each is."""

  order: np.ndarray          # Candidate indices of the pushable ones.
  pushable: np.ndarray       # Per candidate.
  hardness: np.ndarray       # Per candidate: ``screening_margin``.
  screening_queries: int


def _screen(oracle, candidates, target_class) -> _Queue:
  """One counted query per candidate: the correctly classified ones queue up."""
  answers, state = labels_lib.oracle_answers(oracle, oracle.init(),
                                             candidates.images)
  predicted = labels_lib.answered_classes(oracle, answers)
  pushable = predicted == candidates.labels
  if target_class is not None:
    pushable &= predicted != target_class
  return _Queue(np.flatnonzero(pushable), pushable, screening_margin(answers),
                int(state.queries))


class _Stream:
  """Where the released rule stands: positions taken, blocks read, this run's
  pushing (queries, seconds, compiling, rows)."""

  def __init__(self, queue: _Queue, requested: int, size: int, store, bar):
    self.queue, self.requested, self.size = queue, requested, size
    self.store, self.bar = store, bar
    self.taken, self.saved, self.done, self.position = [], {}, 0, 0
    self.fresh = {"queries": 0, "seconds": 0.0, "compile_seconds": 0.0, "rows": 0,
                  "slot_iterations": 0, "busy_slot_iterations": 0}


def _push_more(stream: _Stream, oracle, candidates, key, attack) -> dict:
  """Pushes the positions still needed (and a few spare) from the current one."""
  queue, position = stream.queue, stream.position
  end = position + spare(stream.requested - stream.done)
  if not attack.per_sample_keys:
    end = -(-end // stream.size) * stream.size
  end = min(end, len(queue.order))
  started, compiled = time.time(), compiling.compile_seconds()
  rows, queries, counts = _push_positions(
      oracle, candidates, queue.order, position, end, key, attack, stream.size,
      stream.bar, stream.done, queue.hardness)
  fresh = stream.fresh
  for name, count in counts.items():
    fresh[name] += int(count)
  fresh["queries"] += queries
  fresh["seconds"] += time.time() - started
  fresh["compile_seconds"] += compiling.compile_seconds() - compiled
  fresh["rows"] += end - position
  blocks.save_blocks(stream.store, stream.saved, rows, position, stream.size)
  sample_rules.warn_if_few_succeed(rows, stream.requested - stream.done,
                       len(queue.order) - end)
  return rows


def _take_next(stream: _Stream, oracle, candidates, key, attack) -> None:
  """Takes the next rows: saved ones if their block holds them, else pushed."""
  block, row = divmod(stream.position, stream.size)
  if block not in stream.saved:
    stream.saved[block] = stream.store.load(block)
  kept = stream.saved[block]
  have = 0 if kept is None else len(kept["ids"])
  rows = (artefact.rows(kept, row, have) if have > row else
          _push_more(stream, oracle, candidates, key, attack))
  rows = artefact.rows(rows, 0, _enough(rows, stream.requested - stream.done))
  stream.taken.append(rows)
  stream.done += int(artefact.successes(rows).sum())
  stream.position += len(rows["ids"])
  stream.bar.n = min(stream.done, stream.requested)
  stream.bar.refresh()


def _summary(stream: _Stream, queue: _Queue, candidates: int) -> dict:
  """The used positions' rows and the push's totals (``artefact.SUMMARY_FIELDS``)."""
  arrays = artefact.concatenate(stream.taken)
  tried = int(queue.order[stream.position - 1]) + 1
  fresh = stream.fresh
  arrays.update(
      candidates_tried=np.asarray(tried),
      candidates_misclassified=np.asarray(int(np.sum(~queue.pushable[:tried]))),
      screening_queries=np.asarray(candidates),
      oracle_queries=np.asarray(queue.screening_queries
                                + int(arrays["queries"].sum())),
      requested=np.asarray(stream.requested),
      push_queries=np.asarray(fresh["queries"]),
      seconds=np.asarray(fresh["seconds"]),
      compile_seconds=np.asarray(fresh["compile_seconds"]),
      pushed_now=np.asarray(fresh["rows"]), reused=np.asarray(fresh["rows"] == 0),
      slot_iterations=np.asarray(fresh["slot_iterations"]),
      busy_slot_iterations=np.asarray(fresh["busy_slot_iterations"]))
  return arrays
