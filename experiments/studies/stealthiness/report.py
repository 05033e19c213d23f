"""The stealthiness experiment's report: Table XIII and the example figure."""

from __future__ import annotations

import os

import numpy as np

from experiments.studies.stealthiness import measure as data
from experiments.reports import figures


DIFFERENCE_GAIN = 10.0  # magnification of the differences in the figure
NUM_EXAMPLES = 4
METHODS = data.METHODS
PAPER = data.PAPER
NO_LPIPS_WEIGHTS = data.NO_LPIPS_WEIGHTS
successful_rows = data.successful_rows


def cell(summary: dict | None, digits: int = 4) -> str:
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
    lpips_cell = cell(entry["lpips"]) if entry["lpips"] else "n/a (no weights)"
    if entry["ssim"] is None:
      lpips_cell = "n/a"
    lines.append(f"| {name} | {cell(paper['ssim'])} | {cell(entry['ssim'])} | "
                 f"{cell(paper['lpips'])} | {lpips_cell} | "
                 f"{entry['pairs']} of {entry['successful']} successful |")
  lines += ["", results["ssim"]["description"], ""]
  if results["lpips"]["weights"] is None:
    lines.append(f"LPIPS not measured: {NO_LPIPS_WEIGHTS}. Convert the official "
                 "weights as `ounl_jax.stealthiness.load_lpips_weights` explains.")
  else:
    lines.append(results["lpips"]["description"])
  lines += ["", "Mean L2 perturbation of the drawn pairs (pixels in [-0.5, 0.5]): "
            + ", ".join(f"{METHODS[m][0]} {cell(results['methods'][m].get('l2'), 3)}"
                        for m in METHODS), "",
            f"Examples: `{os.path.basename(results['files']['figure'])}`.", ""]
  return "\n".join(lines)


def plot_examples(arrays: dict[str, np.ndarray], path: str) -> str:
  """A few original / Pushing-I / Pushing-II triplets and magnified differences."""
  plt = figures.pyplot()
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
