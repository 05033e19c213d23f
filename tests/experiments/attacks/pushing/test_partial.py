"""A push that resumes (experiments/attacks/pushing/partial.py): finished samples
saved as they finish, restored by a rerun after ``kill -9`` or a time budget."""

import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.attacks.pushing import cache
from experiments.attacks.pushing import partial
from experiments.attacks.pushing import pushers
from experiments.attacks.pushing import released_rule
from experiments.run import errors
from ounl_jax.attacks import scheduler
from tests.experiments.attacks.pushing import test_pushes as tpu
from tests.ounl_jax.attacks import test_pushing as tp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))))
# Two samples in flight, short chunks: the stream's samples finish one by one.
SETTINGS = dataclasses.replace(tp.UNTARGETED, zoo=dataclasses.replace(
    tp.ZOO, sample_chunk_size=2, iterations_per_chunk=10))
REQUESTED = 9
# This run's work and timings: the only fields a resumed push may change.
THIS_RUN = ("seconds", "compile_seconds", "push_queries", "pushed_now",
            "slot_iterations", "busy_slot_iterations", "reused")


def push(workdir=None, deadline=None):
  keep = None if workdir is None else partial.Keep(
      partial.PartialPush(workdir, "fp"), deadline)
  store = None if workdir is None else cache.block_cache(workdir, "fp")
  return released_rule.push_released(
      tp.make_oracle(), tpu.candidates(), REQUESTED, jax.random.key(7),
      pushers.zoo_pusher(SETTINGS, None), target_class=None, size=4, store=store,
      show_progress=False, keep=keep)


def assert_same_push(resumed, whole):
  assert set(resumed) == set(whole)
  for name in whole:
    if name not in THIS_RUN:
      floats = np.asarray(whole[name]).dtype.kind == "f"
      assert np.array_equal(resumed[name], whole[name], equal_nan=floats), name


def saved_rows(workdir):
  folder = partial.PartialPush(workdir, "fp").folder
  return sorted(f for f in os.listdir(folder) if f.startswith("rows-")) if (
      os.path.isdir(folder)) else []


SCRIPT = """
import sys, time
from experiments.attacks.pushing import cache, partial
from tests.experiments.attacks.pushing import test_partial
save = partial.PartialPush.save
def slow_save(self, *args):  # Slow enough to be killed mid-stream.
  save(self, *args)
  time.sleep(0.4)
partial.PartialPush.save = slow_save
cache.save(sys.argv[1] + "/done.npz", test_partial.push(sys.argv[1]))
"""


def test_a_push_killed_mid_stream_resumes_with_the_same_arrays(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen([sys.executable, "-c", SCRIPT, workdir], cwd=ROOT,
                           env=env)
  started = time.time()
  while len(saved_rows(workdir)) < 3 and child.poll() is None:
    assert time.time() - started < 120, "the push saved nothing"
    time.sleep(0.05)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "done.npz"))  # Killed mid-stream.
  kept = len(np.unique(partial.PartialPush(workdir, "fp").load()[0]))
  assert kept >= 3 and not os.path.exists(cache.block_cache(workdir, "fp").folder)
  resumed = push(workdir)
  whole = push()
  # Only the missing samples were pushed, with fewer queries.
  positions = int(whole["pushed_now"])
  assert int(resumed["pushed_now"]) == positions - kept
  assert int(resumed["push_queries"]) < int(whole["push_queries"])
  assert_same_push(resumed, whole)
  assert saved_rows(workdir) == []   # Pruned once the blocks are saved.
  again = push(workdir)   # Read back from the blocks.
  assert int(again["pushed_now"]) == 0
  assert_same_push(again, whole)


def test_a_push_stops_at_its_deadline_and_a_rerun_completes_it(tmp_path,
                                                               monkeypatch):
  workdir = str(tmp_path)

  class Clock:  # The deadline (1.0) passes once a first sample is saved.
    @staticmethod
    def monotonic():
      return 2.0 if saved_rows(workdir) else 0.0

  monkeypatch.setattr(scheduler, "time", Clock)
  with pytest.raises(errors.TimeBudgetReached, match="rerun the same command"):
    push(workdir, deadline=1.0)
  monkeypatch.undo()
  kept = len(partial.PartialPush(workdir, "fp").load()[0])
  assert kept >= 1 and not os.path.exists(cache.block_cache(workdir, "fp").folder)
  whole = push()
  resumed = push(workdir)
  assert int(resumed["pushed_now"]) == int(whole["pushed_now"]) - kept
  assert_same_push(resumed, whole)


