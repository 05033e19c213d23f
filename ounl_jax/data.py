"""Datasets of the paper (CIFAR-10, CIFAR-100, STL-10) through TFDS, in memory.

Pixels are mapped to [-0.5, 0.5] as ``x / 255 - 0.5`` (docs/protocol.md §1), with no
mean/std normalisation and no augmentation. The paper's split (App. B): 80% of the
official train split trains the model, 20% validates it (stratified, seeded). STL-10
reports test accuracy on 1,000 seeded images of its 8,000 test images.

Prepared data is read with ``tfds.data_source`` from TFDS's ArrayRecord files: random
access, no TensorFlow. This is one of the two library modules that touch the
filesystem (the other is ``checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import json
import logging
import os
from typing import NamedTuple, Sequence

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# STL-10 in the order of its labels (docs/protocol.md §1).
STL10_CLASSES = (
    "airplane", "bird", "car", "cat", "deer",
    "dog", "horse", "monkey", "ship", "truck",
)
# CIFAR-100 fine labels, alphabetical (apple=0, orange=53, pear=57, sweet_pepper=83).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the library knows about one dataset of the paper.

  Attributes:
    name: the name users type (``cifar10``, ``cifar100``, ``stl10``).
    tfds_name: the TFDS builder name.
    image_shape: (H, W, C) of one image.
    class_names: class names in label order.
    learning_rate: Adam learning rate of the released code (docs/protocol.md §3:
      1e-3, but 1e-4 for CIFAR-100).
    test_subset: number of test images reported (STL-10: 1,000 of 8,000), or None.
    class_a: the paper's unlearned class (Sec. IV).
    class_b: the paper's blending class (Sec. V-A).
    target_class: the paper's targeted-pushing class (Tables V-VI).
  """

  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  learning_rate: float
  test_subset: int | None
  class_a: str
  class_b: str
  target_class: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


DATASETS = {
    "cifar10": DatasetSpec("cifar10", "cifar10", (32, 32, 3), CIFAR10_CLASSES,
                           1e-3, None, "airplane", "cat", "cat"),
    "cifar100": DatasetSpec("cifar100", "cifar100", (32, 32, 3), CIFAR100_CLASSES,
                            1e-4, None, "apple", "orange", "sweet_pepper"),
    "stl10": DatasetSpec("stl10", "stl10", (96, 96, 3), STL10_CLASSES,
                         1e-3, 1000, "airplane", "cat", "cat"),
}


class DataNotFoundError(FileNotFoundError):
  """The prepared TFDS data is not where we looked (and nothing is downloaded)."""


class LabelledImages(NamedTuple):
  """Images in [-0.5, 0.5] (float32, NHWC), int32 labels and int64 sample ids.

  ``ids`` index the official TFDS split the samples came from (for CIFAR, the number
  in TFDS's ``train_NNNNN`` id), so a training id names the same image in every run.
  """

  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, index) -> "LabelledImages":
    return LabelledImages(self.images[index], self.labels[index], self.ids[index])


class Splits(NamedTuple):
  """The paper's three splits (App. B)."""

  train: LabelledImages
  valid: LabelledImages
  test: LabelledImages


def get_spec(name: str) -> DatasetSpec:
  """The spec of a dataset by name; a clear error listing the choices otherwise."""
  key = name.lower().replace("-", "").replace("_", "")
  if key not in DATASETS:
    raise ValueError(
        f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)} "
        "(e.g. --dataset=cifar10).")
  return DATASETS[key]


