"""Checkpoints with orbax-checkpoint (one of the two library modules doing I/O).

A checkpoint is any pytree of arrays (typed PRNG keys must be stored as
``jax.random.key_data``). ``restore_latest`` needs a pytree of the same structure
(``like``) and turns every orbax failure into a ``CheckpointError`` that names the
folder and the fix, so a corrupt or mismatched checkpoint never half-loads.
``restore_newest_intact`` instead falls back to the newest checkpoint that restores
and reports the newer ones it skipped (e.g. a run killed while writing one).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class Skipped(NamedTuple):
  """A checkpoint that ``restore_newest_intact`` could not restore and passed over.

  Attributes:
    step: its step number.
    path: its folder.
    reason: the first line of what failed (e.g. a missing or truncated file).
  """

  step: int
  path: str
  reason: str


class Restored(NamedTuple):
  """``restore_newest_intact``'s answer: the step restored, its tree, and the newer
  checkpoints skipped because they could not be restored (newest first)."""

  step: int
  tree: Any
  skipped: tuple[Skipped, ...]


def _manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(directory: str, step: int, tree: Any, *, max_to_keep: int = 2) -> None:
  """Saves ``tree`` as checkpoint ``step`` (blocking), keeping the newest few.

  A checkpoint ``step`` already there is replaced: a run that resumed from an older
  checkpoint (because a newer one was corrupt) re-trains and re-saves that step.
  """
  tree = jax.tree_util.tree_map(np.asarray, tree)
  _check_free_space(directory, step, tree)
  with _manager(directory, max_to_keep) as manager:
    if step in manager.all_steps():
      manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()


# Orbax's metadata and temporary folders on top of the arrays' bytes.
_SAVE_SLACK_BYTES = 1 << 20


def _check_free_space(directory: str, step: int, tree: Any) -> None:
  """``CheckpointError`` before orbax starts when the disk cannot hold the save.

  Orbax writes from worker threads; on a full disk each of them logs its own
  traceback before the save fails, so the space is checked first.
  """
  needed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))
  needed = 2 * needed + _SAVE_SLACK_BYTES
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  if free < needed:
    raise CheckpointError(
        f"No space left on device for checkpoint {step} in {directory}: "
        f"{free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed. "
        "Free some space (or use another --workdir) and rerun: training resumes "
        "from the last checkpoint saved.")


def latest_step(directory: str) -> int | None:
  """The newest saved step, or None when there is no checkpoint."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as manager:
    return manager.latest_step()


def _steps(directory: str) -> list[int]:
  """Every saved step, newest first."""
  if not os.path.isdir(directory):
    return []
  with _manager(directory) as manager:
    return sorted(manager.all_steps(), reverse=True)


def _step_path(directory: str, step: int) -> str:
  return os.path.join(os.path.abspath(directory), str(step))


def _reason(error: BaseException) -> str:
  """One short line saying what failed (orbax/tensorstore errors run to pages)."""
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ""
  if len(first) > 240:
    first = first[:237] + "..."
  return f"{type(error).__name__}: {first}"


def _abstract(like: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)


class _DropOrphanedTaskErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Task exception was never retrieved")


@contextlib.contextmanager
def _quiet_failed_restore():
  """Keeps a failed restore to one exception.

  When one array of a checkpoint is unreadable, orbax's concurrent reads of the
  others fail too, and asyncio logs each orphaned failure with its full traceback
  when the task is garbage collected (dozens for one truncated file). Inside this
  context those records are dropped and the orphans are collected before leaving;
  the one error the caller reports says what failed.
  """
  logger = logging.getLogger("asyncio")
  quiet = _DropOrphanedTaskErrors()
  logger.addFilter(quiet)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None  # "Event loop is closed" finalisers.
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous_hook
    logger.removeFilter(quiet)


def _restore_step(directory: str, step: int, abstract: Any) -> Any:
  """Restores one step; any orbax failure propagates (the callers classify it)."""
  with _quiet_failed_restore(), _manager(directory) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _check_matches(directory: str, step: int, tree: Any, abstract: Any) -> None:
  mismatched = _mismatched(tree, abstract)
  if mismatched:
    raise CheckpointError(
        f"Checkpoint step {step} in {directory!r} does not match this "
        f"configuration (shapes differ at {', '.join(mismatched[:3])}). It was "
        "written with another model, width or dataset. Use the matching flags or "
        "another --workdir; nothing was changed.")


def restore_latest(directory: str, like: Any) -> tuple[int, Any] | None:
  """Restores the newest checkpoint into the structure of ``like`` (no fallback).

  Returns:
    ``(step, tree)``, or None when ``directory`` holds no checkpoint.

  Raises:
    CheckpointError: the checkpoint is corrupt or does not match ``like`` (e.g.
      saved with another model or width). Nothing is modified.
  """
  step = latest_step(directory)
  if step is None:
    return None
  abstract = _abstract(like)
  try:
    tree = _restore_step(directory, step, abstract)
  except Exception as error:  # orbax raises many types; all mean "unusable".
    path = _step_path(directory, step)
    raise CheckpointError(
        f"Checkpoint {path} cannot be restored ({_reason(error)}). It is corrupt "
        "or was written by a different configuration (model, width, dataset). "
        f"Delete it (rm -r {path}) to start this step afresh, or use another "
        "--workdir; nothing was changed.") from None
  _check_matches(directory, step, tree, abstract)
  return step, tree


def restore_newest_intact(directory: str, like: Any) -> Restored | None:
  """Restores the newest checkpoint that can be restored, newest first.

  A checkpoint that fails to restore (a truncated or missing file, unreadable
  metadata) is skipped and reported in ``Restored.skipped``; the caller decides
  what to tell the user. A checkpoint that restores but whose shapes differ from
  ``like`` is a configuration mismatch, not corruption: it raises at once.

  Returns:
    ``Restored(step, tree, skipped)``, or None when ``directory`` holds no
    checkpoint.

  Raises:
    CheckpointError: no checkpoint can be restored (one message listing each with
      its path and reason, no chained traceback), or the newest intact one does
      not match ``like``. Nothing is modified.
  """
  steps = _steps(directory)
  if not steps:
    return None
  abstract = _abstract(like)
  skipped = []
  for step in steps:
    try:
      tree = _restore_step(directory, step, abstract)
    except Exception as error:  # orbax raises many types; all mean "unusable".
      skipped.append(Skipped(step, _step_path(directory, step), _reason(error)))
      continue
    _check_matches(directory, step, tree, abstract)
    return Restored(step, tree, tuple(skipped))
  listing = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
  paths = " ".join(s.path for s in skipped)
  raise CheckpointError(
      f"No checkpoint in {directory!r} can be restored: {listing}. They are "
      "corrupt or were written by a different configuration (model, width, "
      f"dataset). Delete them (rm -r {paths}) to start afresh, or use another "
      "--workdir; nothing was changed.")


def _mismatched(tree: Any, abstract: Any) -> list[str]:
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_leaves(abstract)
  if len(got) != len(want):
    return ["<structure>"]
  return [jax.tree_util.keystr(path) for (path, leaf), spec in zip(got, want)
          if np.shape(leaf) != spec.shape]
