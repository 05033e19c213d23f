"""Data loading: mock TFDS for every dataset, the real CIFAR-10 copy when present."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ounl_jax import data as data_lib
from tests.conftest import mock_prepared_folder
from tests.conftest import real_data_dir


@pytest.fixture
def mock_prepared(monkeypatch, tmp_path):
  """Mock TFDS examples; pretend the prepared folder exists (mock_data needs none)."""
  folder = mock_prepared_folder(tmp_path)
  monkeypatch.setattr(data_lib, "find_prepared", lambda spec, d: folder)
  return folder


@pytest.mark.parametrize("name,shape,classes,train_n,test_n", [
    ("cifar10", (32, 32, 3), 10, 200, 100),
    ("cifar100", (32, 32, 3), 100, 500, 200),
    ("stl10", (96, 96, 3), 10, 100, 1200),
])
def test_mock_loader_shapes_ranges_and_split(mock_prepared, name, shape, classes,
                                             train_n, test_n):
  spec = data_lib.get_spec(name)
  with tfds.testing.mock_data(num_examples=max(train_n, test_n)):
    splits = data_lib.load(name, data_dir=mock_prepared, seed=3)
  total = len(splits.train) + len(splits.valid)
  assert total == max(train_n, test_n)
  for split in splits:
    assert split.images.shape[1:] == shape == spec.image_shape
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.min() >= -0.5 and split.images.max() <= 0.5
    assert split.labels.min() >= 0 and split.labels.max() < classes
  # 20% of every class is held out for validation (rounded per class).
  counts = data_lib.class_counts(np.concatenate([splits.train.labels,
                                                 splits.valid.labels]), classes)
  valid_counts = data_lib.class_counts(splits.valid.labels, classes)
  np.testing.assert_array_equal(valid_counts, np.round(counts * 0.2).astype(int))
  assert not set(splits.train.ids) & set(splits.valid.ids)
  if name == "stl10":
    assert len(splits.test) <= 1000  # 1,000 of the 8,000 test images.


def test_split_is_deterministic_under_seed_and_changes_with_it(mock_prepared):
  with tfds.testing.mock_data(num_examples=300):
    a = data_lib.load("cifar10", data_dir=mock_prepared, seed=1)
    b = data_lib.load("cifar10", data_dir=mock_prepared, seed=1)
    c = data_lib.load("cifar10", data_dir=mock_prepared, seed=2)
  np.testing.assert_array_equal(a.valid.ids, b.valid.ids)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert not np.array_equal(a.valid.ids, c.valid.ids)


def test_stl10_reports_1000_stratified_test_images():
  spec = data_lib.get_spec("stl10")
  labels = np.repeat(np.arange(10), 800).astype(np.int32)
  official = data_lib.LabelledImages(np.zeros((8000, 1, 1, 1), np.float32), labels,
                                     np.arange(8000))
  train = data_lib.LabelledImages(np.zeros((5000, 1, 1, 1), np.float32),
                                  np.repeat(np.arange(10), 500).astype(np.int32),
                                  np.arange(5000))
  splits = data_lib.split_official(spec, train, official, seed=0)
  assert len(splits.test) == 1000
  np.testing.assert_array_equal(data_lib.class_counts(splits.test.labels, 10),
                                [100] * 10)
  assert (len(splits.train), len(splits.valid)) == (4000, 1000)


def test_class_names_and_indices():
  assert data_lib.class_index(data_lib.get_spec("cifar10"), "airplane") == 0
  assert data_lib.class_index(data_lib.get_spec("cifar10"), "Cat") == 3
  c100 = data_lib.get_spec("cifar100")
  assert [data_lib.class_index(c100, n) for n in
          ("apple", "orange", "pear", "sweet pepper", "trout")] == [0, 53, 57, 83, 91]
  assert data_lib.class_index(data_lib.get_spec("stl10"), "monkey") == 7
  assert data_lib.class_index(data_lib.get_spec("cifar10"), "9") == 9


@pytest.mark.realdata
def test_cifar10_class_names_match_the_prepared_metadata():
  data_dir = real_data_dir()
  if data_dir is None:
    pytest.skip("Real CIFAR-10 not found (set TFDS_DATA_DIR).")
  spec = data_lib.get_spec("cifar10")
  with open(os.path.join(data_lib.find_prepared(spec, data_dir),
                         "label.labels.txt")) as f:
    assert tuple(f.read().split()) == spec.class_names


def test_unknown_dataset_and_class_name_the_fix():
  with pytest.raises(ValueError, match="cifar10, cifar100, stl10"):
    data_lib.get_spec("mnist")
  with pytest.raises(ValueError, match="Did you mean airplane"):
    data_lib.class_index(data_lib.get_spec("cifar10"), "airplan")
  with pytest.raises(ValueError, match="out of range"):
    data_lib.class_index(data_lib.get_spec("cifar10"), 10)


def test_missing_data_fails_at_once_and_says_how_to_fix(tmp_path):
  import time
  started = time.time()
  with pytest.raises(data_lib.DataNotFoundError) as error:
    data_lib.load("cifar100", data_dir=str(tmp_path))
  assert time.time() - started < 5
  message = str(error.value)
  assert str(tmp_path) in message and "TFDS_DATA_DIR" in message


def test_unlearn_set_is_a_seeded_fraction_of_the_class():
  labels = np.repeat(np.arange(10), 100).astype(np.int32)
  train = data_lib.LabelledImages(np.zeros((1000, 2, 2, 3), np.float32), labels,
                                  np.arange(1000) * 7)
  chosen = data_lib.select_unlearn_set(train, 3, 0.1, seed=88)
  again = data_lib.select_unlearn_set(train, 3, 0.1, seed=88)
  assert len(chosen) == 10 and (chosen.labels == 3).all()
  np.testing.assert_array_equal(chosen.ids, again.ids)
  with pytest.raises(ValueError, match="selects no sample"):
    data_lib.select_unlearn_set(train, 3, 0.001, seed=0)


@pytest.mark.realdata
def test_real_cifar10_copy_splits(cifar10_splits):
  splits = cifar10_splits
  n = len(splits.train) + len(splits.valid)
  assert len(splits.valid) == pytest.approx(0.2 * n, abs=10)
  assert len(splits.test) in (3000, 10000)
  # Sample ids are the TFDS train ids: unique, and disjoint between splits.
  assert len(np.unique(splits.train.ids)) == len(splits.train)
  assert not set(splits.train.ids) & set(splits.valid.ids)
  means = splits.train.images.mean(axis=(0, 1, 2)) + 0.5
  np.testing.assert_allclose(means, [0.491, 0.482, 0.447], atol=0.01)


def test_tfrecord_folder_is_refused_with_the_conversion_command(tmp_path):
  folder = tmp_path / "cifar10" / "3.0.2"
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text('{"name": "cifar10"}')  # TFRecord.
  with pytest.raises(data_lib.DataFormatError) as error:
    data_lib.load("cifar10", data_dir=str(tmp_path))
  message = str(error.value)
  assert "tfds convert_format" in message and str(folder) in message
  assert "--out_file_format=array_record" in message


@pytest.mark.realdata
def test_truncated_record_file_names_the_folder_and_the_fix(tmp_path):
  data_dir = real_data_dir()
  if data_dir is None:
    pytest.skip("Real CIFAR-10 not found (set TFDS_DATA_DIR).")
  source = data_lib.find_prepared(data_lib.get_spec("cifar10"), data_dir)
  copy = tmp_path / "cifar10" / os.path.basename(source)
  copy.mkdir(parents=True)
  for name in os.listdir(source):
    data = open(os.path.join(source, name), "rb").read()
    if name.startswith("cifar10-test.array_record"):
      data = data[:len(data) // 2]  # Truncated mid-file.
    (copy / name).write_bytes(data)
  with pytest.raises((data_lib.DataCorruptError)) as error:
    data_lib.read_split(data_lib.get_spec("cifar10"), "test", str(tmp_path))
  assert str(tmp_path) in str(error.value) and "copy the folder again" in str(error.value)

