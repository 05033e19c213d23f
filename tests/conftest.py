"""Shared fixtures. Real-data fixtures skip, with the reason shown, without data."""

import os

import jax
import numpy as np
import pytest

from ounl_jax import data as data_lib
from ounl_jax import models
from ounl_jax import train as train_lib



def mock_prepared_folder(folder) -> str:
  """A folder that passes the prepared-data checks (for tfds.testing.mock_data)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    f.write('{"fileFormat": "array_record"}')
  return str(folder)


def real_data_dir():
  """TFDS_DATA_DIR when it holds prepared CIFAR-10, else None."""
  data_dir = os.environ.get("TFDS_DATA_DIR")
  if data_dir and data_lib.find_prepared(data_lib.get_spec("cifar10"), data_dir):
    return data_dir
  return None


@pytest.fixture(scope="session")
def cifar10_splits():
  """The real CIFAR-10 copy (CI: the small one), the paper's splits, seed 0."""
  data_dir = real_data_dir()
  if data_dir is None:
    pytest.skip("Real CIFAR-10 not found: set TFDS_DATA_DIR to a folder holding "
                "a prepared cifar10 (e.g. ../shared/tensorflow_datasets_small).")
  return data_lib.load("cifar10", data_dir=data_dir, seed=0)


class TrainedVGG:
  """A width-16 VGG-3 trained 3 epochs on real CIFAR-10 (about 40 s on 2 cores)."""

  def __init__(self, splits):
    self.splits = splits
    self.model = models.get_model("vgg3", num_classes=10, width=16)
    optimizer = train_lib.amsgrad(1e-3)
    state = train_lib.init_train_state(self.model.init(jax.random.key(0)),
                                       optimizer)
    step = train_lib.make_train_step(self.model, optimizer)
    for epoch in range(3):
      state, _ = train_lib.train_epoch(step, state, splits.train.images,
                                       splits.train.labels,
                                       jax.random.key(100 + epoch))
    self.variables = jax.tree_util.tree_map(np.asarray, state.variables)
    self.eval_step = train_lib.make_eval_step(self.model)
    self.test_eval = train_lib.evaluate(self.eval_step, self.variables,
                                        splits.test.images, splits.test.labels)


@pytest.fixture(scope="session")
def trained_vgg(cifar10_splits):
  """One real trained model shared by every real-data test of the session."""
  return TrainedVGG(cifar10_splits)
