"""Grid engines: run a grid's stages (``experiments/run/grid.py``) here or on Ray.

- ``local``: one stage after another in this process (the default; no Ray needed).
- ``ray``: every stage a Ray task, started once the stages it needs have finished.
  With no address Ray starts on this machine; ``address`` (or ``RAY_ADDRESS``)
  joins a running cluster (WORKSPACE.md "A grid on a Ray cluster"). A task asks
  for ``gpus_per_task`` GPUs (fractions pack several on one GPU) when the cluster
  has GPUs, one CPU otherwise. A task whose worker dies is retried by Ray
  (``MAX_RETRIES``); a stage that raises fails, and so does every stage that needs it.

Both skip the stages an earlier run finished (``stages.is_done``) and return
``{stage: Outcome}``. The workdir must be storage every node mounts.
"""

from __future__ import annotations

import collections
import os
from typing import NamedTuple

from experiments.run import errors
from experiments.run import grid
from experiments.run import progress
from experiments.run import stages as stages_lib

ENGINES = ("local", "ray")
MAX_RETRIES = 3  # Ray reruns a task whose worker died this many times.


class Outcome(NamedTuple):
  """A stage's end: ``done`` (ran now), ``reused`` (an earlier run's), ``failed``."""

  status: str
  record: dict | None = None
  error: str | None = None


def _needs_failed(stage: grid.Stage, outcomes: dict) -> Outcome | None:
  failed = [n for n in stage.needs if outcomes.get(n, Outcome("done")).status
            == "failed"]
  return (Outcome("failed", error=f"needs {failed[0]}, which failed: "
                  f"{outcomes[failed[0]].error}") if failed else None)


def node_summary(events: list[dict]) -> str:
  """``node: done/running/failed`` for every node in the events (the last event
  of each stage decides its state)."""
  last = {}
  for event in events:
    last[event["stage"]] = event
  counts = collections.defaultdict(collections.Counter)
  for event in last.values():
    state = {"start": "running"}.get(event["event"], event["event"])
    counts[event["node"]][state] += 1
  return "; ".join(f"{n}: {c['done']} done, {c['running']} running, "
                   f"{c['failed']} failed" for n, c in sorted(counts.items()))


class _Bar:
  """Stages done / reused / failed, and each node's work, from the events log."""

  def __init__(self, root: str, total: int, enabled: bool):
    self.root, self.states = root, collections.Counter()
    self.bar = progress.progress(total=total, desc="grid", unit="stage",
                                 enabled=enabled)

  def update(self, outcome: Outcome | None = None) -> None:
    if outcome is not None:
      self.states[outcome.status] += 1
      self.bar.update()
    self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.states.items())
                             + " | " + node_summary(stages_lib.read_events(self.root)))

  def close(self) -> None:
    self.bar.close()


def run_local(stages: list[grid.Stage], root: str, *,
              show_progress: bool = True) -> dict[str, Outcome]:
  """Every stage in this process, in order (``stages`` has needs first)."""
  outcomes, bar = {}, _Bar(root, len(stages), show_progress)
  for stage in stages:
    outcome = Outcome("reused") if stages_lib.is_done(root, stage) else (
        _needs_failed(stage, outcomes))
    if outcome is None:
      bar.bar.set_description(stage.name)
      try:
        outcome = Outcome("done", stages_lib.execute(root, stage, show_progress))
      except errors.TimeBudgetReached:
        raise  # SIGTERM or --time_budget: the whole run stops, its work saved.
      except Exception as error:  # pylint: disable=broad-except
        outcome = Outcome("failed", error=stages_lib.one_line(error))
    outcomes[stage.name] = outcome
    bar.update(outcome)
  bar.close()
  return outcomes


def _ray():
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as missing:
    raise errors.UserError(
        "--engine=ray needs Ray, which is not installed: pip install -e '.[ray]' "
        "(or use --engine=local).") from missing
  return ray


def check(engine: str) -> None:
  """Refuses an engine that cannot start, before any work."""
  if engine == "ray":
    _ray()


def _execute(root: str, stage: grid.Stage, *needs) -> dict:
  del needs  # Finished before this task starts: Ray passes their results.
  return stages_lib.execute(root, stage)


def _task_options(ray, stage: grid.Stage, gpus_per_task: float | None) -> dict:
  gpus = gpus_per_task
  if gpus is None:
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
  return {"num_cpus": 1, "num_gpus": gpus, "max_retries": MAX_RETRIES,
          "scheduling_strategy": "SPREAD", "name": stage.name}


def _worker_env(gpus_per_task: float | None) -> dict:
  """The workers' XLA_FLAGS (``--deterministic``), and with several processes on
  one GPU no preallocation (JAX would take 75% of it in each)."""
  env = {}
  if os.environ.get("XLA_FLAGS"):
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
  if gpus_per_task is not None and 0 < gpus_per_task < 1:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return {"env_vars": env} if env else {}


def run_ray(stages: list[grid.Stage], root: str, *, address: str | None = None,
            gpus_per_task: float | None = None,
            show_progress: bool = True) -> dict[str, Outcome]:
  """Every unfinished stage as a Ray task; waits for all of them."""
  ray = _ray()
  owned = not ray.is_initialized()
  if owned:
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             runtime_env=_worker_env(gpus_per_task) or None)
  try:
    remote, outcomes, refs = ray.remote(_execute), {}, {}
    for stage in stages:
      if stages_lib.is_done(root, stage):
        outcomes[stage.name] = Outcome("reused")
        continue
      needs = [refs[n] for n in stage.needs if n in refs]
      refs[stage.name] = remote.options(
          **_task_options(ray, stage, gpus_per_task)).remote(root, stage, *needs)
    _wait(ray, refs, outcomes, _Bar(root, len(stages), show_progress))
  finally:
    if owned:
      ray.shutdown()
  by_name = {s.name: s for s in stages}
  for name, outcome in list(outcomes.items()):  # Failed as a need failed.
    if outcome.status == "failed":
      outcomes[name] = _needs_failed(by_name[name], outcomes) or outcome
  return outcomes


def _wait(ray, refs: dict, outcomes: dict, bar: _Bar) -> None:
  names = {ref: name for name, ref in refs.items()}
  for _ in range(len(outcomes)):
    bar.update(Outcome("reused"))
  pending = list(refs.values())
  while pending:
    ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
    for ref in ready:
      try:
        outcome = Outcome("done", ray.get(ref))
      except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", None) or error
        outcome = Outcome("failed", error=stages_lib.one_line(cause))
      outcomes[names[ref]] = outcome
      bar.update(outcome)
    if not ready:
      bar.update()
  bar.close()


def run(engine: str, stages: list[grid.Stage], root: str, *,
        address: str | None = None, gpus_per_task: float | None = None,
        show_progress: bool = True) -> dict[str, Outcome]:
  """The stages on ``engine`` (``ENGINES``)."""
  if engine == "local":
    return run_local(stages, root, show_progress=show_progress)
  return run_ray(stages, root, address=address, gpus_per_task=gpus_per_task,
                 show_progress=show_progress)
