"""The shared host scheduler (ounl_jax/attacks/scheduler.py), on a toy pusher whose
sample i needs ``need[i]`` iterations: refills, shrinking, groups, statistics."""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import scheduler

ORACLE = oracle_lib.make_oracle(lambda x: x, input_shape=(1,), num_classes=1)


class Toy(NamedTuple):
  sample: jnp.ndarray
  need: jnp.ndarray
  iterations: jnp.ndarray
  done: jnp.ndarray


def toy_pusher(need, *, chunk: int, refill: bool, log: dict):
  """``init`` and ``run_chunk`` that record what the scheduler asks of them."""
  need = np.asarray(need)

  def init(ids, live, oracle_state):
    log["init"].append((np.asarray(ids).tolist(), np.asarray(live).tolist()))
    ids = np.asarray(ids)
    return Toy(jnp.asarray(ids), jnp.asarray(need[ids]),
               jnp.zeros(len(ids), jnp.int32),
               jnp.asarray(~np.asarray(live) | (need[ids] == 0))), oracle_state

  def run_chunk(state, oracle_state):
    log["chunks"].append((np.asarray(state.sample).tolist(),
                          np.asarray(state.done).tolist()))
    for _ in range(chunk):
      iterations = state.iterations + ~state.done
      state = state._replace(iterations=iterations,
                             done=state.done | (iterations >= state.need))
    return state, oracle_state

  return scheduler.Pusher(init, run_chunk, int(need.max()), refill=refill)


def run(need, *, slots=2, chunk=2, refill=True, active=None):
  log = {"init": [], "chunks": [], "progress": []}
  result = scheduler.schedule(
      toy_pusher(need, chunk=chunk, refill=refill, log=log), len(need),
      oracle=ORACLE, oracle_state=ORACLE.init(), slots=slots, active=active,
      on_chunk=log["progress"].append)
  return result, log


def test_refill_fills_each_freed_slot_once_then_shrinks():
  need = [1, 4, 2, 3]
  result, log = run(need, refill=True)
  np.testing.assert_array_equal(result.state.iterations, need)
  assert result.state.done.all()
  # Start [0, 1]; 0 finishes and sample 2 takes its slot (live rows first, then
  # the new one); 1 and 2 finish together and the last sample runs alone in a
  # batch shrunk to 1.
  assert log["init"] == [([0, 1], [True, True]), ([0, 2], [False, True]),
                         ([3], [True])]
  assert [rows for rows, _ in log["chunks"]] == [[0, 1], [1, 2], [3], [3]]
  assert [p.batch_size for p in log["progress"]] == [2, 2, 1, 1]
  live_inits = [i for ids, live in log["init"] for i, l in zip(ids, live) if l]
  assert sorted(live_inits) == list(range(len(need)))
  assert [p.samples_done for p in log["progress"]][-1] == len(need)


def test_groups_without_refill_shrink_to_the_live_rows():
  need = [1, 4, 2, 3]
  result, log = run(need, refill=False)
  np.testing.assert_array_equal(result.state.iterations, need)
  # No sample joins a running group; each group shrinks to its live rows exactly.
  assert [ids for ids, _ in log["init"]] == [[0, 1], [2, 3]]
  assert [rows for rows, _ in log["chunks"]] == [[0, 1], [1], [2, 3], [3]]


@pytest.mark.parametrize("refill", [True, False])
def test_slot_occupancy_is_busy_over_run_slot_iterations(refill):
  need = [1, 4, 2, 3]
  result, log = run(need, refill=refill)
  # Rebuild each chunk's (sample, iterations before) from the chunks' rows.
  done_so_far = {s: 0 for s in range(len(need))}
  batches = []
  for rows, done in log["chunks"]:
    batch = [(s, done_so_far[s]) for s, d in zip(rows, done) if not d]
    for s, before in batch:
      done_so_far[s] = min(need[s], before + 2)
    batches.append(batch + [(None, None)] * (len(rows) - len(batch)))
  busy = sum(sum(min(2, need[s] - b) for s, b in batch if s is not None)
             for batch in batches)
  ran = sum(len(batch) * max(min(2, need[s] - b) for s, b in batch if s is not None)
            for batch in batches)
  stats = result.statistics
  assert (stats.busy_slot_iterations, stats.slot_iterations) == (busy, ran)
  assert stats.busy_slot_iterations == sum(need)  # Every iteration ran in a chunk.
  assert stats.calls == len(log["chunks"])
  assert stats.slot_occupancy == pytest.approx(busy / ran)
  assert 0 < stats.slot_occupancy < 1  # A slot waited for the slowest row.


