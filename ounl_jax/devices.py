"""Many devices: one 1-D mesh over the samples (or batch) axis, and its shardings.

Everything that runs on several accelerators goes through this module, so that the
ZOO chunk (``attacks/zoo.py``) and training (``train.py``) use one layout: a 1-D
``jax.sharding.Mesh`` over ``jax.devices()`` with the axis named ``"samples"``. The
rows of a batch (ZOO samples with all their per-sample state, or training images)
are split over it; parameters and counters are replicated. XLA (GSPMD) inserts the
few collectives (the oracle's query total, the "all done?" test, BatchNorm's batch
statistics, the gradient sum).

On one device nothing here changes a computation: ``is_sharded(mesh)`` is False and
callers keep their single-device path, which is bit-identical to the code before
sharding existed.

Several hosts (``jax.distributed.initialize()`` in each process, one process per
host) give a global ``jax.devices()``; ``sample_mesh()`` then spans every host's
devices (WORKSPACE.md, "Many devices").

``forward_images_per_second`` measures the raw model throughput that an attack's
queries/s are compared with (docs/protocol.md §19).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "samples"


def sample_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"samples"`` over ``devices`` (default ``jax.devices()``)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("sample_mesh needs at least one device.")
  return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def device_count(mesh: Mesh | None) -> int:
  """Devices the rows are split over (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.size)


def is_sharded(mesh: Mesh | None) -> bool:
  """True when ``mesh`` spans more than one device (callers shard only then)."""
  return device_count(mesh) > 1


def row_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh, every other axis whole."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def round_up(count: int, mesh: Mesh | None) -> int:
  """The smallest multiple of the device count that is >= ``count``."""
  devices = device_count(mesh)
  return -(-int(count) // devices) * devices


def _put(tree, sharding):
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def shard_rows(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` with its leading axis split over ``mesh``.

  Every leaf must have a leading axis divisible by the device count (pad first:
  ``round_up``). A leaf already placed so is not copied.
  """
  devices = device_count(mesh)
  for leaf in jax.tree_util.tree_leaves(tree):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % devices:
      raise ValueError(f"shard_rows: a leaf of shape {np.shape(leaf)} cannot be "
                       f"split over {devices} devices; pad its rows to a multiple "
                       f"of {devices} (devices.round_up).")
  return _put(tree, row_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of every leaf of ``tree`` on every device of ``mesh``."""
  return _put(tree, replicated(mesh))


def constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
  """Inside ``jit``: keeps the leading axis of every leaf split over ``mesh``
  (identity without a mesh or on one device)."""
  if not is_sharded(mesh):
    return tree
  sharding = row_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def _forward_loop(params, images, *, apply_fn, iterations: int):
  """``iterations`` forward passes in one ``fori_loop``; each depends on the last
  (through a zero-weighted term), so nothing is hoisted out of the loop."""
  def body(_, total):
    return total + jnp.sum(apply_fn(params, images + 0 * total[0]), 0)
  out = jax.eval_shape(apply_fn, params, images)
  return jax.lax.fori_loop(0, iterations, body,
                           jnp.zeros(out.shape[1:], out.dtype))


# Hashable ``apply_fn`` (e.g. ``oracle.Softmax(model.apply)``): compiled once per
# function, batch shape and iteration count, however often it is measured.
_forward_loop_jit = jax.jit(_forward_loop, static_argnames=("apply_fn", "iterations"))


def forward_images_per_second(apply_fn: Callable[[Any, jax.Array], jax.Array],
                              params: Any, images, *, iterations: int = 10,
                              rounds: int = 3,
                              mesh: Mesh | None = None) -> float:
  """Raw forward throughput of ``apply_fn(params, images)``, in images per second.

  The baseline for an attack's queries/s (docs/protocol.md §19): pass the oracle's
  ``apply`` and parameters (``oracle.Softmax(model.apply)`` and the variables, as
  the service's oracle) and a batch shaped like one oracle call of the attack,
  i.e. ``S * queries_per_iteration`` images. The forward runs ``iterations`` times
  in one compiled ``fori_loop`` (like the ZOO chunk, which runs its iterations in
  one call), the best of ``rounds`` timed calls is kept, compilation excluded
  (``apply_fn`` must be hashable to reuse the compilation across calls). With a
  multi-device ``mesh`` the images are split over it and the parameters
  replicated, as the sharded ZOO chunk does.
  """
  images = jnp.asarray(images, jnp.float32)
  if is_sharded(mesh):
    images = shard_rows(images, mesh)
    params = replicate(params, mesh)
  run = lambda: _forward_loop_jit(params, images, apply_fn=apply_fn,  # noqa: E731
                                  iterations=iterations)
  jax.block_until_ready(run())
  best = math.inf
  for _ in range(max(1, rounds)):
    start = time.perf_counter()
    jax.block_until_ready(run())
    best = min(best, time.perf_counter() - start)
  return images.shape[0] * iterations / best
