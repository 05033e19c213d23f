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
import jax
import numpy as np

from experiments.attacks.pushing import artefact
from experiments.attacks.pushing import blocks
from experiments.attacks.pushing import partial
from experiments.attacks.pushing import sample_rules
from experiments.attacks.pushing import screening
from experiments.run import compiling
from experiments.run import errors
from experiments.run import progress
from ounl_jax import data as data_lib
from ounl_jax.attacks import scheduler

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


def _push_stream(oracle, samples, keys, attack, hardness, on_chunk, keep=None,
                 positions=None):
  """One stream, hardest (largest ``hardness``) admitted first, so that the slow
  samples do not start last; rows come back in queue order (each sample draws
  from its own key, so the order changes nothing else). With ``keep``
  (``partial.Keep``) the samples of queue ``positions`` finished by an earlier run
  are restored, each one finishing now is saved, and the deadline stops it."""
  order = np.argsort(-hardness, kind="stable")
  resume = None if keep is None else keep.resume(np.asarray(positions)[order])
  try:
    result = attack.push(oracle, samples.images[order], samples.labels[order],
                         keys[order], oracle.init(), on_chunk, resume=resume)
  except scheduler.DeadlineReached as stop:
    raise partial.stopped(stop, keep) from None
  arrays = artefact.to_arrays(samples.take(order), result)
  back = np.argsort(order)
  return ({k: v[back] for k, v in arrays.items()},
          int(result.oracle_state.queries), artefact.occupancy_counts(result))


def _push_positions(oracle, candidates, queue, begin, end, key, attack, size, bar,
                    offset, hardness, keep=None):
  """Pushes queue positions [begin, end): one stream (resumed with ``keep``), or
  one call per block."""
  if attack.per_sample_keys:
    samples = candidates.take(queue[begin:end])
    keys = blocks.sample_keys(key, np.arange(begin, end), size)
    return _push_stream(oracle, samples, keys, attack, hardness[queue[begin:end]],
                        sample_rules.bar_callback(bar, offset), keep,
                        np.arange(begin, end))
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
                  show_progress: bool = True, keep=None) -> dict:
  """The released sample rule: push candidates in order until ``requested`` succeed.

  The correctly classified candidates (one counted query each) form a queue; queue
  position p is row ``p % size`` of block ``p // size`` and draws from
  ``sample_keys`` alone, so a run at 10% pushes exactly the first positions of a
  run at 50%, and blocks saved in ``store`` (``cache.block_cache``) serve
  every fraction. The user pushes exactly the positions still needed, all in one
  stream whose finished samples are replaced at once (attackers with
  ``per_sample_keys``, hardest first by ``screening.screening_margin``; the others push
  whole blocks, one call each), with a few ``spare`` positions, and pushes the
  shortfall again if more fail. With ``keep`` (``partial.Keep``) a stream's
  finished samples are saved as they finish and restored by a rerun, and its
  deadline stops the push (``errors.TimeBudgetReached``). Returns the used positions' arrays, with
  ``candidates_tried`` (candidates examined, in order), the misclassified among
  them, the screening queries, ``oracle_queries`` (screening plus the used
  positions' queries: the same whether pushed now or read) and ``push_queries``,
  ``seconds`` and ``compile_seconds`` (JAX compiling, within ``seconds``) of this
  run's pushes (spare positions included).
  """
  store = blocks.MemoryStore() if store is None else store
  queue = screening.screen(oracle, candidates, target_class)
  stream = _Stream(queue, requested, size, store, progress.progress(
      desc="pushing", unit="sample-it", enabled=show_progress), keep)
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
               end: int, keep=None) -> dict:
  """Pushes into ``store`` block ``block``'s queue positions before ``end`` that it
  does not hold yet: the positions ``push_released`` would push there (same queue,
  same per-position keys; a whole block for attackers without ``per_sample_keys``).
  A grid runs a push's blocks as independent tasks (``experiments/run/grid.py``);
  ``keep`` as in ``push_released``. Returns the ``rows`` pushed, their ``queries``, ``seconds`` and slot-iterations.
  """
  queue = screening.screen(oracle, candidates, target_class)
  first, kept = block * size, store.load(block)
  end = min(end if attack.per_sample_keys else first + size, first + size,
            len(queue.order))
  begin = first + (0 if kept is None else len(kept["ids"]))
  done = {"rows": max(end - begin, 0), "queries": 0, "seconds": 0.0}
  if begin < end:
    started = time.time()
    rows, done["queries"], counts = _push_positions(
        oracle, candidates, queue.order, begin, end, key, attack, size,
        progress.progress(enabled=False), 0, queue.hardness, keep)
    blocks.save_blocks(store, {block: kept}, rows, begin, size)
    if keep is not None:
      keep.prune(np.arange(begin, end))
    done.update({k: int(v) for k, v in counts.items()},
                seconds=time.time() - started)
  return done


class _Stream:
  """Where the released rule stands: positions taken, blocks read, this run's
  pushing (queries, seconds, compiling, rows)."""

  def __init__(self, queue: screening.Queue, requested: int, size: int, store, bar,
               keep=None):
    self.queue, self.requested, self.size = queue, requested, size
    self.store, self.bar, self.keep = store, bar, keep
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
  keep = stream.keep
  restored = 0 if keep is None else keep.restored
  rows, queries, counts = _push_positions(
      oracle, candidates, queue.order, position, end, key, attack, stream.size,
      stream.bar, stream.done, queue.hardness, keep)
  fresh = stream.fresh
  for name, count in counts.items():
    fresh[name] += int(count)
  fresh["queries"] += queries
  fresh["seconds"] += time.time() - started
  fresh["compile_seconds"] += compiling.compile_seconds() - compiled
  fresh["rows"] += end - position - ((keep.restored - restored) if keep else 0)
  blocks.save_blocks(stream.store, stream.saved, rows, position, stream.size)
  if keep is not None:
    keep.prune(np.arange(position, end))
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


def _summary(stream: _Stream, queue: screening.Queue, candidates: int) -> dict:
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
