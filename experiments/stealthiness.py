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

import dataclasses
import os

from absl import flags
import jax

from experiments.run import errors
from experiments.run import progress
from experiments.run import records
from experiments.setup import cli
from experiments.studies.stealthiness import measure as data
from experiments.studies.stealthiness import report
from ounl_jax import stealthiness

METHODS, PAPER, NO_LPIPS_WEIGHTS = data.METHODS, data.PAPER, data.NO_LPIPS_WEIGHTS


@dataclasses.dataclass(frozen=True)
class StealthinessConfig:
  """This experiment's config (Table XIII: 50 pairs per method).

  Attributes:
    pushed: the pushed samples (.npz of experiments.pushing); None:
      WORKDIR/attack/pushed.npz.
    lpips_weights: pretrained LPIPS-alex weights (.npz; see
      ounl_jax.stealthiness.load_lpips_weights). Without them LPIPS is not
      reported.
    num_pairs: pairs drawn per method (the paper: 50).
    seed: seeds the choice of pairs.
  """

  pushed: str | None = None
  lpips_weights: str | None = None
  num_pairs: int = 50
  seed: int = 0

  def __post_init__(self):
    if self.num_pairs < 1:
      raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}.")


def define_flags(fv) -> None:
  """This script's flags (entry module only): the config's fields, the workdir."""
  cli.define_dataclass_flags(fv, StealthinessConfig())
  flags.DEFINE_string("workdir", "./runs/default", "Folder holding "
                      "attack/pushed.npz; results are written here.",
                      flag_values=fv)
  flags.DEFINE_bool("debug", False, "Show the full traceback of a user error "
                    "instead of its one-line message.", flag_values=fv)


def run(config: StealthinessConfig, workdir: str) -> str:
  """Measures, writes json/md/png into ``workdir``; returns the json path."""
  pushed = config.pushed or os.path.join(workdir, "attack", "pushed.npz")
  lpips_weights, num_pairs, seed = (config.lpips_weights, config.num_pairs,
                                    config.seed)
  arrays = data.load_pushed(pushed)
  lpips_params = (None if lpips_weights is None
                  else stealthiness.load_lpips_weights(lpips_weights))
  config = {"pushed": os.path.abspath(pushed), "workdir": os.path.abspath(workdir),
            "lpips_weights": (None if lpips_weights is None
                              else os.path.abspath(lpips_weights)),
            "num_pairs": num_pairs, "seed": seed}
  keys = dict(zip(METHODS, jax.random.split(jax.random.key(seed), len(METHODS))))
  methods = {m: data.measure(arrays, m, keys[m], num_pairs, lpips_params)
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
      "metadata": records.run_metadata(config),
  }
  report.plot_examples(arrays, files["figure"])
  with open(files["markdown"], "w") as f:
    f.write(report.markdown(results))
  return records.write_json(files["json"], results)


def main(argv, fv=flags.FLAGS):
  del argv
  progress.quiet_logs()
  config = cli.dataclass_from_flags(fv, StealthinessConfig)
  try:
    path = run(config, fv.workdir)
  except (FileNotFoundError, ValueError) as error:
    raise errors.UserError(str(error)) from None
  measured = records.read_json(path)["methods"]
  for method, (name, _, _) in METHODS.items():
    entry = measured[method]
    print(f"{name}: SSIM {report.cell(entry['ssim'])}, LPIPS "
          f"{report.cell(entry['lpips']) if entry['lpips'] else 'n/a'} "
          f"({entry['pairs']} pairs; paper SSIM {report.cell(PAPER[method]['ssim'])}, "
          f"LPIPS {report.cell(PAPER[method]['lpips'])})")
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)
