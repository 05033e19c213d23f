"""The data a workdir was made with: recorded once, other data refused later."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from experiments.run import errors
from experiments.run import records
from experiments.setup import configs
from ounl_jax import data as data_lib


def data_fingerprint(splits: data_lib.Splits) -> str:
  """A content hash of the data a model is trained and evaluated on."""
  digest = hashlib.sha256()
  for split in splits:
    for array in split:
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def check_data_identity(workdir: str, config: configs.TrainConfig,
                        splits: data_lib.Splits) -> None:
  """Records the data a workdir was made with; refuses other data later.

  A workdir's model, pushes and results depend on the exact images: rerunning it
  on another copy of the data (another TFDS_DATA_DIR) would mix the two.
  """
  path = os.path.join(workdir, "data_fingerprint.json")
  found = {"dataset": config.dataset, "fingerprint": data_fingerprint(splits),
           "splits": data_lib.describe(splits)}
  # The fix for a damaged or missing fingerprint must not disarm the guard:
  # without the model there is nothing left to guard.
  fresh_start = (f"Use another --workdir, or delete the model too (checkpoints/, "
                 f"train_metrics.json and train_history.json in {workdir}) to "
                 "train again here.")
  if os.path.exists(path):
    saved = records.read_json(
        path, advice="The data this workdir's model was trained on can no longer "
        "be checked. " + fresh_start)
    if saved != records.to_jsonable(found):
      raise errors.UserError(
          f"{workdir} was made with other {config.dataset} data ({saved}) than "
          f"this run reads ({found}): TFDS_DATA_DIR or --data_dir points at "
          "another copy. Use another --workdir, or the data it was made with.")
  else:
    model = [name for name in ("train_metrics.json", "train_history.json",
                               "checkpoints")
             if os.path.exists(os.path.join(workdir, name))]
    if model:
      raise errors.UserError(
          f"{workdir} holds a model ({', '.join(model)}) but no "
          "data_fingerprint.json, so this run cannot tell whether that model was "
          f"trained on the data it reads ({config.dataset}, "
          f"{found['splits']}). {fresh_start}")
    records.write_json(path, found)
