"""Checkpoints with orbax-checkpoint (one of the two library modules doing I/O).

A checkpoint is any pytree of arrays (typed PRNG keys must be stored as
``jax.random.key_data``). ``restore_latest`` needs a pytree of the same structure
(``like``) and turns every orbax failure into a ``CheckpointError`` that names the
folder and the fix, so a corrupt or mismatched checkpoint never half-loads.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


def _manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(directory: str, step: int, tree: Any, *, max_to_keep: int = 2) -> None:
  """Saves ``tree`` as checkpoint ``step`` (blocking), keeping the newest few."""
  tree = jax.tree_util.tree_map(np.asarray, tree)
  with _manager(directory, max_to_keep) as manager:
    manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()


def latest_step(directory: str) -> int | None:
  """The newest saved step, or None when there is no checkpoint."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as manager:
    return manager.latest_step()


def restore_latest(directory: str, like: Any) -> tuple[int, Any] | None:
  """Restores the newest checkpoint into the structure of ``like``.

  Returns:
    ``(step, tree)``, or None when ``directory`` holds no checkpoint.

  Raises:
    CheckpointError: the checkpoint is corrupt or does not match ``like`` (e.g.
      saved with another model or width). Nothing is modified.
  """
  step = latest_step(directory)
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
  try:
    with _manager(directory) as manager:
      tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as error:  # orbax raises many types; all mean "unusable".
    raise CheckpointError(
        f"Checkpoint step {step} in {directory!r} cannot be restored "
        f"({type(error).__name__}: {str(error)[:300]}). It is corrupt or was "
        "written by a different configuration (model, width, dataset). Move it "
        "away or use another --workdir to start afresh; nothing was changed."
    ) from error
  mismatched = _mismatched(tree, abstract)
  if mismatched:
    raise CheckpointError(
        f"Checkpoint step {step} in {directory!r} does not match this "
        f"configuration (shapes differ at {', '.join(mismatched[:3])}). It was "
        "written with another model, width or dataset. Use the matching flags or "
        "another --workdir; nothing was changed.")
  return step, tree


def _mismatched(tree: Any, abstract: Any) -> list[str]:
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_leaves(abstract)
  if len(got) != len(want):
    return ["<structure>"]
  return [jax.tree_util.keystr(path) for (path, leaf), spec in zip(got, want)
          if np.shape(leaf) != spec.shape]
