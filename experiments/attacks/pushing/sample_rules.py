"""Which samples the malicious user pushes and submits.

Two sample rules (docs/protocol.md §4):

* ``released`` (default, the authors' code): N = ``fraction`` x (class A's training
  samples). The user pushes class-A training samples in a seeded order until N of
  them have been pushed by both Pushing-I and Pushing-II (or the class runs out),
  and submits exactly those N. Every candidate is first classified with one
  (counted) query; the misclassified ones are skipped.
* ``fraction_first`` (this project's first rule): a seeded ``fraction`` of class A
  is drawn first; the samples that fail (misclassified, not pushed) are dropped, so
  fewer than N are submitted.

The released rule is ``released_rule.py``; this module holds what both share and
the ``fraction_first`` rule. Pushes are saved and reused by ``cache.py``.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments.attacks.pushing import artefact
from experiments.attacks.pushing import partial
from experiments.run import compiling
from experiments.run import errors
from experiments.run import progress
from ounl_jax import data as data_lib
from ounl_jax.attacks import scheduler



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


def bar_callback(bar, offset: int):
  """Moves a progress bar with a push's chunks: the stream's sample-iterations
  (``scheduler.Progress.sample_iterations``, of samples x max_iterations; they
  move from the first chunk, so the ETA is an upper bound from the start), with
  the samples done (from ``offset``) and the queries beside it."""
  def on_chunk(progress):
    bar.total = progress.samples_total * progress.max_iterations
    bar.n = min(progress.sample_iterations, bar.total)
    bar.set_postfix(samples=offset + progress.samples_done,
                    queries=progress.oracle_queries)
    bar.refresh()
  return on_chunk


def push_fraction_first(oracle, samples: data_lib.LabelledImages, key: jax.Array,
                        attack, *, show_progress: bool = True, keep=None) -> dict:
  """The first rule: push every drawn sample; the failures are dropped later.

  ``push_queries``, ``compile_seconds`` and ``pushed_now`` are this run's
  (``cached_push`` adds the seconds, and sets ``pushed_now`` to 0 when it reads a
  saved push). With ``keep`` (``partial.Keep``, sample i at position i) the
  samples an interrupted run finished are restored and not pushed again.
  """
  bar = progress.progress(desc="pushing", unit="sample-it", enabled=show_progress)
  compiled = compiling.compile_seconds()
  keep = partial.Keep() if keep is None else keep
  try:
    result = attack.push(oracle, samples.images, samples.labels, key, oracle.init(),
                         bar_callback(bar, 0),
                         resume=keep.resume(np.arange(len(samples))))
  except scheduler.DeadlineReached as stop:
    raise partial.stopped(stop, keep) from None
  compiled = compiling.compile_seconds() - compiled
  bar.close()
  arrays = artefact.to_arrays(samples, result)
  arrays.update(candidates_tried=np.asarray(len(samples)),
                candidates_misclassified=np.asarray(int(np.sum(~result.attacked))),
                screening_queries=np.asarray(0),
                # Restored samples' attack queries were answered by an earlier run.
                oracle_queries=np.asarray(result.oracle_queries + int(
                    result.attack_queries[keep.restored_ids].sum())),
                push_queries=np.asarray(result.oracle_queries),
                pushed_now=np.asarray(len(samples) - keep.restored),
                compile_seconds=np.asarray(compiled),
                requested=np.asarray(len(samples)),
                **artefact.occupancy_counts(result))
  return arrays


def warn_if_few_succeed(rows: dict, needed: int, left: int) -> None:
  """Says so when fewer than half of a released-rule stream succeed (it would
  push on)."""
  successes = int(artefact.successes(rows).sum())
  pushed = len(rows["ids"])
  if successes >= needed or 2 * successes >= pushed:
    return
  failed = ~artefact.successes(rows)
  first_failure = np.where(rows["pushing_i_success"], rows["pushing_ii_status"],
                           np.char.add("Pushing-I ", rows["pushing_i_status"].astype(str)))
  reasons = np.unique(first_failure[failed], return_counts=True)
  why = ", ".join(f"{int(c)} {r}" for r, c in zip(*reasons))
  estimate = (needed - successes) * pushed // max(successes, 1)
  errors.warn(f"Only {successes} of {pushed} pushed samples succeeded ({why}); at "
              f"this rate the {needed - successes} still needed take about "
              f"{estimate} more candidates ({left} are left). Raise --max_iterations "
              "(no_crossing) or lower --fraction.")
