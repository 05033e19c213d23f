"""The host scheduler every pusher runs on: a bounded batch of samples in flight.

A pusher supplies only its maths, in optax's shape (``Pusher``): ``init`` starts
samples (a NamedTuple state whose leaves lead with the samples axis and which
carries the counters ``done`` and ``iterations``), ``run_chunk`` advances a batch by
up to a chunk of iterations in one compiled call, finished rows masked (their state
no longer changes and the oracle neither answers nor counts them). ``schedule`` is
the host loop around them (ZOO, ``zoo.py``; HopSkipJump, ``label_only.py``):

* at most ``slots`` samples are in flight (bounded memory);
* between chunks it reports ``Progress``, collects finished samples and, with
  ``refill``, fills their slots with waiting samples in one compiled call; once
  none wait (or without ``refill``) it shrinks the batch, to a power of two with
  ``refill`` (at most log2(slots) + 1 batch shapes) or to the live rows exactly
  without it (whole groups of ``slots`` samples, one after the other);
* samples that ``init`` already finishes (e.g. no start point) are collected
  before any chunk runs on them;
* with a ``Resume``, every finished sample is handed to ``on_finished`` as it is
  collected, samples finished by an earlier run (``restored``) are never run
  again, and a ``deadline`` stops the loop cleanly between chunks
  (``DeadlineReached``, once ``on_finished`` has every sample finished so far), so
  an interrupted push keeps its finished samples (docs/protocol.md §4: a sample's
  trajectory depends only on its key, index and iteration);
* on a multi-device mesh (``ounl_jax/devices.py``) the batch's rows are split over
  the devices and every batch is a multiple of the device count (padding rows are
  done, never counted); one device runs the single-device program.

``Statistics.slot_occupancy`` is the share of the slot-iterations run that advanced
a live sample: ``sum_calls sum_rows (iterations the row ran)`` over
``sum_calls rows x (iterations the call ran)``. Padding, finished rows and rows
waiting for the slowest row of a chunk lower it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import devices as devices_lib
from ounl_jax import oracle as oracle_lib


class Pusher(NamedTuple):
  """A pushing algorithm's maths (no host logic).

  Attributes:
    init: ``init(ids, live, oracle_state) -> (state, oracle_state)``: the state of
      samples ``ids`` ((R,) int, the scheduler's sample indices; rows where
      ``live`` is False are padding and must start done, with no query). The
      state's leaves lead with R; it has ``done`` (R,) bool and ``iterations``
      (R,) int fields.
    run_chunk: ``run_chunk(state, oracle_state) -> (state, oracle_state)``: up to
      a chunk of iterations of every row that is not done (compiled).
    max_iterations: per sample, for ``Progress``.
    refill: fill finished slots with waiting samples while others run (ZOO);
      False runs whole groups of ``slots`` samples one after the other.
  """

  init: Callable[[np.ndarray, np.ndarray, Any], tuple[Any, Any]]
  run_chunk: Callable[[Any, Any], tuple[Any, Any]]
  max_iterations: int
  refill: bool = True


class Progress(NamedTuple):
  """What ``schedule`` reports after every chunk of iterations."""

  samples_done: int
  samples_total: int
  iteration: int          # largest iteration count among the samples in the batch
  max_iterations: int
  batch_size: int         # samples in the compiled batch (padding included)
  oracle_queries: int
  # Sample-iterations: ``max_iterations`` for each finished sample (however early
  # it stopped), the iterations run for each sample in flight; moves from the
  # first chunk and ends at ``samples_total x max_iterations``.
  sample_iterations: int = 0


class Statistics(NamedTuple):
  """How well the compiled batches were used (module doc).

  Attributes:
    calls: compiled chunk calls.
    slot_iterations: ``sum_calls batch rows x iterations the call ran``.
    busy_slot_iterations: ``sum_calls sum_rows iterations the row ran``.
    slot_occupancy: ``busy_slot_iterations / slot_iterations`` (NaN if nothing
      ran).
  """

  calls: int
  slot_iterations: int
  busy_slot_iterations: int
  slot_occupancy: float


def statistics(calls: int = 0, slot_iterations: int = 0,
               busy_slot_iterations: int = 0) -> Statistics:
  """``Statistics`` with the occupancy computed from the counts."""
  occupancy = (busy_slot_iterations / slot_iterations if slot_iterations
               else math.nan)
  return Statistics(int(calls), int(slot_iterations), int(busy_slot_iterations),
                    float(occupancy))


class Resume(NamedTuple):
  """How a schedule keeps its finished samples across runs (all optional).

  Attributes:
    restored: ``(ids, leaves)``: samples finished by an earlier run and their
      host state rows, as ``on_finished`` received them; they are not run again.
    on_finished: ``on_finished(ids, leaves)``, called once for every sample that
      finishes in this run (``init`` and inactive ones included), as soon as it is
      collected: ``ids`` (n,) sample indices, ``leaves`` the
      ``jax.tree_util.tree_leaves`` of their host state rows (numpy, keys left
      out), each leading with n.
    deadline: a ``time.monotonic()`` value, or a callable returning the current
      one (so that, say, a signal handler can bring it forward); checked between
      chunks, the schedule stops with ``DeadlineReached`` once it has passed
      (None: no limit).
    running: ``(ids, leaves)``: samples an earlier run left in flight, in the
      form ``on_running`` received them: they are admitted first and continue
      from these states (their PRNG keys from ``init``), not from the start.
    on_running: ``on_running(ids, leaves)``: the samples in flight and their
      current host state rows, every ``save_every`` seconds (between chunks)
      and when the deadline stops the schedule, so that a sample needing longer
      than a run can last still finishes over several runs.
  """

  restored: tuple[np.ndarray, list[np.ndarray]] | None = None
  on_finished: Callable[[np.ndarray, list[np.ndarray]], None] | None = None
  deadline: float | Callable[[], float] | None = None
  running: tuple[np.ndarray, list[np.ndarray]] | None = None
  on_running: Callable[[np.ndarray, list[np.ndarray]], None] | None = None
  save_every: float = 60.0


def _deadline(resume: Resume) -> float:
  return resume.deadline() if callable(resume.deadline) else resume.deadline


class DeadlineReached(Exception):
  """``schedule`` stopped at its ``Resume.deadline``; ``on_finished`` has received
  every sample finished by then.

  Attributes:
    finished: samples finished (restored ones included); restored: of them,
      restored from an earlier run; total: the schedule's samples.
  """

  def __init__(self, finished: int, restored: int, total: int):
    super().__init__(f"deadline reached with {finished} of {total} samples "
                     f"finished ({restored} restored)")
    self.finished, self.restored, self.total = finished, restored, total


class Schedule(NamedTuple):
  """``state``: the final state of all samples as numpy, in sample order (PRNG key
  leaves None); the oracle state after the last call; ``Statistics``."""

  state: Any
  oracle_state: oracle_lib.OracleState
  statistics: Statistics


def select_rows(mask, new, old):
  """Per-sample select on pytrees whose leaves lead with the samples axis."""
  def pick(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree_util.tree_map(pick, new, old)


def run_steps(step, state, oracle_state, *, iterations: int, mesh=None):
  """Up to ``iterations`` calls of ``step(state, oracle_state)`` in one
  ``lax.while_loop``; stops as soon as every row is done (a pusher's chunk).

  ``mesh``: a multi-device ``devices.sample_mesh`` keeps the state's rows split
  over it; None on one device.
  """

  def running(carry):
    state, _, i = carry
    return (i < iterations) & jnp.any(jnp.logical_not(state.done))

  def body(carry):
    state, oracle_state, i = carry
    state, oracle_state = step(state, oracle_state)
    return devices_lib.constrain_rows(state, mesh), oracle_state, i + 1

  state, oracle_state, _ = jax.lax.while_loop(
      running, body, (state, oracle_state, jnp.zeros((), jnp.int32)))
  return state, oracle_state


def batch_size_for(count: int, slots: int, devices: int = 1) -> int:
  """The compiled batch for ``count`` live samples: a power of two, at most ``slots``,
  rounded up to a multiple of ``devices``.

  Rounding to powers of two bounds the number of compilations by log2(slots) + 1
  while the padding (done rows) stays below ``count`` (plus the rounding to the
  device count; ``slots`` is itself a multiple of ``devices``).

  >>> [batch_size_for(n, 64) for n in (1, 3, 4, 5, 33, 64)]
  [1, 4, 4, 8, 64, 64]
  >>> batch_size_for(3, 64, devices=3)
  6
  """
  size = 1
  while size < count:
    size *= 2
  size = min(size, slots)
  return -(-size // devices) * devices


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_host(state):
  return jax.tree_util.tree_map(lambda a: None if _is_key(a) else np.asarray(a),
                                state)


def _host_rows(host, rows):
  return jax.tree_util.tree_map(lambda a: a[rows], host)


def _restore(pusher: Pusher, ids: np.ndarray, leaves, oracle_state):
  """The host state rows of restored samples, in the structure ``init`` gives."""
  template, _ = pusher.init(ids[:1], np.zeros(1, bool), oracle_state)
  template = _to_host(template)
  expected = jax.tree_util.tree_leaves(template)
  leaves = [np.asarray(leaf) for leaf in leaves]
  if len(leaves) != len(expected) or any(
      a.shape != (len(ids),) + b.shape[1:] or a.dtype != b.dtype
      for a, b in zip(leaves, expected)):
    raise ValueError("Restored rows do not match this pusher's state.")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template),
                                      leaves)


def _carry_over(state, ids: np.ndarray, live: np.ndarray, carried):
  """``init``'s rows with the saved state of samples left in flight (``carried``:
  their ids, host leaves and ``{id: row}``); PRNG key leaves stay ``init``'s."""
  if carried is None:
    return state
  _, saved, where = carried
  rows = [r for r, (i, l) in enumerate(zip(ids, live)) if l and int(i) in where]
  if not rows:
    return state
  source = np.array([where[int(ids[r])] for r in rows])
  leaves, treedef = jax.tree_util.tree_flatten(state)
  host = iter(saved)
  index = jnp.asarray(rows, jnp.int32)
  carried = [leaf if _is_key(leaf) else
             leaf.at[index].set(jnp.asarray(next(host)[source], leaf.dtype))
             for leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, carried)


