"""The released rule's blocks: queue positions pushed and kept in fixed blocks.

Queue position p is row ``p % size`` of block ``p // size`` and draws from its own
key (``sample_keys``), so the blocks do not depend on N and every fraction reuses
the blocks of the others. A store keeps each block's first rows: ``MemoryStore``
here, ``cache.block_cache`` on disk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.attacks.pushing import artefact

# Correctly classified candidates pushed together under the released rule: blocks
# do not depend on N, so every fraction reuses the blocks of the others.
BLOCK_SIZE = 128


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


def save_blocks(store, saved: dict, rows: dict, begin: int, size: int) -> None:
  """Appends pushed rows (from queue position ``begin``) to their blocks."""
  position, end = begin, begin + len(rows["ids"])
  while position < end:
    block, row = divmod(position, size)
    stop = min((block + 1) * size, end)
    part = artefact.rows(rows, position - begin, stop - begin)
    kept = saved.get(block)
    if kept is not None and row:
      part = artefact.concatenate([artefact.rows(kept, 0, row), part])
    saved[block] = part
    store.save(block, part)
    position = stop
