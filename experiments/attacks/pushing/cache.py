"""The push cache: saved pushes reused when the model, data and settings match.

Under the released rule the pushes are saved in fixed blocks,
``attack/blocks-<fingerprint>/block-<b>.npz``, shared by every fraction; under
``fraction_first`` a push is saved whole as ``attack/pushed-<fingerprint>.npz``. Both
are reused when the model, the data and every attack setting match; the latest push
is also ``attack/pushed.npz`` (docs/protocol.md §4).

>>> fingerprint({"b": 1, "a": [2, 3]}) == fingerprint({"a": [2, 3], "b": 1})
True
>>> len(fingerprint({}))
16
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile

import numpy as np

from experiments.run import errors
from experiments.run import records


def fingerprint(payload: dict) -> str:
  """A short hash of everything a push depends on (model, data, ids, settings)."""
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(path: str, arrays: dict) -> None:
  """Writes a push atomically (a crash never leaves half a file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = records.temporary_path(path)  # Unique per writer; ends in .npz.
  try:
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load(path: str, key: str) -> dict | None:
  """The saved push if it has fingerprint ``key``; None if absent or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as saved:
      if str(saved["fingerprint"]) != key:
        return None
      return {k: saved[k] for k in saved.files}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
    errors.warn(f"{path} is unreadable ({type(error).__name__}); pushing again.")
    return None


class BlockCache:
  """The released rule's block store on disk (``blocks.MemoryStore``'s methods):
  ``attack/blocks-<key>/block-<b>.npz``, each holding a block's first rows."""

  def __init__(self, workdir: str, key: str):
    self.folder = os.path.join(workdir, "attack", f"blocks-{key}")
    self.key = key

  def _path(self, block: int) -> str:
    return os.path.join(self.folder, f"block-{block:04d}.npz")

  def load(self, block: int) -> dict | None:
    return load(self._path(block), self.key)

  def save(self, block: int, rows: dict) -> None:
    save(self._path(block), {**rows, "fingerprint": np.asarray(self.key)})


def block_cache(workdir: str, key: str) -> BlockCache:
  """A ``store`` for ``released_rule.push_released``, shared by every run in ``workdir``."""
  return BlockCache(workdir, key)


def latest(workdir: str, arrays: dict) -> dict:
  """Saves ``arrays`` as ``attack/pushed.npz`` (the latest push) and returns them."""
  save(os.path.join(workdir, "attack", "pushed.npz"), arrays)
  return arrays


def cached_push(workdir: str, key: str, run) -> dict:
  """The saved push with fingerprint ``key``, or ``run()``'s, saved (timed)."""
  path = os.path.join(workdir, "attack", f"pushed-{key}.npz")
  saved = load(path, key)
  if saved is not None:
    saved["reused"] = True
    saved["pushed_now"] = np.asarray(0)  # Timed by the run that saved it.
    saved["slot_iterations"] = np.asarray(0)
    return saved
  started = time.time()
  arrays = run()
  arrays.update(fingerprint=np.asarray(key), seconds=np.asarray(time.time() - started))
  save(path, arrays)
  save(os.path.join(workdir, "attack", "pushed.npz"), arrays)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  arrays["reused"] = False
  return arrays