def _in_flight(resume: Resume, batch, rows: np.ndarray, live: np.ndarray) -> None:
  """Hands the samples in flight and their host rows to ``resume.on_running``."""
  keep = np.flatnonzero(live)
  if resume.on_running is not None and len(keep):
    resume.on_running(rows[keep], jax.tree_util.tree_leaves(
        _host_rows(_to_host(batch), keep)))


@jax.jit
def _gather(batch, take):
  """Row r of the result is ``batch``'s row ``take[r]`` (one compiled call)."""
  return jax.tree_util.tree_map(lambda a: a[take], batch)


@jax.jit
def _refill(batch, take, fill, fresh):
  """Row r is ``fresh``'s where ``fill[r]``, else ``batch``'s row ``take[r]``."""
  return select_rows(fill, fresh, _gather(batch, take))


def schedule(pusher: Pusher, count: int, *, oracle: oracle_lib.Oracle,
             oracle_state: oracle_lib.OracleState, slots: int, active=None,
             mesh=None, on_chunk: Callable[[Progress], None] | None = None,
             resume: Resume | None = None) -> Schedule:
  """Runs ``pusher`` on samples ``0 .. count - 1`` with at most ``slots`` in flight.

  Args:
    pusher: the algorithm (``Pusher``).
    count: samples; ``pusher.init`` receives their indices.
    oracle: checked for its budget after every compiled call.
    oracle_state: the user's query count so far.
    slots: samples in flight (rounded up to a multiple of the device count).
    active: (count,) bool, samples to run (default all); the others are returned
      as ``init`` makes them with ``live`` False.
    mesh: ``devices.sample_mesh`` (None: one device).
    on_chunk: called with a ``Progress`` after every compiled chunk.
    resume: ``Resume``: restored samples, ``on_finished``, a deadline.

  Returns:
    ``Schedule(state, oracle_state, statistics)``.

  Raises:
    DeadlineReached: ``resume.deadline`` passed with samples left.

  Example (a toy pusher: sample i needs i + 1 iterations, two per chunk):

  >>> class Toy(NamedTuple):
  ...   need: jax.Array
  ...   iterations: jax.Array
  ...   done: jax.Array
  >>> def init(ids, live, oracle_state):
  ...   ids = jnp.asarray(ids)
  ...   return Toy(ids + 1, jnp.zeros_like(ids), ~jnp.asarray(live)), oracle_state
  >>> @jax.jit
  ... def run_chunk(state, oracle_state):
  ...   for _ in range(2):
  ...     iterations = state.iterations + ~state.done
  ...     state = Toy(state.need, iterations, iterations >= state.need)
  ...   return state, oracle_state
  >>> from ounl_jax import oracle as oracle_lib
  >>> toy_oracle = oracle_lib.make_oracle(lambda x: x, input_shape=(1,),
  ...                                     num_classes=1)
  >>> result = schedule(Pusher(init, run_chunk, max_iterations=4), 4,
  ...                   oracle=toy_oracle, oracle_state=toy_oracle.init(), slots=2)
  >>> result.state.iterations.tolist()
  [1, 2, 3, 4]
  >>> result.statistics.busy_slot_iterations, result.statistics.slot_iterations
  (10, 12)
  """
  active = (np.ones((count,), bool) if active is None
            else np.asarray(active, bool))
  sharded = devices_lib.is_sharded(mesh)
  devices = devices_lib.device_count(mesh) if sharded else 1
  slots = -(-slots // devices) * devices
  resume = Resume() if resume is None else resume
  finished = []  # (sample ids, host state rows)

  def collect(ids, host):
    finished.append((ids, host))
    if resume.on_finished is not None:
      resume.on_finished(ids, jax.tree_util.tree_leaves(host))

  restored = np.zeros((0,), np.int64)
  if resume.restored is not None and len(resume.restored[0]):
    restored = np.asarray(resume.restored[0], np.int64)
    finished.append((restored, _restore(pusher, restored, resume.restored[1],
                                        oracle_state)))
  left = np.ones((count,), bool)
  left[restored] = False
  idle = np.flatnonzero(np.logical_not(active) & left)
  if len(idle):
    state, oracle_state = pusher.init(idle, np.zeros(len(idle), bool), oracle_state)
    collect(idle, _to_host(state))
  carried = None  # Samples left in flight by an earlier run: (ids, leaves, rows).
  if resume.running is not None and len(resume.running[0]):
    ids = np.asarray(resume.running[0], np.int64)
    carried = (ids, [np.asarray(leaf) for leaf in resume.running[1]],
               {int(i): r for r, i in enumerate(ids) if left[i] and active[i]})
  first = [] if carried is None else sorted(carried[2])
  waiting = first + [i for i in np.flatnonzero(active & left)
                     if carried is None or int(i) not in carried[2]]
  last_save = time.monotonic()
  batch, rows = None, np.zeros((0,), np.int64)  # rows: sample id per row, -1 pad
  done_count = len(idle) + len(restored)
  calls = slot_iterations = busy = 0
  while True:
    live = np.zeros((0,), bool)
    if batch is not None:
      done = np.asarray(batch.done)
      live = (rows >= 0) & np.logical_not(done)
      over = np.flatnonzero((rows >= 0) & done)
      if len(over):
        collect(rows[over], _host_rows(_to_host(batch), over))
        done_count += len(over)
        rows = np.where(done, -1, rows)
    live_count = int(live.sum())
    if batch is not None and (live_count or waiting):
      now = time.monotonic()
      if resume.deadline is not None and now >= _deadline(resume):
        _in_flight(resume, batch, rows, live)
        raise DeadlineReached(done_count, len(restored), count)
      if now - last_save >= resume.save_every:
        _in_flight(resume, batch, rows, live)
        last_save = now
    fresh = batch is None or (not pusher.refill and live_count == 0)
    room = slots - live_count if pusher.refill or fresh else 0
    new, waiting = waiting[:room], waiting[room:]
    total = live_count + len(new)
    if total == 0:
      break
    if pusher.refill and waiting:
      size = slots
    elif fresh or not pusher.refill:
      size = -(-total // devices) * devices
    else:  # Only ever shrink once nothing waits: no recompilation to grow.
      size = min(len(rows), batch_size_for(total, slots, devices))
    if fresh:
      ids = np.concatenate([new, np.full(size - total, new[0])]).astype(np.int32)
      batch, oracle_state = pusher.init(ids, np.arange(size) < total, oracle_state)
      batch = _carry_over(batch, ids, np.arange(size) < total, carried)
      rows = np.concatenate([np.asarray(new, np.int64),
                             np.full(size - total, -1, np.int64)])
    elif new or size != len(rows):
      keep = np.flatnonzero(live)
      pad = np.flatnonzero(np.logical_not(live))
      # Padding copies a done row (it never updates). With no done row every row
      # is kept or filled, so keep[0] below is overwritten by a new sample.
      take = jnp.asarray(np.concatenate(
          [keep, np.full(size - len(keep), pad[0] if len(pad) else keep[0])]),
          jnp.int32)
      if new:
        ids = np.zeros(size, np.int32)
        ids[len(keep):total] = new
        fill = np.zeros(size, bool)
        fill[len(keep):total] = True
        fresh_rows, oracle_state = pusher.init(ids, fill, oracle_state)
        fresh_rows = _carry_over(fresh_rows, ids, fill, carried)
        batch = _refill(batch, take, jnp.asarray(fill), fresh_rows)
      else:
        batch = _gather(batch, take)
      rows = np.concatenate([rows[keep], np.asarray(new, np.int64),
                             np.full(size - total, -1, np.int64)])
    if new:
      oracle_lib.check_budget(oracle, oracle_state)
      if np.any((rows >= 0) & np.asarray(batch.done)):
        continue  # Finished by ``init`` itself: collect before running.
    if sharded:  # No copy when the layout is already right (every unchanged chunk).
      batch = devices_lib.shard_rows(batch, mesh)
      oracle_state = devices_lib.replicate(oracle_state, mesh)
    before = np.asarray(batch.iterations)
    batch, oracle_state = pusher.run_chunk(batch, oracle_state)
    oracle_lib.check_budget(oracle, oracle_state)
    after = np.asarray(batch.iterations)
    advance = np.where(rows >= 0, after - before, 0)
    calls += 1
    slot_iterations += len(rows) * int(advance.max())
    busy += int(advance.sum())
    if on_chunk is not None:
      over = (rows >= 0) & np.asarray(batch.done)
      running = (rows >= 0) & np.logical_not(over)
      now_done = done_count + int(over.sum())
      on_chunk(Progress(now_done, count,
                        int(np.max(np.where(rows >= 0, after, 0))),
                        pusher.max_iterations, len(rows),
                        int(oracle_state.queries),
                        now_done * pusher.max_iterations
                        + int(after[running].sum())))
  ids = np.concatenate([i for i, _ in finished])
  merged = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs),
                                  *[s for _, s in finished])
  order = np.argsort(ids, kind="stable")
  return Schedule(jax.tree_util.tree_map(lambda a: a[order], merged), oracle_state,
                  statistics(calls, slot_iterations, busy))
