"""A workdir's reliability: the run lock, the data guard, cut-short files, one-line
user errors with exit status 2 (issue 24)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.run import data_guard
from experiments.run import errors
from experiments.run import records
from experiments.run import training
from experiments.run import workdir_lock
from experiments.setup import configs
from experiments.studies.stealthiness import measure as stealthiness_measure
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from tests.experiments.test_experiments import mock_cifar10  # pylint: disable=unused-import
from tests.experiments.test_experiments import parse
from tests.experiments.test_experiments import run_script

ROOT = next(str(p) for p in pathlib.Path(__file__).resolve().parents
            if (p / "pyproject.toml").exists())


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    saved = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirBusy,
                       match=rf"pid {os.getpid()} on host .*command: .*Wait for") \
        as busy:
      workdir_lock.acquire(str(tmp_path))
    assert isinstance(busy.value, errors.UserError)
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  with workdir_lock.hold(str(tmp_path)):  # Free again once released.
    pass


def test_a_stale_lock_is_recovered(tmp_path, capsys):
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {"pid": _dead_pid(), "host": socket.gethostname(), "command": "gone",
       "started": 0}))
  with workdir_lock.hold(str(tmp_path)):
    saved = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert saved["pid"] == os.getpid()
  assert "recovered the stale lock" in capsys.readouterr().err
  # Another host's lock is not judged by a local pid: refused, with the fix.
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {"pid": _dead_pid(), "host": "elsewhere", "command": "far", "started": 0}))
  with pytest.raises(workdir_lock.WorkdirBusy, match="host elsewhere.*delete"):
    workdir_lock.acquire(str(tmp_path))


def test_a_second_run_on_a_busy_workdir_exits_2_at_once(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from experiments.run import workdir_lock\n"
       f"with workdir_lock.hold({str(tmp_path)!r}):\n"
       "  print('held', flush=True); time.sleep(60)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--scale=smoke",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    seconds = time.monotonic() - started
  finally:
    holder.kill()
    holder.wait()
  assert second.returncode == 2, second.stderr
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], second.stderr
  assert seconds < 5, seconds
  assert not (tmp_path / "train_history.json").exists()


@pytest.mark.parametrize("flag", ["--attack=nope", "--defence=nope", "--scale=nope"])
def test_unknown_choices_exit_2_with_one_line(flag, tmp_path):
  run = subprocess.run([sys.executable, "-m", "experiments.pushing", flag,
                        f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
      line for line in run.stderr.strip().splitlines()
      if line.startswith("error: flag " + flag.split("=")[0])]


def test_temporary_names_are_unique_per_writer(tmp_path):
  path = str(tmp_path / "block-0000.npz")
  first, second = records.temporary_path(path), records.temporary_path(path)
  assert first != second and first.endswith(".npz") and str(os.getpid()) in first
  records.write_json(str(tmp_path / "x.json"), {"a": 1})
  assert os.listdir(tmp_path) == ["x.json"]


def _splits():
  images = np.zeros((4, 2, 2, 3), np.float32)
  part = data_lib.LabelledImages(images, np.arange(4, dtype=np.int32),
                                 np.arange(4))
  return data_lib.Splits(part, part, part)


def test_the_data_guard_refuses_a_model_without_a_fingerprint(tmp_path):
  config = configs.TrainConfig()
  workdir = str(tmp_path)
  (tmp_path / "train_metrics.json").write_text("{}")
  with pytest.raises(errors.UserError, match="no data_fingerprint.json") as refused:
    data_guard.check_data_identity(workdir, config, _splits())
  assert not (tmp_path / "data_fingerprint.json").exists()
  assert "another --workdir" in str(refused.value)
  # An empty workdir gets its fingerprint; the same data passes again.
  os.remove(tmp_path / "train_metrics.json")
  data_guard.check_data_identity(workdir, config, _splits())
  data_guard.check_data_identity(workdir, config, _splits())
  # Cut short: the advice keeps the guard (no "delete it and rerun").
  path = tmp_path / "data_fingerprint.json"
  path.write_text(path.read_text()[:20])
  with pytest.raises(errors.UserError, match="data_fingerprint.json") as cut:
    data_guard.check_data_identity(workdir, config, _splits())
  message = str(cut.value)
  assert "\n" not in message and records.REWRITE not in message
  assert "delete the model too" in message


def test_a_cut_short_or_missing_history_is_not_silently_emptied(tmp_path):
  from ounl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ounl_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = tiny.mlp_model(hidden=4)
  optimizer = train_lib.amsgrad(1e-3)
  state = train_lib.init_train_state(model.init(jax.random.key(0)), optimizer)
  stopping = train_lib.early_stopping_init()
  epoch_dir = str(tmp_path / "checkpoints" / "train")
  checkpoint.save(epoch_dir, 1, training._checkpoint_tree(  # pylint: disable=protected-access
      state, state.variables, stopping, 1))
  history = tmp_path / "train_history.json"

  def resume():
    return training._resume(epoch_dir, str(history), state,  # pylint: disable=protected-access
                            state.variables, stopping)
  with pytest.raises(errors.UserError, match="train_history.json is missing"):
    resume()
  history.write_text('[{"epoch": 0}, {"ep')
  with pytest.raises(errors.UserError, match="train_history.json is not valid") \
      as cut:
    resume()
  assert records.REWRITE not in str(cut.value)
  assert "checkpoints/train" in str(cut.value)
  history.write_text('[{"epoch": 0}]')
  with pytest.raises(errors.UserError, match="holds 1 epochs"):
    resume()
  history.write_text('[{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]')
  assert resume()[3] == [{"epoch": 0}, {"epoch": 1}]


def test_a_cut_short_dataset_info_names_the_file(tmp_path):
  info = tmp_path / "dataset_info.json"
  info.write_text('{"name": "cifar10", "fileFor')
  with pytest.raises(data_lib.DataCorruptError, match=str(info)) as cut:
    data_lib.check_array_record(str(tmp_path))
  assert "\n" not in str(cut.value)
  assert data_lib.DataCorruptError in errors.user_errors()


def test_a_cut_short_pushed_npz_names_the_file(tmp_path):
  arrays = {k: np.zeros((2, 2, 2, 3) if k in ("original", "pushing_i",
                                              "pushing_ii") else (2,))
            for k in stealthiness_measure.REQUIRED_KEYS}
  whole = tmp_path / "pushed.npz"
  np.savez_compressed(whole, **arrays)
  assert set(stealthiness_measure.load_pushed(str(whole))) == set(arrays)
  data = whole.read_bytes()
  for size in (len(data) // 2, len(data) - 30, 10):
    cut = tmp_path / f"cut{size}.npz"
    cut.write_bytes(data[:size])
    with pytest.raises(ValueError, match=str(cut)) as error:
      stealthiness_measure.load_pushed(str(cut))
    assert "cut short" in str(error.value)


def test_a_diverging_unlearning_writes_no_results(mock_cifar10, tmp_path):
  workdir = tmp_path / "run"
  fv = parse(workdir, "--tau=1e30", "--max_iterations=5",
             "--iterations_per_chunk=5")
  with pytest.raises(service_lib.UnlearningDiverged, match="probe images"):
    run_script(fv)
  assert not (workdir / "results.json").exists()
  assert service_lib.UnlearningDiverged in errors.user_errors()