def class_index(spec: DatasetSpec, name: str | int) -> int:
  """The label of a class given its name (``airplane``, ``sweet pepper``) or index.

  Raises:
    ValueError: naming the closest valid class names.
  """
  if isinstance(name, (int, np.integer)):
    if 0 <= int(name) < spec.num_classes:
      return int(name)
    raise ValueError(f"Class index {name} is out of range for {spec.name} "
                     f"(0..{spec.num_classes - 1}).")
  text = str(name).strip().lower().replace(" ", "_").replace("-", "_")
  if text.isdigit():
    return class_index(spec, int(text))
  if text in spec.class_names:
    return spec.class_names.index(text)
  close = difflib.get_close_matches(text, spec.class_names, n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  raise ValueError(
      f"Unknown class {name!r} for {spec.name}.{hint} Valid classes: "
      f"{', '.join(spec.class_names)}.")


def default_data_dir() -> str:
  """Where TFDS looks by default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def find_prepared(spec: DatasetSpec, data_dir: str) -> str | None:
  """The prepared version folder of ``spec`` under ``data_dir``, or None."""
  pattern = os.path.join(data_dir, spec.tfds_name, "*", "dataset_info.json")
  found = sorted(glob.glob(pattern))
  return os.path.dirname(found[-1]) if found else None


def require_prepared(spec: DatasetSpec, data_dir: str) -> str:
  """Fails at once (no download attempt, no retries) when the data is missing.

  Raises:
    DataNotFoundError: saying where we looked and how to provide the data.
  """
  folder = find_prepared(spec, data_dir)
  if folder is None:
    raise DataNotFoundError(
        f"No prepared TFDS '{spec.tfds_name}' found under {data_dir!r} "
        f"(looked for {os.path.join(data_dir, spec.tfds_name, '<version>', 'dataset_info.json')}). "
        "ounl_jax never downloads. Provide the data by either: pointing "
        "TFDS_DATA_DIR (or --data_dir) at a folder that holds it, e.g. "
        "TFDS_DATA_DIR=../shared/tensorflow_datasets; or, on a machine with "
        "network access and TensorFlow (pip install -e '.[prepare]'), running "
        f"`tfds build {spec.tfds_name} --file_format=array_record --data_dir=DIR` "
        "and copying DIR here.")
  check_array_record(folder)
  return folder


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels to [-0.5, 0.5] as ``x / 255 - 0.5`` (docs/protocol.md §1)."""
  return images_uint8.astype(np.float32) / 255.0 - 0.5


def _parse_ids(raw_ids: np.ndarray | None, count: int) -> np.ndarray:
  if raw_ids is None:
    return np.arange(count, dtype=np.int64)
  parsed = []
  for value in raw_ids:
    text = value.decode() if isinstance(value, bytes) else str(value)
    digits = "".join(ch for ch in text.rsplit("_", 1)[-1] if ch.isdigit())
    parsed.append(int(digits) if digits else -1)
  parsed = np.asarray(parsed, dtype=np.int64)
  if (parsed < 0).any() or len(np.unique(parsed)) != count:
    return np.arange(count, dtype=np.int64)  # Ids unusable (e.g. mock data).
  return parsed


class DataFormatError(ValueError):
  """The prepared folder exists but is not in a format ounl_jax reads."""


class DataCorruptError(RuntimeError):
  """A prepared data file could not be read (truncated or damaged)."""


def check_array_record(folder: str) -> None:
  """Refuses a folder prepared in TFDS's old TFRecord format, saying how to convert.

  ounl_jax reads with ``tfds.data_source``, which needs ArrayRecord files and no
  TensorFlow; ``tfds.load`` (TFRecord) would need TensorFlow.

  Raises:
    DataFormatError: naming the folder and the exact conversion command.
  """
  info_path = os.path.join(folder, "dataset_info.json")
  try:
    with open(info_path) as f:
      info = json.load(f)
    if not isinstance(info, dict):
      raise ValueError(f"a JSON {type(info).__name__}, not an object")
  except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError included
    raise DataCorruptError(
        f"{info_path} is not valid TFDS dataset information ({error}); it was "
        "cut short or edited. Copy the dataset folder again, or rebuild it "
        "(WORKSPACE.md, 'Preparing a dataset').") from error
  file_format = info.get("fileFormat", "tfrecord")
  if file_format == "array_record":
    return
  root = os.path.dirname(os.path.dirname(folder))
  raise DataFormatError(
      f"{folder} holds TFDS {file_format!r} files; ounl_jax reads ArrayRecord "
      "(tfds.data_source, no TensorFlow). Convert it once, on a machine with "
      "TensorFlow (pip install -e '.[prepare]'): `tfds convert_format "
      f"--dataset_version_dir={folder} --out_file_format=array_record "
      f"--out_dir=NEW_DIR/{os.path.relpath(folder, root)}`, or rebuild it with "
      "`tfds build NAME --file_format=array_record --data_dir=NEW_DIR`; then "
      "point TFDS_DATA_DIR at NEW_DIR.")


@contextlib.contextmanager
def _quiet_decoder_warning():
  """Hides TFDS's one-line advice to install OpenCV (PIL decodes these images)."""
  logger = logging.getLogger("absl")
  quiet = lambda record: "OpenCV is not installed" not in record.getMessage()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _read_records(source, start: int, stop: int) -> list[dict]:
  keys = list(range(start, stop))
  try:
    return source.__getitems__(keys)
  except TypeError:  # TFDS's mock data source reads one record at a time only.
    return [source[k] for k in keys]


def read_split(spec: DatasetSpec, split: str, data_dir: str,
               read_batch: int = 4096) -> LabelledImages:
  """Reads one official TFDS split into memory, sorted by sample id.

  Reads the prepared ArrayRecord files with ``tfds.data_source`` (random access,
  no TensorFlow); the order of the records on disk does not matter, since samples
  are sorted by their TFDS id.

  Raises:
    DataCorruptError: a record could not be read; names the folder and the fix.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with _quiet_decoder_warning():
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir,
                              download=False)
    images, labels, raw_ids = [], [], []
    for start in range(0, len(source), read_batch):
      try:
        records = _read_records(source, start, min(start + read_batch, len(source)))
      except Exception as error:  # pylint: disable=broad-except
        raise DataCorruptError(
            f"Could not read record {start}+ of {spec.tfds_name}/{split} under "
            f"{data_dir!r} ({type(error).__name__}: {error}). The prepared files "
            "are truncated or damaged: copy the folder again, or rebuild it "
            "(WORKSPACE.md, 'Preparing a dataset').") from error
      images.extend(r["image"] for r in records)
      labels.extend(r["label"] for r in records)
      raw_ids.extend(r["id"] for r in records if "id" in r)
  images = np.stack(images)
  labels = np.asarray(labels, dtype=np.int32)
  ids = _parse_ids(np.asarray(raw_ids) if len(raw_ids) == len(labels) else None,
                   len(labels))
  order = np.argsort(ids, kind="stable")
  return LabelledImages(to_unit_range(images[order]), labels[order], ids[order])


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (kept, held_out) with ``fraction`` of every class held out, seeded."""
  rng = np.random.default_rng(seed)
  kept, held = [], []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    members = rng.permutation(members)
    n_held = int(round(len(members) * fraction))
    held.append(members[:n_held])
    kept.append(members[n_held:])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def per_class_subset(labels: np.ndarray, per_class: int, seed: int,
                     num_classes: int) -> np.ndarray:
  """Sorted indices of at most ``per_class`` seeded samples of every class."""
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class]
            for c in range(num_classes)]
  return np.sort(np.concatenate(chosen))