def test_slot_occupancy_by_hand():
  # slots 2, chunks of 2: [0, 1] runs 2 iterations (0 needs 1): 3 of 4 busy;
  # [2, 1] runs 2: 4 of 4; [3] alone twice: 2 of 2, then 1 of 1.
  result, _ = run([1, 4, 2, 3], refill=True)
  assert result.statistics.busy_slot_iterations == 3 + 4 + 2 + 1
  assert result.statistics.slot_iterations == 4 + 4 + 2 + 1
  assert result.statistics.slot_occupancy == pytest.approx(10 / 11)


@pytest.mark.parametrize("refill", [True, False])
def test_finished_at_init_and_inactive_samples_never_enter_a_chunk(refill):
  need = [3, 0, 2, 0, 1]
  active = np.array([True, True, True, True, False])
  result, log = run(need, slots=4, refill=refill, active=active)
  ran = {s for rows, done in log["chunks"] for s, d in zip(rows, done) if not d}
  assert ran == {0, 2}
  # Rows finished by init were collected before the first chunk of their batch.
  assert all(not any(done) for _, done in log["chunks"])
  np.testing.assert_array_equal(result.state.iterations, [3, 0, 2, 0, 0])
  assert result.state.done.all()
  assert log["init"][0] == ([4], [False])  # The inactive sample: never live.
  assert result.statistics.busy_slot_iterations == 5


def test_batch_size_for_is_a_power_of_two_within_the_slots():
  for slots in (1, 4, 6, 64):
    for count in range(1, slots + 1):
      size = scheduler.batch_size_for(count, slots)
      assert count <= size <= slots
      assert size == slots or size & (size - 1) == 0
  assert scheduler.batch_size_for(3, 8, devices=3) % 3 == 0


def test_statistics_of_nothing():
  assert np.isnan(scheduler.statistics().slot_occupancy)


def _joined(parts):
  """``(ids, leaves)`` of several ``on_finished`` calls, as one ``restored``."""
  ids = np.concatenate([i for i, _ in parts])
  leaves = [np.concatenate(column) for column in zip(*[l for _, l in parts])]
  return ids, leaves


def test_a_resumed_schedule_runs_only_the_missing_samples_and_reports_each_once():
  need = [1, 4, 2, 3, 5, 2]
  active = np.array([True, True, True, False, True, True])
  whole, _ = run(need, active=active)
  # The first run stops at its deadline after one chunk: samples 0 finished.
  first, log = [], {"init": [], "chunks": [], "progress": []}
  pusher = toy_pusher(need, chunk=2, refill=True, log=log)
  with pytest.raises(scheduler.DeadlineReached) as stop:
    scheduler.schedule(pusher, len(need), oracle=ORACLE, oracle_state=ORACLE.init(),
                       slots=2, active=active, resume=scheduler.Resume(
                           on_finished=lambda i, l: first.append((i, l)),
                           deadline=0.0))
  assert len(log["chunks"]) == 1
  done = np.concatenate([i for i, _ in first])
  assert sorted(done.tolist()) == [0, 3] and stop.value.finished == 2
  # The rerun restores them and runs only the others, each reported once.
  second, log = [], {"init": [], "chunks": [], "progress": []}
  result = scheduler.schedule(
      toy_pusher(need, chunk=2, refill=True, log=log), len(need), oracle=ORACLE,
      oracle_state=ORACLE.init(), slots=2, active=active,
      on_chunk=log["progress"].append,
      resume=scheduler.Resume(restored=_joined(first),
                              on_finished=lambda i, l: second.append((i, l))))
  live = [i for ids, flags in log["init"] for i, l in zip(ids, flags) if l]
  assert sorted(live) == [1, 2, 4, 5]
  again = np.concatenate([i for i, _ in second])
  assert sorted(again.tolist()) == [1, 2, 4, 5]
  for name in whole.state._fields:
    np.testing.assert_array_equal(getattr(result.state, name),
                                  getattr(whole.state, name))
  # The bar's measure moves from the first chunk and ends at samples x maximum.
  work = [p.sample_iterations for p in log["progress"]]
  assert work[0] > 2 * 5 and work == sorted(work) and work[-1] == 6 * 5


