"""Training: real learning on CIFAR-10, early stopping, resume, checkpoint errors."""

import os
import shutil

import jax
import numpy as np
import pytest

from experiments.setup import configs
from experiments.run import training
from ounl_jax import checkpoint
from ounl_jax import data as data_lib
from ounl_jax import train as train_lib


def random_splits(seed=0, n=256, classes=10):
  rng = np.random.default_rng(seed)

  def split(count, offset):
    labels = np.arange(count, dtype=np.int32) % classes
    # Class-dependent mean so there is something to learn.
    images = rng.uniform(-0.5, 0.5, (count, 32, 32, 3)).astype(np.float32)
    images = np.clip(images * 0.5 + (labels[:, None, None, None] / classes - 0.5),
                     -0.5, 0.5).astype(np.float32)
    return data_lib.LabelledImages(images, labels, np.arange(count) + offset)

  return data_lib.Splits(split(n, 0), split(64, n), split(64, 2 * n))


SMOKE = configs.TrainConfig(dataset="cifar10", model="vgg3", width=4, epochs=3,
                           patience=5, batch_size=32)


def test_early_stopping_keeps_lowest_validation_loss():
  state = train_lib.early_stopping_init()
  decisions = []
  for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.85, 0.95]):
    state, improved, stop = train_lib.early_stopping_update(
        state, loss, epoch, patience=3)
    decisions.append((improved, stop))
  assert state.best_epoch == 1 and state.best_loss == 0.8
  assert decisions == [(True, False), (True, False), (False, False),
                       (False, False), (False, True)]


def test_final_model_is_the_best_epoch(trained_workdir):
  tmp_path = trained_workdir
  trained = training.train_or_restore(SMOKE, str(tmp_path), random_splits(),
                                      show_progress=False)
  history = trained.metrics["history"]
  best = int(np.argmin([h["valid_loss"] for h in history]))
  assert trained.metrics["best_epoch"] == best
  # The reported validation loss is that of the restored best weights.
  assert trained.metrics["final"]["valid"]["loss"] == pytest.approx(
      history[best]["valid_loss"], rel=1e-5)
  for key in ("config", "versions", "git"):
    assert key in trained.metrics
  assert os.path.exists(tmp_path / "train_metrics.json")


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
  splits = random_splits()
  full = training.train_or_restore(SMOKE, str(tmp_path / "a"), splits,
                                   show_progress=False)
  real_save = checkpoint.save
  calls = []

  def save_then_crash(directory, step, tree, **kw):
    real_save(directory, step, tree, **kw)
    calls.append(step)
    if len(calls) == 2:
      raise KeyboardInterrupt  # Killed after the second epoch's checkpoint.

  monkeypatch.setattr(checkpoint, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    training.train_or_restore(SMOKE, str(tmp_path / "b"), splits,
                              show_progress=False)
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed = training.train_or_restore(SMOKE, str(tmp_path / "b"), splits,
                                      show_progress=False)
  assert [h["epoch"] for h in resumed.metrics["history"]] == [0, 1, 2]
  jax.tree_util.tree_map(np.testing.assert_array_equal, full.variables,
                         resumed.variables)
  # A finished workdir is reused, not retrained.
  again = training.train_or_restore(SMOKE, str(tmp_path / "b"), splits,
                                    show_progress=False)
  assert again.metrics == resumed.metrics


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  training.train_or_restore(SMOKE, str(workdir), random_splits(),
                            show_progress=False)
  return workdir


def test_workdir_of_another_config_is_refused(trained_workdir):
  splits = random_splits()
  tmp_path = trained_workdir
  other = configs.TrainConfig(**{**SMOKE.to_dict(), "width": 8})
  with pytest.raises(ValueError, match="another configuration"):
    training.train_or_restore(other, str(tmp_path), splits, show_progress=False)


def test_corrupt_checkpoint_is_a_clear_error(trained_workdir, tmp_path):
  splits = random_splits()
  shutil.copytree(trained_workdir, tmp_path / "w")
  tmp_path = tmp_path / "w"
  model_dir = tmp_path / "checkpoints" / "model"
  for path in model_dir.rglob("*"):
    if path.is_file() and "ocdbt.process" in str(path):
      path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    training.train_or_restore(SMOKE, str(tmp_path), splits, show_progress=False)


@pytest.mark.realdata
def test_training_on_real_cifar10_beats_chance(trained_vgg):
  # Width-16 VGG-3, 3 epochs on the CIFAR-10 copy: well above the 10% of chance.
  assert trained_vgg.test_eval.accuracy >= 0.35
