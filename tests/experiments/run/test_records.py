"""experiments/run/records.py: results carry the commit the run started from and the
process's peak host memory."""

import os
import subprocess

import pytest

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


def test_host_peak_rss_is_the_kernels_high_water_mark_in_mib():
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not os.path.exists("/proc/self/status"):
    pytest.skip("No /proc here to read the kernel's VmHWM from.")
  block = np.ones((64 * 2**20 // 8,))  # touch some pages first
  peak = records.host_peak_rss_mib()
  with open("/proc/self/status") as f:
    hwm_kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
  # KiB read as MiB would be 1024x too large, bytes read as KiB 1024x too small.
  assert abs(peak - hwm_kib / 1024) < 4, (peak, hwm_kib)
  del block