def test_a_save_of_another_push_is_never_read(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(errors.TimeBudgetReached):
    push(workdir, deadline=time.monotonic())
  partial.PartialPush(workdir, "fp").save(np.array([0]), [np.zeros(1)])
  assert len(partial.PartialPush(workdir, "fp").load()[0]) >= 1
  other = partial.PartialPush(workdir, "fp")
  other.key = "another"
  assert len(other.load()[0]) == 0


def test_runs_shorter_than_a_sample_still_finish_the_push(tmp_path, monkeypatch):
  # Every run stops after its first chunk (10 iterations): the samples in flight
  # are saved at the deadline and continued by the next run, so the push ends.
  workdir = str(tmp_path)

  class Clock:  # Past the deadline (1.0) from the start.
    @staticmethod
    def monotonic():
      return 2.0

  monkeypatch.setattr(scheduler, "time", Clock)
  for runs in range(1, 60):
    try:
      resumed = push(workdir, deadline=1.0)
      break
    except errors.TimeBudgetReached:
      continue
  monkeypatch.undo()
  assert runs > 2
  assert_same_push(resumed, push())
  running = glob.glob(os.path.join(partial.PartialPush(workdir, "fp").folder,
                                   "running-*.npz"))
  assert running == []  # Pruned with the rest once the blocks are saved.


SIGTERM_SCRIPT = SCRIPT.replace("cache.save(", """
from experiments.run import errors, stop_signal
stop_signal.install()
try:
  with stop_signal.listening():
    cache.save(""") + """except errors.TimeBudgetReached as stop:
  print(stop, file=sys.stderr)
  sys.exit(errors.TIME_BUDGET_STATUS)
"""


def test_sigterm_stops_a_push_cleanly_with_its_samples_in_flight_saved(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, workdir],
                           cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  started = time.time()
  while len(saved_rows(workdir)) < 2 and child.poll() is None:
    assert time.time() - started < 120, "the push saved nothing"
    time.sleep(0.05)
  os.kill(child.pid, signal.SIGTERM)
  _, stderr = child.communicate(timeout=60)
  assert child.returncode == errors.TIME_BUDGET_STATUS, stderr
  assert "SIGTERM arrived" in stderr and "rerun the same command" in stderr
  folder = partial.PartialPush(workdir, "fp").folder
  assert glob.glob(os.path.join(folder, "running-*.npz"))  # In flight: saved too.
  assert not os.path.exists(os.path.join(workdir, "done.npz"))
  kept = len(np.unique(partial.PartialPush(workdir, "fp").load()[0]))
  resumed, whole = push(workdir), push()
  assert int(resumed["pushed_now"]) == int(whole["pushed_now"]) - kept
  assert_same_push(resumed, whole)


def test_sigterm_outside_a_push_still_ends_the_process_at_once():
  # Training, unlearning, evaluation: nothing to save by waiting.
  script = ("import time; from experiments.run import stop_signal; "
            "stop_signal.install(); print('ready', flush=True); time.sleep(60)")
  child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT},
                           stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "ready"
  started = time.time()
  os.kill(child.pid, signal.SIGTERM)
  child.wait(timeout=30)
  assert child.returncode == 128 + signal.SIGTERM and time.time() - started < 10


def test_sigterm_during_a_push_that_reads_no_deadline_ends_the_process_after_it():
  # label_only pushes whole blocks: it finishes (saved), then the process exits.
  script = """
import os, signal
from experiments.run import stop_signal
stop_signal.install()
try:
  with stop_signal.listening():
    os.kill(os.getpid(), signal.SIGTERM)
    print("push finished", flush=True)
finally:
  print("after", flush=True)
print("never", flush=True)
"""
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60,
                        env={**os.environ, "PYTHONPATH": ROOT},
                        capture_output=True, text=True)
  assert done.returncode == 128 + signal.SIGTERM
  assert done.stdout.split() == ["push", "finished", "after"]
