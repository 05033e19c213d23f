"""Checkpoints: fallback past a corrupt newest checkpoint, clear errors, replacement."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from experiments.setup import configs
from experiments.run import data_guard
from experiments.run import training
from ounl_jax import checkpoint
from ounl_jax import train as train_lib
from tests.ounl_jax.test_train import random_splits

TREE = {"a": np.arange(6, dtype=np.float32), "b": {"c": np.ones((2, 3), np.int32)}}


def tree_at(step):
  return {"a": TREE["a"] + step, "b": {"c": TREE["b"]["c"] * step}}


@pytest.fixture
def two_checkpoints(tmp_path):
  directory = str(tmp_path / "ckpt")
  checkpoint.save(directory, 3, tree_at(3))
  checkpoint.save(directory, 4, tree_at(4))
  return directory


def data_files(directory, step):
  """The array-data files of one checkpoint (orbax/OCDBT layout)."""
  files = glob.glob(os.path.join(directory, str(step), "default", "d", "*"))
  assert files, "layout changed: no data file found"
  return files


def truncate_data(directory, step):
  for path in data_files(directory, step):
    with open(path, "r+b") as f:
      f.truncate(10)


def delete_metadata(directory, step):
  os.remove(os.path.join(directory, str(step), "default", "_METADATA"))


def assert_tree_equal(got, want):
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_intact_newest_is_restored_with_nothing_skipped(two_checkpoints):
  restored = checkpoint.restore_newest_intact(two_checkpoints, TREE)
  assert restored.step == 4 and restored.skipped == ()
  assert_tree_equal(restored.tree, tree_at(4))
  assert checkpoint.restore_newest_intact(two_checkpoints + "-none", TREE) is None


@pytest.mark.parametrize("corrupt, reason", [
    (truncate_data, "OUT_OF_RANGE"),
    (delete_metadata, "FileNotFoundError"),
])
def test_corrupt_newest_falls_back_to_the_older_one(two_checkpoints, corrupt,
                                                     reason):
  corrupt(two_checkpoints, 4)
  restored = checkpoint.restore_newest_intact(two_checkpoints, TREE)
  assert restored.step == 3
  assert_tree_equal(restored.tree, tree_at(3))
  (skipped,) = restored.skipped
  assert skipped.step == 4
  assert skipped.path == os.path.join(os.path.abspath(two_checkpoints), "4")
  assert reason in skipped.reason and "\n" not in skipped.reason
  assert len(skipped.reason) < 300
  # The strict restore still refuses the newest, naming its path and the fix.
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.restore_latest(two_checkpoints, TREE)
  message = str(info.value)
  assert skipped.path in message and "rm -r" in message
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_all_corrupt_is_one_clear_error(two_checkpoints):
  truncate_data(two_checkpoints, 4)
  delete_metadata(two_checkpoints, 3)
  with pytest.raises(checkpoint.CheckpointError,
                     match="No checkpoint in .* can be restored") as info:
    checkpoint.restore_newest_intact(two_checkpoints, TREE)
  message = str(info.value)
  root = os.path.abspath(two_checkpoints)
  for step in (4, 3):
    assert os.path.join(root, str(step)) in message
  assert "corrupt" in message and "--workdir" in message and "rm -r" in message
  assert info.value.__cause__ is None and info.value.__context__ is None
  assert len(message) < 1500


def test_shape_mismatch_is_not_skipped_as_corruption(two_checkpoints):
  other = {"a": np.zeros(6, np.float32), "b": {"c": np.ones((3, 3), np.int32)}}
  with pytest.raises(checkpoint.CheckpointError, match="does not match"):
    checkpoint.restore_newest_intact(two_checkpoints, other)


def test_saving_over_a_corrupt_step_replaces_it(two_checkpoints):
  truncate_data(two_checkpoints, 4)
  checkpoint.save(two_checkpoints, 4, tree_at(40))
  restored = checkpoint.restore_newest_intact(two_checkpoints, TREE)
  assert restored.step == 4 and restored.skipped == ()
  assert_tree_equal(restored.tree, tree_at(40))


def test_training_resumes_past_a_corrupt_epoch_checkpoint(tmp_path, capsys):
  # Epoch checkpoints 0 and 1 as training writes them, with distinct best weights;
  # epoch 1's gets corrupted. With epochs=1 the resumed run has nothing left to
  # train, so its final model is epoch 0's best weights (no training compile).
  config = configs.TrainConfig(dataset="cifar10", model="vgg3", width=4, epochs=1,
                              patience=5, batch_size=32)
  model = training.build_model(config)
  state = train_lib.init_train_state(model.init(jax.random.key(5)),
                                     train_lib.amsgrad(1e-3))
  stopping = train_lib.early_stopping_init()
  epoch_dir = str(tmp_path / "checkpoints" / "train")
  splits = random_splits(n=32)
  # What training writes before its checkpoints: the data's fingerprint and the
  # history (the workdir guards refuse checkpoints without them).
  data_guard.check_data_identity(str(tmp_path), config, splits)
  (tmp_path / "train_history.json").write_text(json.dumps(
      [{"epoch": e, "epoch_seconds": 1.0} for e in (0, 1)]))
  best = {}
  for epoch in (0, 1):
    best[epoch] = jax.tree_util.tree_map(lambda x, e=epoch: np.asarray(x) + e,
                                         state.variables)
    checkpoint.save(epoch_dir, epoch, training._checkpoint_tree(  # pylint: disable=protected-access
        state, best[epoch], stopping, epoch))
  truncate_data(epoch_dir, 1)
  capsys.readouterr()
  trained = training.train_or_restore(config, str(tmp_path), splits,
                                      show_progress=False)
  lines = [l for l in capsys.readouterr().out.splitlines() if "corrupt" in l]
  assert len(lines) == 1
  assert lines[0].startswith("checkpoint 1 is corrupt (ValueError: OUT_OF_RANGE")
  assert lines[0].endswith("; resuming from 0")
  assert_tree_equal(trained.variables, best[0])
