"""Which samples the malicious user pushes and submits, and the push cache.

Two sample rules (docs/protocol.md §4):

* ``released`` (default, the authors' code): N = ``fraction`` x (class A's training
  samples). The user pushes class-A training samples in a seeded order until N of
  them have been pushed by both Pushing-I and Pushing-II (or the class runs out),
  and submits exactly those N. Every candidate is first classified with one
  (counted) query; the misclassified ones are skipped.
* ``fraction_first`` (this project's first rule): a seeded ``fraction`` of class A
  is drawn first; the samples that fail (misclassified, not pushed) are dropped, so
  fewer than N are submitted.

Pushes are saved and reused by ``experiments/attacks/pushing/cache.py``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.run import compiling
from experiments.run import errors
from experiments.run import progress
from ounl_jax import data as data_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing as pushing_lib

SAMPLE_RULES = ("released", "fraction_first")
PUSHED_FIELDS = ("images", "labels", "l2", "predicted", "iteration", "success",
                 "status")
# Correctly classified candidates pushed together under the released rule: blocks
# do not depend on N, so every fraction reuses the blocks of the others.
BLOCK_SIZE = 128
# The PushResult fields saved per sample, beside its id and original image.
RESULT_FIELDS = ("original_labels", "predicted_before", "attacked", "crossed",
                 "iterations", "queries", "attack_queries", "evaluation_queries")
# Every per-sample array of a push (``to_arrays``; what a saved block holds).
ROW_FIELDS = ("ids", "original") + RESULT_FIELDS + tuple(
    name if field == "images" else f"{name}_{field}"
    for name in ("pushing_i", "pushing_ii") for field in PUSHED_FIELDS)


def to_arrays(samples: data_lib.LabelledImages, result: pushing_lib.PushResult
              ) -> dict[str, np.ndarray]:
  """One push as flat arrays (what ``attack/pushed.npz`` holds)."""
  arrays = {"ids": samples.ids, "original": samples.images,
            **{field: getattr(result, field) for field in RESULT_FIELDS}}
  for name, pushed in (("pushing_i", result.pushing_i),
                       ("pushing_ii", result.pushing_ii)):
    for field in PUSHED_FIELDS:
      arrays[name if field == "images" else f"{name}_{field}"] = getattr(pushed,
                                                                        field)
  return arrays


def concatenate(rounds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([r[k] for r in rounds]) for k in rounds[0]}


def requested_count(train: data_lib.LabelledImages, class_a: int, fraction: float,
                    max_samples: int | None) -> int:
  """N = fraction x (class A's training samples), capped at ``max_samples``."""
  members = int(np.sum(train.labels == class_a))
  count = int(members * fraction)
  if count < 1:
    raise errors.UserError(
        f"--fraction={fraction} of the {members} training samples of class A "
        "selects no sample; use a larger --fraction.")
  return count if max_samples is None else min(count, max_samples)


def candidate_order(train: data_lib.LabelledImages, class_a: int,
                    seed: int) -> data_lib.LabelledImages:
  """Class A's training samples in the user's seeded order."""
  members = np.flatnonzero(train.labels == class_a)
  return train.take(np.random.default_rng(seed).permutation(members))


def _bar_callback(bar, offset: int):
  def on_chunk(progress):
    bar.n = min(offset + progress.samples_done, bar.total)
    bar.set_postfix(iteration=progress.iteration, queries=progress.oracle_queries)
    bar.refresh()
  return on_chunk


def block_size(max_samples: int | None) -> int:
  """Candidates per block: ``BLOCK_SIZE``, or fewer when N is capped (smoke runs)."""
  return BLOCK_SIZE if max_samples is None else max(1, min(BLOCK_SIZE, max_samples))


class MemoryStore(dict):
  """A block store in memory: ``load(b)`` (None if absent) and ``save(b, rows)``.

  ``cache.block_cache`` is the same on disk, shared by every run in a workdir.
  """

  def load(self, block: int) -> dict | None:
    return self.get(block)

  def save(self, block: int, rows: dict) -> None:
    self[block] = rows


def sample_keys(key: jax.Array, positions: np.ndarray, size: int) -> jax.Array:
  """The key of queue position p: ``fold_in(fold_in(key, p // size), p % size)``.

  Block b's row r draws from it alone, whatever it is pushed with.
  """
  blocks, rows = np.divmod(np.asarray(positions, np.int64), size)
  fold = jax.vmap(jax.random.fold_in)
  return fold(fold(jnp.broadcast_to(key, blocks.shape), blocks), rows)


def spare(needed: int) -> int:
  """Positions pushed for ``needed`` successes: 2% more (at least one), so that
  the usual few failures (1.2% on the cpu-scale model) need no second push whose
  slowest sample runs alone; the spares are saved for a larger N.

  >>> spare(400), spare(3)
  (408, 4)
  """
  return needed + max(1, needed // 50)


def _rows(arrays: dict, begin: int, end: int) -> dict:
  return {k: arrays[k][begin:end] for k in ROW_FIELDS}


def _successes(rows: dict) -> np.ndarray:
  return rows["pushing_i_success"] & rows["pushing_ii_success"]


def _enough(rows: dict, needed: int) -> int:
  """How many leading rows hold ``needed`` successes (all rows if they do not)."""
  hits = np.flatnonzero(_successes(rows))
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
  arrays = to_arrays(samples.take(order), result)
  back = np.argsort(order)
  return {k: v[back] for k, v in arrays.items()}, int(result.oracle_state.queries)


def _push_positions(oracle, candidates, queue, begin, end, key, attack, size, bar,
                    offset, hardness):
  """Pushes queue positions [begin, end): one stream, or one call per block."""
  if attack.per_sample_keys:
    samples = candidates.take(queue[begin:end])
    return _push_stream(oracle, samples, sample_keys(key, np.arange(begin, end), size),
                        attack, hardness[queue[begin:end]], _bar_callback(bar, offset))
  parts, queries = [], 0
  for b in range(begin // size, -(-end // size)):  # Whole blocks: fold_in(key, b).
    first, last = b * size, min((b + 1) * size, end)
    samples = candidates.take(queue[first:last])
    result = attack.push(oracle, samples.images, samples.labels,
                         jax.random.fold_in(key, b), oracle.init(),
                         _bar_callback(bar, offset + first - begin))
    parts.append(to_arrays(samples, result))
    queries += int(result.oracle_state.queries)
  return concatenate(parts), queries


def _save_blocks(store, saved: dict, rows: dict, begin: int, size: int) -> None:
  """Appends pushed rows (from queue position ``begin``) to their blocks."""
  position, end = begin, begin + len(rows["ids"])
  while position < end:
    block, row = divmod(position, size)
    stop = min((block + 1) * size, end)
    part = _rows(rows, position - begin, stop - begin)
    kept = saved.get(block)
    if kept is not None and row:
      part = concatenate([_rows(kept, 0, row), part])
    saved[block] = part
    store.save(block, part)
    position = stop


def _warn_if_few_succeed(rows: dict, needed: int, left: int) -> None:
  """Says so when fewer than half of a stream succeed: the rule would push on."""
  successes = int(_successes(rows).sum())
  pushed = len(rows["ids"])
  if successes >= needed or 2 * successes >= pushed:
    return
  reasons = np.unique(rows["pushing_ii_status"][~_successes(rows)],
                      return_counts=True)
  why = ", ".join(f"{int(c)} {r}" for r, c in zip(*reasons))
  estimate = (needed - successes) * pushed // max(successes, 1)
  errors.warn(f"Only {successes} of {pushed} pushed samples succeeded ({why}); at "
              f"this rate the {needed - successes} still needed take about "
              f"{estimate} more candidates ({left} are left). Raise --max_iterations "
              "(no_crossing) or lower --fraction.")


def push_released(oracle, candidates: data_lib.LabelledImages, requested: int,
                  key: jax.Array, attack, *, target_class: int | None,
                  size: int = BLOCK_SIZE, store=None,
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
  store = MemoryStore() if store is None else store
  state = oracle.init()
  answers, state = labels_lib.oracle_answers(oracle, state, candidates.images)
  predicted = labels_lib.answered_classes(oracle, answers)
  pushable = predicted == candidates.labels
  if target_class is not None:
    pushable &= predicted != target_class
  queue = np.flatnonzero(pushable)
  hardness = screening_margin(answers)
  taken, saved, done, position = [], {}, 0, 0
  fresh = {"queries": 0, "seconds": 0.0, "compile_seconds": 0.0, "rows": 0}
  bar = progress.progress(total=requested, desc="pushing", unit="sample",
                        enabled=show_progress)
  while done < requested and position < len(queue):
    block, row = divmod(position, size)
    if block not in saved:
      saved[block] = store.load(block)
    have = 0 if saved[block] is None else len(saved[block]["ids"])
    if have > row:  # Saved rows: take those still needed.
      rows = _rows(saved[block], row, have)
    else:
      end = position + spare(requested - done)
      if not attack.per_sample_keys:
        end = -(-end // size) * size
      end = min(end, len(queue))
      started, compiled = time.time(), compiling.compile_seconds()
      rows, queries = _push_positions(oracle, candidates, queue, position, end,
                                      key, attack, size, bar, done, hardness)
      fresh["queries"] += queries
      fresh["seconds"] += time.time() - started
      fresh["compile_seconds"] += compiling.compile_seconds() - compiled
      fresh["rows"] += end - position
      _save_blocks(store, saved, rows, position, size)
      _warn_if_few_succeed(rows, requested - done, len(queue) - end)
    rows = _rows(rows, 0, _enough(rows, requested - done))
    taken.append(rows)
    done += int(_successes(rows).sum())
    position += len(rows["ids"])
    bar.n = min(done, requested)
    bar.refresh()
  bar.close()
  if not taken:
    raise errors.UserError(
        f"The model misclassifies all {len(candidates)} training samples of class "
        "A, so none can be pushed; train the model longer (--epochs).")
  arrays = concatenate(taken)
  tried = int(queue[position - 1]) + 1
  arrays.update(
      candidates_tried=np.asarray(tried),
      candidates_misclassified=np.asarray(int(np.sum(~pushable[:tried]))),
      screening_queries=np.asarray(len(candidates)),
      oracle_queries=np.asarray(int(state.queries) + int(arrays["queries"].sum())),
      requested=np.asarray(requested), push_queries=np.asarray(fresh["queries"]),
      seconds=np.asarray(fresh["seconds"]),
      compile_seconds=np.asarray(fresh["compile_seconds"]),
      pushed_now=np.asarray(fresh["rows"]),
      reused=np.asarray(fresh["rows"] == 0))
  return arrays


def push_fraction_first(oracle, samples: data_lib.LabelledImages, key: jax.Array,
                        attack, *, show_progress: bool = True) -> dict:
  """The first rule: push every drawn sample; the failures are dropped later.

  ``push_queries``, ``compile_seconds`` and ``pushed_now`` are this run's
  (``cached_push`` adds the seconds, and sets ``pushed_now`` to 0 when it reads a
  saved push).
  """
  bar = progress.progress(total=len(samples), desc="pushing", unit="sample",
                        enabled=show_progress)
  compiled = compiling.compile_seconds()
  result = attack.push(oracle, samples.images, samples.labels, key, oracle.init(),
                       _bar_callback(bar, 0))
  compiled = compiling.compile_seconds() - compiled
  bar.close()
  arrays = to_arrays(samples, result)
  arrays.update(candidates_tried=np.asarray(len(samples)),
                candidates_misclassified=np.asarray(int(np.sum(~result.attacked))),
                screening_queries=np.asarray(0),
                oracle_queries=np.asarray(result.oracle_queries),
                push_queries=np.asarray(result.oracle_queries),
                pushed_now=np.asarray(len(samples)),
                compile_seconds=np.asarray(compiled),
                requested=np.asarray(len(samples)))
  return arrays


def submitted_rows(pushed: dict, requested: int) -> np.ndarray:
  """The rows submitted: the first ``requested`` pushed by both methods."""
  both = pushed["pushing_i_success"] & pushed["pushing_ii_success"]
  return np.flatnonzero(both)[:requested]


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return {"mean": None, "median": None, "std": None, "max": None}
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "std": float(values.std()), "max": float(values.max())}


def statistics(pushed: dict) -> dict:
  """What results.json reports of a push: counts, failures, L2, queries, time."""
  attacked = pushed["attacked"]
  stats = {"requested": int(pushed["requested"]),
           "candidates_tried": int(pushed["candidates_tried"]),
           "candidates_misclassified": int(pushed["candidates_misclassified"]),
           "samples": int(len(attacked)), "attacked": int(attacked.sum()),
           "misclassified_at_start": int((~attacked).sum()),
           "crossed": int(pushed["crossed"].sum()),
           "queries_per_sample": _stats(pushed["queries"][attacked]),
           "iterations_per_sample": _stats(pushed["iterations"][attacked]),
           "screening_queries": int(pushed["screening_queries"]),
           "oracle_queries": int(pushed["oracle_queries"]),
           "attack_seconds": float(pushed["seconds"]),
           "reused_saved_push": bool(pushed["reused"])}
  for name in ("pushing_i", "pushing_ii"):
    success = pushed[f"{name}_success"]
    statuses, counts = np.unique(pushed[f"{name}_status"], return_counts=True)
    stats[name] = {
        "successes": int(success.sum()),
        "success_rate": float(success.sum() / max(attacked.sum(), 1)),
        "l2": _stats(pushed[f"{name}_l2"][success]),
        "status_counts": {str(s): int(c) for s, c in zip(statuses, counts)},
    }
  return stats
