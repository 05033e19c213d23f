"""experiments/run/records.py: results carry the commit the run started from."""

import subprocess

from experiments.run import records


def test_the_commit_is_read_once_per_process(monkeypatch):
  first = records.git_commit()
  run = subprocess.run

  def no_git_after_the_start(command, *args, **kwargs):
    assert command[0] != "git", "git was asked again after the run had started"
    return run(command, *args, **kwargs)
  monkeypatch.setattr(subprocess, "run", no_git_after_the_start)
  assert records.git_commit() == first
  assert records.run_metadata({"seed": 0})["git"] == first
