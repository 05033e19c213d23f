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

Pushes are saved and reused by ``experiments/push_cache.py``.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments import common
from ounl_jax import data as data_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import pushing as pushing_lib

SAMPLE_RULES = ("released", "fraction_first")
PUSHED_FIELDS = ("images", "labels", "l2", "predicted", "iteration", "success",
                 "status")
# Correctly classified candidates pushed together under the released rule: blocks
# do not depend on N, so every fraction reuses the blocks of the others.
BLOCK_SIZE = 128
BLOCK_ONLY = ("block_queries", "block_seconds", "fingerprint", "reused")


def to_arrays(samples: data_lib.LabelledImages, result: pushing_lib.PushResult
              ) -> dict[str, np.ndarray]:
  """One push as flat arrays (what ``attack/pushed.npz`` holds)."""
  arrays = {"ids": samples.ids, "original": samples.images,
            "original_labels": result.original_labels,
            "predicted_before": result.predicted_before,
            "attacked": result.attacked, "crossed": result.crossed,
            "iterations": result.iterations, "queries": result.queries,
            "attack_queries": result.attack_queries,
            "evaluation_queries": result.evaluation_queries}
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
    raise common.UserError(
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


def push_released(oracle, candidates: data_lib.LabelledImages, requested: int,
                  key: jax.Array, attack, *, target_class: int | None,
                  size: int = BLOCK_SIZE, block_store=None,
                  show_progress: bool = True) -> dict:
  """The released sample rule: push candidates in order until ``requested`` succeed.

  The correctly classified candidates (one counted query each) are pushed in
  fixed blocks of ``size``, block ``b`` with key ``fold_in(key, b)``, until
  ``requested`` are pushed by both methods. A block does not depend on
  ``requested``, so a run at 10% pushes exactly the first blocks of a run at 50%
  and ``block_store(b, run)`` (see ``block_cache``) lets every fraction share them.
  Returns the used blocks' arrays, with ``candidates_tried`` (candidates examined,
  in order), the misclassified among them and the number of screening queries.
  """
  block_store = block_store or (lambda block, run: run())
  state = oracle.init()
  predicted, state = labels_lib.oracle_predictions(oracle, state, candidates.images)
  pushable = predicted == candidates.labels
  if target_class is not None:
    pushable &= predicted != target_class
  queue = np.flatnonzero(pushable)
  blocks, done = [], 0
  bar = common.progress(total=requested, desc="pushing", unit="sample",
                        enabled=show_progress)
  while done < requested and len(blocks) * size < len(queue):
    block = len(blocks)
    samples = candidates.take(queue[block * size:(block + 1) * size])

    def run(samples=samples, block=block, offset=done):
      started = time.time()
      result = attack.push(oracle, samples.images, samples.labels,
                           jax.random.fold_in(key, block), oracle.init(),
                           _bar_callback(bar, offset))
      return {**to_arrays(samples, result),
              "block_queries": np.asarray(int(result.oracle_state.queries)),
              "block_seconds": np.asarray(time.time() - started)}

    arrays = block_store(block, run)
    blocks.append(arrays)
    done += int(np.sum(arrays["pushing_i_success"] & arrays["pushing_ii_success"]))
    bar.n = min(done, requested)
    bar.refresh()
  bar.close()
  if not blocks:
    raise common.UserError(
        f"The model misclassifies all {len(candidates)} training samples of class "
        "A, so none can be pushed; train the model longer (--epochs).")
  tried = int(queue[min(len(blocks) * size, len(queue)) - 1]) + 1
  arrays = _joined(blocks)
  arrays.update(candidates_tried=np.asarray(tried),
                candidates_misclassified=np.asarray(int(np.sum(~pushable[:tried]))),
                screening_queries=np.asarray(len(candidates)),
                oracle_queries=np.asarray(int(state.queries)
                                          + int(arrays["block_queries"].sum())),
                requested=np.asarray(requested))
  return arrays


def _joined(blocks: list[dict]) -> dict:
  """The blocks' rows in order, with per-block queries, seconds and reuse."""
  arrays = concatenate([{k: v for k, v in b.items() if k in blocks[0]
                         and k not in BLOCK_ONLY} for b in blocks])
  reused = np.asarray([bool(b.get("reused", False)) for b in blocks])
  arrays.update(blocks=np.asarray(len(blocks)),
                block_queries=np.asarray([int(b["block_queries"]) for b in blocks]),
                block_seconds=np.asarray([float(b["block_seconds"]) for b in blocks]),
                block_reused=reused, reused=np.asarray(reused.all()))
  arrays["seconds"] = np.asarray(float(arrays["block_seconds"].sum()))
  return arrays


def push_fraction_first(oracle, samples: data_lib.LabelledImages, key: jax.Array,
                        attack, *, show_progress: bool = True) -> dict:
  """The first rule: push every drawn sample; the failures are dropped later."""
  bar = common.progress(total=len(samples), desc="pushing", unit="sample",
                        enabled=show_progress)
  result = attack.push(oracle, samples.images, samples.labels, key, oracle.init(),
                       _bar_callback(bar, 0))
  bar.close()
  arrays = to_arrays(samples, result)
  arrays.update(candidates_tried=np.asarray(len(samples)),
                candidates_misclassified=np.asarray(int(np.sum(~result.attacked))),
                screening_queries=np.asarray(0),
                oracle_queries=np.asarray(result.oracle_queries),
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