def load(name: str, *, data_dir: str | None = None, seed: int = 0,
         valid_fraction: float = 0.2, max_train_per_class: int | None = None,
         max_test_per_class: int | None = None) -> Splits:
  """Loads a dataset with the paper's splits (App. B, docs/protocol.md §1).

  Args:
    name: ``cifar10``, ``cifar100`` or ``stl10``.
    data_dir: TFDS data folder; defaults to ``$TFDS_DATA_DIR``.
    seed: seeds the stratified train/validation split and any subsets.
    valid_fraction: fraction of the official train split used for validation.
    max_train_per_class: keep at most this many training samples per class
      (seeded) after the split, for reduced-scale runs. None keeps all.
    max_test_per_class: likewise for the test split.

  Returns:
    ``Splits(train, valid, test)``; STL-10's test split holds 1,000 seeded images.

  Raises:
    ValueError: unknown dataset.
    DataNotFoundError: the prepared data is not in ``data_dir`` (fails at once).
    DataFormatError: the folder holds TFRecord files (says how to convert).
  """
  spec = get_spec(name)
  data_dir = data_dir or default_data_dir()
  require_prepared(spec, data_dir)
  return split_official(spec, read_split(spec, "train", data_dir),
                        read_split(spec, "test", data_dir), seed=seed,
                        valid_fraction=valid_fraction,
                        max_train_per_class=max_train_per_class,
                        max_test_per_class=max_test_per_class)


def split_official(spec: DatasetSpec, official_train: LabelledImages,
                   official_test: LabelledImages, *, seed: int,
                   valid_fraction: float = 0.2,
                   max_train_per_class: int | None = None,
                   max_test_per_class: int | None = None) -> Splits:
  """The paper's splits from the official ones (App. B); pure, no I/O."""
  train_idx, valid_idx = stratified_split(
      official_train.labels, valid_fraction, seed, spec.num_classes)
  train = official_train.take(train_idx)
  valid = official_train.take(valid_idx)
  test = official_test
  if spec.test_subset is not None and len(test) > spec.test_subset:
    per_class = spec.test_subset // spec.num_classes
    test = test.take(per_class_subset(test.labels, per_class, seed + 1,
                                      spec.num_classes))
  if max_train_per_class is not None:
    train = train.take(per_class_subset(train.labels, max_train_per_class,
                                        seed + 2, spec.num_classes))
  if max_test_per_class is not None:
    test = test.take(per_class_subset(test.labels, max_test_per_class,
                                      seed + 3, spec.num_classes))
  return Splits(train, valid, test)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """How many samples each class has."""
  return np.bincount(np.asarray(labels), minlength=num_classes)


def select_unlearn_set(train: LabelledImages, class_a: int, fraction: float,
                       seed: int) -> LabelledImages:
  """A seeded ``fraction`` of class A's training samples (docs/protocol.md §4).

  The count is ``int(len(train) / num_classes_present * fraction)`` in the released
  code; with a balanced split this is ``fraction`` of the class (400 / 2,000 of the
  4,000 CIFAR-10 airplanes for 10% / 50%). The same ids are used for normal
  unlearning and for every attack, so the conditions are paired.
  """
  members = np.flatnonzero(train.labels == class_a)
  count = int(len(members) * fraction)
  if count < 1:
    raise ValueError(f"fraction={fraction} of {len(members)} class samples "
                     "selects no sample; use a larger fraction.")
  rng = np.random.default_rng(seed)
  chosen = np.sort(rng.choice(members, size=count, replace=False))
  return train.take(chosen)


def describe(splits: Splits) -> dict[str, int]:
  """Split sizes, for result files."""
  return {k: len(v) for k, v in splits._asdict().items()}


__all__: Sequence[str] = (
    "CIFAR10_CLASSES", "CIFAR100_CLASSES", "STL10_CLASSES", "DATASETS",
    "DataCorruptError", "DataFormatError", "DataNotFoundError", "DatasetSpec", "LabelledImages", "Splits",
    "class_counts", "class_index", "default_data_dir", "describe", "get_spec",
    "load", "require_prepared", "select_unlearn_set", "split_official",
    "stratified_split", "to_unit_range",
)
