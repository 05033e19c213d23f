"""A push, as the arrays every consumer reads: one module owns their names.

A push is a dict of NumPy arrays (what ``attack/pushed.npz`` and the released
rule's blocks hold, ``cache.save`` / ``cache.load``): one row per pushed sample
(``ROW_FIELDS``: its id, original image and label, the attack's per-sample
results, and Pushing-I / Pushing-II images, labels, L2, predictions, iterations,
successes and statuses) and the push's totals (``SUMMARY_FIELDS``). Everything
that reads a push goes through the functions here (which rows are submitted,
the paired conditions' submissions, the statistics of results.json), not
through the key names.
"""

from __future__ import annotations

import numpy as np

from ounl_jax import data as data_lib
from ounl_jax.attacks import pushing as pushing_lib

METHODS = ("pushing_i", "pushing_ii")
PUSHED_FIELDS = ("images", "labels", "l2", "predicted", "iteration", "success",
                 "status")
# The PushResult fields saved per sample, beside its id and original image.
RESULT_FIELDS = ("original_labels", "predicted_before", "attacked", "crossed",
                 "iterations", "queries", "attack_queries", "evaluation_queries")
# Every per-sample array of a push (``to_arrays``; what a saved block holds).
ROW_FIELDS = ("ids", "original") + RESULT_FIELDS + tuple(
    name if field == "images" else f"{name}_{field}"
    for name in METHODS for field in PUSHED_FIELDS)
# A push's totals (scalars), beside its rows.
SUMMARY_FIELDS = ("candidates_tried", "candidates_misclassified",
                  "screening_queries", "oracle_queries", "requested",
                  "push_queries", "seconds", "compile_seconds", "pushed_now",
                  "slot_iterations", "busy_slot_iterations",
                  "reused")


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
  """Rows of several pushes, one after the other."""
  return {k: np.concatenate([r[k] for r in rounds]) for k in rounds[0]}


def rows(arrays: dict, begin: int, end: int) -> dict:
  """Rows [begin, end) of a push (its per-sample arrays only)."""
  return {k: arrays[k][begin:end] for k in ROW_FIELDS}


def successes(rows: dict) -> np.ndarray:
  """Which rows both Pushing-I and Pushing-II pushed."""
  return rows["pushing_i_success"] & rows["pushing_ii_success"]


def submissions(pushed: dict, chosen: np.ndarray) -> dict:
  """Normal, Pushing-I and Pushing-II of the same rows (paired conditions):
  ``{condition: (images float32, labels int32)}``."""
  return {name: (pushed[images][chosen].astype(np.float32),
                 pushed[f"{images}_labels"][chosen].astype(np.int32))
          for name, images in (("normal", "original"), ("pushing_i", "pushing_i"),
                               ("pushing_ii", "pushing_ii"))}


def ids(pushed: dict) -> np.ndarray:
  """The training ids of the pushed rows (none when nothing was pushed)."""
  return pushed.get("ids", np.zeros(0, np.int64))


def requested(pushed: dict) -> int:
  """N, the samples the user asked to unlearn."""
  return int(pushed.get("requested", len(pushed.get("pushing_i_success", ()))))


def submitted_rows(pushed: dict, count: int | None = None) -> np.ndarray:
  """The rows submitted: the first ``count`` (default N) pushed by both methods."""
  if "pushing_i_success" not in pushed:  # No candidate could be pushed at all.
    return np.zeros(0, np.int64)
  count = requested(pushed) if count is None else count
  return np.flatnonzero(successes(pushed))[:count]


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return {"mean": None, "median": None, "std": None, "max": None}
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "std": float(values.std()), "max": float(values.max())}


def slot_occupancy(pushed: dict) -> float | None:
  """Busy slot-iterations / slot-iterations of this run's pushes
  (``scheduler.Statistics``); None when nothing was pushed now, or for a pusher
  without a compiled batch."""
  slots = int(pushed.get("slot_iterations", 0))
  return int(pushed["busy_slot_iterations"]) / slots if slots else None


def occupancy_counts(result: pushing_lib.PushResult) -> dict:
  """A push's scheduler counts, as summary fields."""
  return {"slot_iterations": np.asarray(result.statistics.slot_iterations),
          "busy_slot_iterations": np.asarray(
              result.statistics.busy_slot_iterations)}


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
           "reused_saved_push": bool(pushed["reused"]),
           "slot_occupancy": slot_occupancy(pushed)}
  for name in METHODS:
    success = pushed[f"{name}_success"]
    statuses, counts = np.unique(pushed[f"{name}_status"], return_counts=True)
    stats[name] = {
        "successes": int(success.sum()),
        "success_rate": float(success.sum() / max(attacked.sum(), 1)),
        "l2": _stats(pushed[f"{name}_l2"][success]),
        "status_counts": {str(s): int(c) for s, c in zip(statuses, counts)},
    }
  return stats
