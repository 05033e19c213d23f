"""experiments/run/{grid,stages,engines}.py on toy stages (the real grid on Ray:
tests/test_engine.py)."""

import sys

import pytest

from experiments.run import engines
from experiments.run import errors
from experiments.run import grid
from experiments.run import stages


@pytest.fixture
def toy_kinds(monkeypatch):
  """Stage kinds that record their calls; ``boom`` raises, ``stop`` stops at a
  deadline or SIGTERM."""
  calls = []

  def ok(name, show_progress):
    del show_progress
    calls.append(name)
    return {"value": name}

  def boom(name, show_progress):
    del show_progress
    calls.append(name)
    raise ValueError(f"{name} broke")
  def stop(name, show_progress):
    del show_progress
    calls.append(name)
    raise errors.TimeBudgetReached(f"{name} stopped; rerun")
  monkeypatch.setattr(stages, "STAGE_KINDS", {"ok": ok, "boom": boom, "stop": stop})
  return calls


def toy(name, kind="ok", needs=()):
  return grid.Stage(name, kind, tuple(needs), f"fp-{name}", (name,))


def test_a_failed_stage_fails_what_needs_it_and_nothing_else(tmp_path, toy_kinds):
  plan = [toy("train"), toy("push", "boom", ["train"]),
          toy("point_a", needs=["train", "push"]), toy("point_b", needs=["train"])]
  outcomes = engines.run_local(plan, str(tmp_path), show_progress=False)
  assert {n: o.status for n, o in outcomes.items()} == {
      "train": "done", "push": "failed", "point_a": "failed", "point_b": "done"}
  assert outcomes["push"].error == "ValueError: push broke"
  assert outcomes["point_a"].error.startswith("needs push, which failed")
  assert toy_kinds == ["train", "push", "point_b"]  # point_a never ran
  # A rerun reuses what finished and runs again only what did not.
  toy_kinds.clear()
  again = engines.run_local(plan, str(tmp_path), show_progress=False)
  assert toy_kinds == ["push"]
  assert again["train"].status == again["point_b"].status == "reused"
  events = stages.read_events(str(tmp_path))
  assert [(e["stage"], e["event"]) for e in events][:2] == [("train", "start"),
                                                          ("train", "done")]
  assert sum(e["event"] == "failed" for e in events) == 2


def test_a_changed_fingerprint_or_a_missing_output_runs_a_stage_again(tmp_path,
                                                                      toy_kinds):
  engines.run_local([toy("train")], str(tmp_path), show_progress=False)
  assert stages.is_done(str(tmp_path), toy("train"))
  assert not stages.is_done(str(tmp_path), toy("train")._replace(fingerprint="x"))
  missing = toy("train")._replace(outputs=(str(tmp_path / "absent.json"),))
  assert not stages.is_done(str(tmp_path), missing)


def test_node_summary_counts_each_stage_by_its_last_event():
  events = [{"stage": "a", "event": "start", "node": "n1"},
            {"stage": "a", "event": "done", "node": "n1"},
            {"stage": "b", "event": "start", "node": "n2"},
            {"stage": "c", "event": "start", "node": "n2"},
            {"stage": "c", "event": "failed", "node": "n2"}]
  assert engines.node_summary(events) == (
      "n1: 1 done, 0 running, 0 failed; n2: 0 done, 1 running, 1 failed")


def test_the_ray_engine_without_ray_is_one_line_before_any_work(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
  with pytest.raises(errors.UserError, match=r"pip install -e '\.\[ray\]'"):
    engines.check("ray")
  engines.check("local")


def test_a_stage_stopped_at_its_deadline_stops_the_run_and_a_rerun_goes_on(
    tmp_path, toy_kinds):
  plan = [toy("train"), toy("push", "stop", ["train"]), toy("point_b", needs=["train"])]
  with pytest.raises(errors.TimeBudgetReached):
    engines.run_local(plan, str(tmp_path), show_progress=False)
  assert toy_kinds == ["train", "push"]  # Nothing ran after the stop.
  events = [(e["stage"], e["event"]) for e in stages.read_events(str(tmp_path))]
  assert events[-1] == ("push", "stopped") and ("push", "failed") not in events
  toy_kinds.clear()
  plan[1] = toy("push", needs=["train"])  # This time the push finishes.
  outcomes = engines.run_local(plan, str(tmp_path), show_progress=False)
  assert toy_kinds == ["push", "point_b"] and outcomes["train"].status == "reused"
