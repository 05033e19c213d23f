"""The stealthiness experiment's data: the pushed pairs and their SSIM / LPIPS."""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from ounl_jax import stealthiness

METHODS = {"pushing_i": ("Pushing-I", "pushing_i", "pushing_i_success"),
           "pushing_ii": ("Pushing-II", "pushing_ii", "pushing_ii_success")}
REQUIRED_KEYS = ("original", "pushing_i", "pushing_ii", "pushing_i_success", "pushing_ii_success",
                 "ids")

# Table XIII (CIFAR-10, 50 pairs, mean +- std).
PAPER = {
    "pushing_i": {"ssim": {"mean": 0.9748, "std": 0.0013},
                  "lpips": {"mean": 0.0339, "std": 0.0015}},
    "pushing_ii": {"ssim": {"mean": 0.9691, "std": 0.0026},
                   "lpips": {"mean": 0.0374, "std": 0.0025}},
}
NO_LPIPS_WEIGHTS = "no pretrained LPIPS weights given (--lpips_weights)"

def load_pushed(path: str) -> dict[str, np.ndarray]:
  """The arrays of a pushed.npz, checked; a clear error when absent or incomplete."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No pushed samples at {path}. Run `python -m experiments.pushing "
        f"--workdir=DIR` first (it writes DIR/attack/pushed.npz), then "
        f"`python -m experiments.stealthiness --workdir=DIR`, or pass --pushed=PATH.")
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in REQUIRED_KEYS if k not in npz.files]
      if missing:
        raise ValueError(f"{path} lacks the arrays {missing}; expected "
                         f"{list(REQUIRED_KEYS)} as written by "
                         "experiments.pushing.")
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
    raise ValueError(
        f"{path} is not a readable .npz ({type(error).__name__}: {error}); it was "
        "cut short or damaged. Rerun `python -m experiments.pushing "
        "--workdir=DIR` to write it again.") from error
  except ValueError as error:
    if str(path) in str(error):
      raise
    raise ValueError(f"{path} is not a readable .npz ({error}); it was cut short "
                     "or damaged. Rerun `python -m experiments.pushing "
                     "--workdir=DIR` to write it again.") from error
  shape = arrays["original"].shape
  if len(shape) != 4:
    raise ValueError(f"{path}: 'original' must be (N, H, W, C), got {shape}.")
  for name, (_, images_key, success_key) in METHODS.items():
    if arrays[images_key].shape != shape or arrays[success_key].shape != shape[:1]:
      raise ValueError(f"{path}: {name} arrays have shapes "
                       f"{arrays[images_key].shape} / {arrays[success_key].shape}, "
                       f"expected {shape} / {shape[:1]}.")
  return arrays


def successful_rows(arrays: dict[str, np.ndarray], method: str) -> np.ndarray:
  """Rows the method pushed successfully (and whose images are finite)."""
  _, images_key, success_key = METHODS[method]
  finite = np.all(np.isfinite(arrays[images_key]), axis=(1, 2, 3))
  return np.flatnonzero(arrays[success_key].astype(bool) & finite)


def measure(arrays, method, key, num_pairs, lpips_params) -> dict:
  """SSIM (and LPIPS) over up to ``num_pairs`` seeded successful pairs."""
  _, images_key, _ = METHODS[method]
  rows = successful_rows(arrays, method)
  rows = rows[stealthiness.sample_pairs(key, len(rows), num_pairs)]
  original = arrays["original"][rows].astype(np.float32)
  modified = arrays[images_key][rows].astype(np.float32)
  entry = {"successful": int(len(successful_rows(arrays, method))),
           "pairs": int(len(rows)), "rows": rows, "ids": arrays["ids"][rows]}
  if not len(rows):
    entry.update(ssim=None, lpips=None,
                 note=f"no successful {METHODS[method][0]} samples to compare")
    return entry
  ssim_values = np.asarray(stealthiness.ssim(original, modified))
  l2 = np.sqrt(np.sum((modified - original)**2, axis=(1, 2, 3)))
  entry.update(ssim=stealthiness.summarize(ssim_values), ssim_values=ssim_values,
               l2=stealthiness.summarize(l2))
  if lpips_params is None:
    entry.update(lpips=None, lpips_note=NO_LPIPS_WEIGHTS)
  else:
    lpips_values = np.asarray(stealthiness.lpips(lpips_params, original, modified))
    entry.update(lpips=stealthiness.summarize(lpips_values),
                 lpips_values=lpips_values)
  return entry
