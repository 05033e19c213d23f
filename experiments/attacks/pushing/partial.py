"""A push that resumes: its finished samples, saved as they finish.

While a push stream runs, every batch of samples the scheduler collects
(``scheduler.Resume.on_finished``) is written atomically to its own file,
``attack/partial-<fingerprint>/rows-<ns>-<pid>.npz``: their queue positions, their
final attack states (the scheduler's host rows) and the push's fingerprint
(``cache.fingerprint``, so a save from other settings, data or model is never
read). The folder is only appended to. A rerun of an interrupted push (``kill
-9``, ``--time_budget``) restores the positions it holds and pushes only the
others: a sample's trajectory depends only on its key, index and iteration
(docs/protocol.md §4, §19). The samples in flight are saved too, every
``save_every`` seconds and at the deadline (``running-<stream>.npz``, replaced
each time), and a rerun continues them from there: a sample that needs longer
than one run still finishes. Once a push's rows are saved whole (a block, or
``pushed-<fingerprint>.npz``), the files of its positions are removed.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

from experiments.attacks.pushing import cache
from experiments.run import errors
from experiments.run import stop_signal
from ounl_jax.attacks import scheduler


class PartialPush:
  """The finished samples of a push's streams on disk (module doc)."""

  def __init__(self, workdir: str, key: str):
    self.folder = os.path.join(workdir, "attack", f"partial-{key}")
    self.key = key

  def _files(self, kind: str = "rows") -> list[str]:
    return sorted(glob.glob(os.path.join(self.folder, f"{kind}-*.npz")))

  def save_running(self, positions: np.ndarray, leaves: list[np.ndarray],
                   stream: str) -> None:
    """The samples a stream has in flight (one file per stream, replaced)."""
    cache.save(os.path.join(self.folder, f"running-{stream}.npz"), {
        "positions": np.asarray(positions, np.int64), "fingerprint": self.key,
        **{f"leaf_{i:03d}": leaf for i, leaf in enumerate(leaves)}})

  def load_running(self) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every position left in flight (the newest save of each) and its leaves."""
    return self._merge(sorted(self._files("running"), key=os.path.getmtime,
                              reverse=True))

  def save(self, positions: np.ndarray, leaves: list[np.ndarray]) -> None:
    """One atomic file of finished samples (never rewrites another)."""
    name = f"rows-{time.time_ns()}-{os.getpid()}.npz"
    cache.save(os.path.join(self.folder, name), {
        "positions": np.asarray(positions, np.int64), "fingerprint": self.key,
        **{f"leaf_{i:03d}": leaf for i, leaf in enumerate(leaves)}})

  def load(self) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every saved position (the first save of each) and its state leaves."""
    return self._merge(self._files())

  def _merge(self, paths) -> tuple[np.ndarray, list[np.ndarray]]:
    """The positions of ``paths`` (the first file holding each) and leaves."""
    positions, columns = [], []
    for path in paths:
      saved = cache.load(path, self.key)
      if saved is None:
        continue
      positions.append(saved["positions"])
      columns.append([saved[k] for k in sorted(saved) if k.startswith("leaf_")])
    if not positions:
      return np.zeros((0,), np.int64), []
    positions = np.concatenate(positions)
    _, first = np.unique(positions, return_index=True)
    leaves = [np.concatenate(column)[first] for column in zip(*columns)]
    return positions[first], leaves

  def prune(self, saved: np.ndarray) -> None:
    """Removes the files whose positions are all in ``saved`` (kept whole now)."""
    for path in self._files() + self._files("running"):
      try:
        with np.load(path) as rows:
          covered = np.isin(rows["positions"], saved).all()
      except (OSError, ValueError, KeyError):
        continue
      if covered:
        os.remove(path)


class Keep:
  """How a push keeps its finished samples (``store``, None: in memory only) and
  when it stops (``deadline``, a ``time.monotonic()`` value; None: never)."""

  def __init__(self, store: PartialPush | None = None,
               deadline: float | None = None, save_every: float = 60.0):
    self.store, self.deadline, self.save_every = store, deadline, save_every
    self.restored = 0   # Samples restored from the store by this run,
    self.restored_ids = np.zeros((0,), np.int64)   # and those of the last stream.

  def resume(self, positions: np.ndarray) -> scheduler.Resume:
    """The ``scheduler.Resume`` of a stream whose sample i is ``positions[i]``."""
    positions = np.asarray(positions, np.int64)
    if self.store is None:
      return scheduler.Resume(deadline=stop_signal.deadline(self.deadline))
    self.restored_ids = np.zeros((0,), np.int64)
    saved, leaves = self.store.load()
    restored = _stream_rows(positions, saved, np.isin(saved, positions), leaves)
    if restored is not None:
      self.restored += len(restored[0])
      self.restored_ids = restored[0]
    running = self._running(positions, saved)
    store, stream = self.store, f"{positions.min()}-{positions.max()}"
    return scheduler.Resume(
        restored, lambda ids, rows: store.save(positions[ids], rows),
        stop_signal.deadline(self.deadline),
        running, lambda ids, rows: store.save_running(positions[ids], rows, stream),
        self.save_every)

  def _running(self, positions: np.ndarray, finished: np.ndarray):
    """The stream's samples an earlier run left in flight (not finished since)."""
    saved, leaves = self.store.load_running()
    found = np.isin(saved, positions) & ~np.isin(saved, finished)
    return _stream_rows(positions, saved, found, leaves)

  def prune(self, positions: np.ndarray) -> None:
    if self.store is not None:
      self.store.prune(np.asarray(positions, np.int64))


def _stream_rows(positions: np.ndarray, saved: np.ndarray, found: np.ndarray,
                 leaves: list[np.ndarray]):
  """``(ids, leaves)`` of the ``found`` saved rows, ids being their indices in the
  stream (``positions[id]`` is the saved position); None when none is found."""
  if not found.any():
    return None
  where = {int(p): i for i, p in enumerate(positions)}
  return (np.array([where[int(p)] for p in saved[found]], np.int64),
          [leaf[found] for leaf in leaves])


def stopped(stop: scheduler.DeadlineReached, keep: Keep) -> errors.TimeBudgetReached:
  """The one-line stop of a push at its ``--time_budget`` or at SIGTERM."""
  where = (f"saved in {keep.store.folder}" if keep.store is not None
           else "not saved")
  why = "SIGTERM arrived" if stop_signal.requested() else "the time budget ran out"
  return errors.TimeBudgetReached(
      f"{why}: this run pushed {stop.finished - stop.restored} "
      f"samples ({stop.finished} of this stream's {stop.total} are {where}); "
      "rerun the same command to continue.")
