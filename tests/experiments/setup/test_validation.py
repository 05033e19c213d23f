"""Bad flags fail before any data is read or model trained, with one clear line."""

import os
import subprocess
import sys

from absl import flags
import pytest

from experiments.setup import cli
from experiments.run import errors
from experiments.run import records
from experiments.run import runner


def run_with(tmp_path, *extra):
  """``python -m experiments.pushing`` in-process, on fresh flags."""
  fv = flags.FlagValues()
  cli.define_experiment_flags(fv)
  fv(["test", "--scale=smoke", "--noprogress",
      f"--data_dir={tmp_path / 'no_data_here'}", *extra])
  return runner.run(cli.experiment_config(fv), fv.workdir, data_dir=fv.data_dir,
                    show_progress=False)


@pytest.mark.parametrize("flag,message", [
    ("--unlearn_class=plane", "Did you mean airplane"),
    ("--fraction=-0.1", "must be in (0, 1]"),
    ("--fraction=0", "must be in (0, 1]"),
    ("--fraction=1.5", "must be in (0, 1]"),
    ("--fraction=nan", "must be in (0, 1]"),
    ("--tau=-1", "tau must be > 0"),
    ("--epochs=0", "positive integer"),
    ("--width=0", "positive integer"),
    ("--batch_size=0", "positive integer"),
    ("--max_l2=-1", "positive finite number"),
    ("--max_iterations=0", "max_iterations must be >= 1"),
    ("--blend_ratio=2", "must be in (0, 1]"),
    ("--target_class=airplane", "must differ from the unlearned class"),
    ("--target_class=kat", "Did you mean cat"),
    ("--dataset=mnist", "cifar10, cifar100, stl10"),
    ("--model=vgg9", "Did you mean vgg5"),
    ("--reference_batch_size=0", "reference_batch_size must be >= 1"),
    ("--finetune_epochs=0", "epochs and batch_size must be >= 1"),
    ("--tau=inf", "tau must be finite"),
    ("--finetune_learning_rate=0", "positive finite number"),
    ("--false_rejection_rate=1", "must be in (0, 1)"),
    ("--sample_chunk_size=0", "sample_chunk_size must be >= 1"),
])
def test_bad_flag_is_refused_before_any_work(tmp_path, flag, message):
  workdir = tmp_path / "run"
  with pytest.raises(errors.UserError) as error:
    # The data folder does not exist: reaching the data would raise another error.
    run_with(tmp_path, f"--workdir={workdir}", flag)
  text = str(error.value)
  assert message in text and flag.split("=")[0] in text and "\n" not in text
  assert not workdir.exists()


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(errors.UserError, match="cannot write there"):
    run_with(tmp_path, f"--workdir={blocker / 'run'}")


@pytest.mark.parametrize("script,flag,message", [
    ("pushing", "--fraction=1.5", "--fraction=1.5: fraction must be in (0, 1] "
     "(the paper uses 0.1 and 0.5), got 1.5."),
    ("blending", "--defence=hashes", "--defence=hashes: value should be one of"),
])
def test_command_line_prints_one_line_and_exits_2(tmp_path, script, flag, message):
  out = subprocess.run(
      [sys.executable, "-m", f"experiments.{script}", flag,
       f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode in (1, 2) and message in out.stderr, out.stderr
  if script == "pushing":
    assert out.returncode == 2
    assert out.stderr.strip() == "error: " + message
  assert not (tmp_path / "run").exists()


def test_truncated_json_in_a_workdir_names_the_file_and_the_fix(tmp_path):
  path = tmp_path / "train_metrics.json"
  path.write_text('{"config": {"train": ')
  with pytest.raises(errors.UserError) as error:
    records.read_json(str(path))
  assert str(path) in str(error.value) and "Delete it and rerun" in str(error.value)


def test_truncated_push_is_pushed_again_not_a_raw_error(tmp_path, capsys):
  import numpy as np
  from experiments.attacks.pushing import cache
  path = tmp_path / "attack" / "pushed-abc.npz"
  cache.save(str(path), {"fingerprint": np.asarray("abc"),
                              "images": np.zeros((4, 8, 8, 3), np.float32)})
  assert cache.load(str(path), "abc") is not None
  path.write_bytes(path.read_bytes()[:40])  # Cut short.
  assert cache.load(str(path), "abc") is None
  assert str(path) in capsys.readouterr().err


def test_reproduce_points_filter_and_refuse_a_pattern_matching_nothing():
  from experiments import reproduce
  names = [name for name, _ in reproduce.grid("IV", ["fraction_0.1*"])]
  assert names == ["fraction_0.1_eq13", "fraction_0.1_released"]
  assert len(reproduce.grid("IV")) == 4
  with pytest.raises(errors.UserError, match="matches no point of table IV"):
    reproduce.grid("IV", ["fraction_0.3*"])
