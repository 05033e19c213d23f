"""Stealthiness of the pushed samples (paper App. D, Table XIII): SSIM and LPIPS.

``python -m experiments.stealthiness --workdir=DIR [--pushed=PATH.npz]
[--lpips_weights=PATH.npz] [--num_pairs=50] [--seed=0]``

Reads the pushed samples that ``python -m experiments.pushing --workdir=DIR`` saved in
``DIR/attack/pushed.npz`` (or ``--pushed``), draws up to ``--num_pairs`` seeded
successful (original, modified) pairs for each of Pushing-I and Pushing-II, and
measures SSIM (always) and LPIPS (only with ``--lpips_weights``, the official
LPIPS-alex weights converted as ``ounl_jax.stealthiness.load_lpips_weights``
explains; without them LPIPS is reported as null, never computed with random
weights). Writes ``DIR/stealthiness.json`` (values, config, the paper's numbers),
``DIR/stealthiness.md`` (Table XIII, paper beside measured) and
``DIR/stealthiness_examples.png`` (original / Pushing-I / Pushing-II and the
magnified differences). The last line printed is the path of stealthiness.json.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import matplotlib
import numpy as np

from experiments import common
from ounl_jax import stealthiness

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("pushed", None, "The pushed samples (.npz of experiments.pushing); "
                    "default WORKDIR/attack/pushed.npz.")
flags.DEFINE_string("lpips_weights", None,
                    "Pretrained LPIPS-alex weights (.npz; see "
                    "ounl_jax.stealthiness.load_lpips_weights). Without them LPIPS "
                    "is not reported.")
flags.DEFINE_integer("num_pairs", 50, "Pairs drawn per method (the paper: 50).")
flags.DEFINE_integer("seed", 0, "Seeds the choice of pairs.")
flags.DEFINE_string("workdir", "./runs/default",
                    "Folder holding attack/pushed.npz; results are written here.")

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
DIFFERENCE_GAIN = 10.0  # magnification of the differences in the figure
NUM_EXAMPLES = 4


def load_pushed(path: str) -> dict[str, np.ndarray]:
  """The arrays of a pushed.npz, checked; a clear error when absent or incomplete."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No pushed samples at {path}. Run `python -m experiments.pushing "
        f"--workdir=DIR` first (it writes DIR/attack/pushed.npz), then "
        f"`python -m experiments.stealthiness --workdir=DIR`, or pass --pushed=PATH.")
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in REQUIRED_KEYS if k not in npz.files]
    if missing:
      raise ValueError(f"{path} lacks the arrays {missing}; expected "
                       f"{list(REQUIRED_KEYS)} as written by experiments.pushing.")
    arrays = {k: npz[k] for k in npz.files}
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


def _cell(summary: dict | None, digits: int = 4) -> str:
  if not summary or summary.get("mean") is None:
    return "n/a"
  return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def markdown(results: dict) -> str:
  """Table XIII, paper beside measured."""
  lines = [
      "# Stealthiness of modified unlearning samples (Table XIII)", "",
      f"Pushed samples: `{results['pushed']}`; up to {results['config']['num_pairs']} "
      f"seeded successful pairs per method (seed {results['config']['seed']}). "
      "Paper: CIFAR-10, 50 pairs.", "",
      "| Method | SSIM (mean ± std), paper | SSIM, measured | "
      "LPIPS (mean ± std), paper | LPIPS, measured | pairs |",
      "|---|---|---|---|---|---|"]
  for method, (name, _, _) in METHODS.items():
    entry = results["methods"][method]
    paper = PAPER[method]
    lpips_cell = _cell(entry["lpips"]) if entry["lpips"] else "n/a (no weights)"
    if entry["ssim"] is None:
      lpips_cell = "n/a"
    lines.append(f"| {name} | {_cell(paper['ssim'])} | {_cell(entry['ssim'])} | "
                 f"{_cell(paper['lpips'])} | {lpips_cell} | "
                 f"{entry['pairs']} of {entry['successful']} successful |")
  lines += ["", results["ssim"]["description"], ""]
  if results["lpips"]["weights"] is None:
    lines.append(f"LPIPS not measured: {NO_LPIPS_WEIGHTS}. Convert the official "
                 "weights as `ounl_jax.stealthiness.load_lpips_weights` explains.")
  else:
    lines.append(results["lpips"]["description"])
  lines += ["", "Mean L2 perturbation of the drawn pairs (pixels in [-0.5, 0.5]): "
            + ", ".join(f"{METHODS[m][0]} {_cell(results['methods'][m].get('l2'), 3)}"
                        for m in METHODS), "",
            f"Examples: `{os.path.basename(results['files']['figure'])}`.", ""]
  return "\n".join(lines)