def test_without_a_deadline_on_finished_sees_every_sample_once():
  need = [1, 4, 2, 3, 0]
  seen = []
  scheduler.schedule(toy_pusher(need, chunk=2, refill=False,
                                log={"init": [], "chunks": []}),
                     len(need), oracle=ORACLE, oracle_state=ORACLE.init(), slots=2,
                     resume=scheduler.Resume(on_finished=lambda i, l: seen.append(i)))
  assert sorted(np.concatenate(seen).tolist()) == list(range(len(need)))


def test_restored_rows_of_another_state_are_refused():
  need = [1, 2]
  with pytest.raises(ValueError, match="do not match"):
    scheduler.schedule(
        toy_pusher(need, chunk=2, refill=True, log={"init": [], "chunks": []}), 2,
        oracle=ORACLE, oracle_state=ORACLE.init(), slots=2,
        resume=scheduler.Resume(restored=(np.array([0]), [np.zeros(1)])))


def test_samples_in_flight_at_the_deadline_continue_where_they_stopped():
  # Sample 1 needs 9 iterations, more than any one run below lasts (one chunk of
  # 2): it finishes only because each run continues it from the saved state.
  need = [1, 9, 2]
  whole, _ = run(need)
  finished, running, runs = [], None, 0
  while True:
    runs += 1
    assert runs < 10, "no progress across runs"
    log = {"init": [], "chunks": []}
    saved = []
    resume = scheduler.Resume(
        restored=_joined(finished) if finished else None,
        on_finished=lambda i, l: finished.append((i, l)), deadline=0.0,
        running=running, on_running=lambda i, l: saved.append((i, l)))
    try:
      result = scheduler.schedule(
          toy_pusher(need, chunk=2, refill=True, log=log), len(need),
          oracle=ORACLE, oracle_state=ORACLE.init(), slots=2, resume=resume)
      break
    except scheduler.DeadlineReached:
      assert len(log["chunks"]) == 1 and len(saved) == 1
      running = saved[0]  # Restarted from iteration 0 it would never finish.
  assert runs == 5  # Sample 1: 2 + 2 + 2 + 2 + 1 iterations.
  for name in whole.state._fields:
    np.testing.assert_array_equal(getattr(result.state, name),
                                  getattr(whole.state, name))
  assert int(np.sum(result.state.iterations)) == 1 + 9 + 2


def test_a_callable_deadline_is_read_between_chunks_and_can_be_brought_forward():
  # What a SIGTERM handler does (experiments/run/stop_signal.py): no limit until
  # the third chunk has run, then the deadline moves to the past.
  need = [6, 6, 6]
  log = {"init": [], "chunks": []}
  saved = []
  deadline = lambda: -math.inf if len(log["chunks"]) >= 3 else math.inf  # noqa: E731
  with pytest.raises(scheduler.DeadlineReached):
    scheduler.schedule(
        toy_pusher(need, chunk=1, refill=True, log=log), len(need), oracle=ORACLE,
        oracle_state=ORACLE.init(), slots=2, resume=scheduler.Resume(
            deadline=deadline, on_running=lambda i, l: saved.append((i, l))))
  assert len(log["chunks"]) == 3  # Stopped at the first check after the move,
  assert len(saved) == 1 and len(saved[0][0]) == 2  # its two samples in flight saved.