def plot_examples(arrays: dict[str, np.ndarray], path: str) -> str:
  """A few original / Pushing-I / Pushing-II triplets and magnified differences."""
  ok_i = set(successful_rows(arrays, "pushing_i").tolist())
  ok_ii = set(successful_rows(arrays, "pushing_ii").tolist())
  both = sorted(ok_i & ok_ii)
  rows = (both + sorted((ok_i | ok_ii) - set(both)))[:NUM_EXAMPLES]
  titles = ["original", "Pushing-I", "Pushing-II",
            f"P-I − original (×{DIFFERENCE_GAIN:g})",
            f"P-II − original (×{DIFFERENCE_GAIN:g})"]
  num_rows = max(len(rows), 1)
  fig, axes = plt.subplots(num_rows, len(titles),
                           figsize=(2.0 * len(titles), 2.0 * num_rows),
                           squeeze=False)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for column, title in enumerate(titles):
    axes[0, column].set_title(title, fontsize=8)
  if not rows:
    axes[0, 0].text(0.5, 0.5, "no successful pushes", ha="center", va="center",
                    fontsize=8, transform=axes[0, 0].transAxes)
  for r, row in enumerate(rows):
    original = arrays["original"][row]
    panels = [original + 0.5]
    pushed = {}
    for method, ok in (("pushing_i", ok_i), ("pushing_ii", ok_ii)):
      pushed[method] = arrays[METHODS[method][1]][row] if row in ok else None
      panels.append(None if pushed[method] is None else pushed[method] + 0.5)
    for method in ("pushing_i", "pushing_ii"):
      panels.append(None if pushed[method] is None else
                    0.5 + DIFFERENCE_GAIN * (pushed[method] - original))
    for column, panel in enumerate(panels):
      ax = axes[r, column]
      if panel is None:
        ax.text(0.5, 0.5, "failed", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
        continue
      image = np.clip(panel, 0.0, 1.0)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray" if image.shape[-1] == 1 else None,
                interpolation="nearest")
    axes[r, 0].set_ylabel(f"id {arrays['ids'][row]}", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def run(*, pushed: str, workdir: str, lpips_weights: str | None, num_pairs: int,
        seed: int) -> str:
  """Measures, writes json/md/png into ``workdir``; returns the json path."""
  arrays = load_pushed(pushed)
  lpips_params = (None if lpips_weights is None
                  else stealthiness.load_lpips_weights(lpips_weights))
  config = {"pushed": os.path.abspath(pushed), "workdir": os.path.abspath(workdir),
            "lpips_weights": (None if lpips_weights is None
                              else os.path.abspath(lpips_weights)),
            "num_pairs": num_pairs, "seed": seed}
  keys = dict(zip(METHODS, jax.random.split(jax.random.key(seed), len(METHODS))))
  methods = {m: measure(arrays, m, keys[m], num_pairs, lpips_params)
             for m in METHODS}
  os.makedirs(workdir, exist_ok=True)
  files = {"json": os.path.join(workdir, "stealthiness.json"),
           "markdown": os.path.join(workdir, "stealthiness.md"),
           "figure": os.path.join(workdir, "stealthiness_examples.png")}
  settings = stealthiness.SSIM_SETTINGS
  results = {
      "experiment": "stealthiness (paper App. D, Table XIII)",
      "pushed": config["pushed"],
      "fingerprint": (str(arrays["fingerprint"]) if "fingerprint" in arrays
                      else None),
      "config": config,
      "ssim": {"implementation": "dm_pix.ssim", **settings,
               "input_range": "images + 0.5, in [0, 1]",
               "description": (
                   "SSIM: dm_pix.ssim on images shifted to [0, 1] (max_val 1), "
                   f"Gaussian window {settings['filter_size']}, sigma "
                   f"{settings['filter_sigma']}, k1 {settings['k1']}, k2 "
                   f"{settings['k2']} (Wang et al. 2004), mean over valid "
                   "positions and channels.")},
      "lpips": {"weights": config["lpips_weights"], "backbone": "alex",
                "version": "0.1",
                "note": (NO_LPIPS_WEIGHTS if lpips_weights is None else
                         "pretrained weights from the file given; values are "
                         "LPIPS only if that file holds the official LPIPS-alex "
                         "weights"),
                "description": (
                    "LPIPS v0.1, AlexNet backbone (the lpips package's default), "
                    "inputs scaled to [-1, 1], "
                    + ("not measured." if lpips_weights is None else
                       f"weights from `{lpips_weights}`."))},
      "methods": methods,
      "paper": {"table": "XIII", "dataset": "cifar10", "pairs": 50, **PAPER},
      "files": files,
      "metadata": common.run_metadata(config),
  }
  plot_examples(arrays, files["figure"])
  with open(files["markdown"], "w") as f:
    f.write(markdown(results))
  return common.write_json(files["json"], results)


def main(argv):
  del argv
  common.quiet_logs()
  pushed = FLAGS.pushed or os.path.join(FLAGS.workdir, "attack", "pushed.npz")
  try:
    path = run(pushed=pushed, workdir=FLAGS.workdir,
               lpips_weights=FLAGS.lpips_weights, num_pairs=FLAGS.num_pairs,
               seed=FLAGS.seed)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  measured = common.read_json(path)["methods"]
  for method, (name, _, _) in METHODS.items():
    entry = measured[method]
    print(f"{name}: SSIM {_cell(entry['ssim'])}, LPIPS "
          f"{_cell(entry['lpips']) if entry['lpips'] else 'n/a'} "
          f"({entry['pairs']} pairs; paper SSIM {_cell(PAPER[method]['ssim'])}, "
          f"LPIPS {_cell(PAPER[method]['lpips'])})")
  print(path)


if __name__ == "__main__":
  app.run(main)
