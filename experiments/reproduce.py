"""Runs one table of the paper and compares it with the paper's numbers.

``python -m experiments.reproduce --table=IV --dataset=cifar10 --scale=cpu``

Every grid point runs in ``WORKDIR/table_<T>/<point>/`` (results.json, results.md,
figures, the saved push); points already there with the same configuration are
reused, and the server's model is trained once per architecture in ``WORKDIR`` (or
``WORKDIR/<model>`` for Tables VIII-IX). Writes ``WORKDIR/table_<T>/report.md`` with
the paper's numbers (PROTOCOL section 14) beside the measured ones; the last line
printed is its path.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags

from experiments import common
from experiments import pipeline
from experiments import reporting
from experiments import runner

FLAGS = common.FLAGS
flags.DEFINE_enum("table", "IV", ["III", "IV", "V", "VIII", "IX", "X", "XII"],
                  "Which table of the paper to reproduce.")

# The paper's numbers (PROTOCOL section 14), in percent.
PAPER = {
    "IV": {"cifar10": {0.1: (79.3, 73.5, 73.7), 0.5: (78.7, 66.4, 66.9)},
           "cifar100": {0.1: (51.1, 50.7, 50.7), 0.5: (49.7, 49.1, 49.2)},
           "stl10": {0.1: (56.6, 56.2, 49.7), 0.5: (50.2, 49.5, 32.8)}},
    "XII": {"cifar10": {0.1: (80.6, 79.8, 79.6), 0.5: (78.9, 75.9, 75.8)},
            "cifar100": {0.1: (51.3, 50.8, 51.0), 0.5: (51.3, 50.8, 50.7)},
            "stl10": {0.1: (58.3, 56.6, 56.9), 0.5: (56.8, 56.1, 56.0)}},
    # Table V: (airplane still correct, predicted cat) of 878 clean-correct.
    "V": {0.1: {"normal": (817, 2), "pushing_i": (509, 25), "pushing_ii": (538, 20)},
          0.5: {"normal": (708, 5), "pushing_i": (26, 378), "pushing_ii": (31, 247)}},
    "VIII": {"vgg3": (79.3, 73.6, 73.7), "resnet": (69.4, 66.9, 68.3)},
    "IX": {"vgg3": (79.3, 73.6, 73.7), "vgg4": (76.5, 72.7, 69.5),
           "vgg5": (73.3, 65.6, 65.7)},
    "X": {"bird": (76.2, 74.1, 73.7), "horse": (78.4, 75.6, 75.8),
          "ship": (77.5, 73.5, 72.9)},
    # Table III: cat-class accuracy drop of blending vs normal, by (fraction, ratio).
    "III": {(0.1, 0.3): 0.7, (0.1, 0.5): 1.4, (0.5, 0.3): 2.8, (0.5, 0.5): 8.1},
}

OVERALL = ("normal", "pushing_i", "pushing_ii")


def grid(table: str) -> list[tuple[str, str, dict]]:
  """(point name, experiment, AttackConfig overrides) of a table."""
  if table in ("IV", "XII"):
    method = "fine_tune" if table == "XII" else "first_order"
    return [(f"fraction_{f}", "pushing", {"fraction": f, "unlearning": method})
            for f in (0.1, 0.5)]
  if table == "V":
    return [(f"fraction_{f}_to_cat", "pushing", {"fraction": f, "target_class": "cat"})
            for f in (0.1, 0.5)]
  if table == "X":
    return [(c, "pushing", {"unlearn_class": c}) for c in ("bird", "horse", "ship")]
  if table in ("VIII", "IX"):
    return [("fraction_0.1", "pushing", {"fraction": 0.1})]
  if table == "III":
    return [(f"fraction_{f}_ratio_{r}", "blending", {"fraction": f, "blend_ratio": r})
            for f in (0.1, 0.5) for r in (0.3, 0.5)]
  raise ValueError(f"Unknown table {table!r}.")


def models_of(table: str) -> list[str]:
  return {"VIII": ["vgg3", "resnet"], "IX": ["vgg3", "vgg4", "vgg5"]}.get(
      table, [FLAGS.model])


def run_point(ctx, config, experiment: str, directory: str) -> dict:
  """Runs a grid point, or reuses its results.json if the config matches."""
  path = os.path.join(directory, "results.json")
  wanted = common.to_jsonable({"train": ctx.train_config.to_dict(),
                               "attack": config.to_dict()})
  if os.path.exists(path):
    saved = common.read_json(path)
    if saved.get("config") == wanted:
      return saved
  os.makedirs(directory, exist_ok=True)
  if experiment == "pushing":
    results = pipeline.run_pushing(ctx, config, directory,
                                   show_progress=FLAGS.progress)
  else:
    results = pipeline.run_blending(ctx, config)
  results = common.to_jsonable(pipeline.stamp(results, ctx.train_config, config))
  runner.write_results(results, directory)
  return results


def _pct(results: dict, condition: str, key: str = "overall_accuracy") -> float:
  return 100 * results["conditions"][condition][key]


def _row(label: str, paper, measured) -> str:
  cells = [label]
  for p, m in zip(paper, measured):
    cells.append(f"{p} | {m:.1f} | {m - p:+.1f}" if p is not None
                 else f"- | {m:.1f} | -")
  return "| " + " | ".join(cells) + " |"


def report(table: str, dataset: str, measured: dict) -> list[str]:
  """Markdown lines: paper beside measured, with the difference."""
  lines = [f"# Table {table} on {dataset}: paper vs measured", ""]
  if table in ("IV", "XII", "VIII", "IX", "X"):
    header = ("| Point | " + " | ".join(f"{c} paper | measured | diff"
                                        for c in OVERALL) + " |")
    lines += ["Overall test accuracy (%) after unlearning.", "", header,
              "|" + "---|" * (1 + 3 * len(OVERALL))]
    for point, results in measured.items():
      key = point
      if table in ("IV", "XII"):
        paper = PAPER[table].get(dataset, {}).get(results["config"]["attack"]["fraction"])
      elif table == "X":
        paper = PAPER["X"].get(point)
      else:
        paper = PAPER[table].get(point.split("/")[0])
      values = [_pct(results, c) for c in OVERALL]
      lines.append(_row(key, paper or (None,) * 3, values))
    lines += ["", "Class-A test accuracy (%): "
              + "; ".join(f"{p}: " + ", ".join(
                  f"{c} {_pct(r, c, 'class_a_accuracy'):.1f}"
                  for c in ("clean",) + OVERALL) for p, r in measured.items()), ""]
  elif table == "V":
    lines += ["Predictions on the airplane test samples the clean model got right: "
              "(still airplane, now cat); paper rows sum to 878.", "",
              "| Point | Condition | paper | measured (of total) |", "|---|---|---|---|"]
    for point, results in measured.items():
      fraction = results["config"]["attack"]["fraction"]
      for c in OVERALL:
        h = results["conditions"][c]["histogram"]
        paper = PAPER["V"].get(fraction, {}).get(c)
        lines.append(f"| {point} | {c} | {paper} | ({h[results['class_a']]}, "
                     f"{h.get('cat')}) of {results['conditions'][c]['histogram_total']} |")
  elif table == "III":
    lines += ["Drop of the class-B (cat) test accuracy, blending vs normal (points).",
              "", "| Point | paper | measured |", "|---|---|---|"]
    for point, results in measured.items():
      attack = results["config"]["attack"]
      paper = PAPER["III"].get((attack["fraction"], attack["blend_ratio"]))
      drop = (_pct(results, "normal", "class_b_accuracy")
              - _pct(results, "blending", "class_b_accuracy"))
      lines.append(f"| {point} | {paper} | {drop:.1f} |")
  lines += ["", "Measured at reduced scale unless --scale=paper: see README "
            "'What the cpu scale reproduces'. Data: "
            + ("CIFAR-10 (JPEG-q75 copy)." if dataset == "cifar10" else dataset + "."),
            ""]
  return lines


def main(argv):
  del argv
  common.quiet_logs()
  table = FLAGS.table
  base = pipeline.attack_config_from_flags()
  root = os.path.join(FLAGS.workdir, f"table_{table}")
  measured = {}
  for model in models_of(table):
    train_config = dataclasses.replace(common.train_config_from_flags(), model=model)
    model_dir = (FLAGS.workdir if len(models_of(table)) == 1
                 else os.path.join(FLAGS.workdir, model))
    ctx = pipeline.prepare(train_config, model_dir, data_dir=FLAGS.data_dir,
                           show_progress=FLAGS.progress)
    for point, experiment, overrides in common.progress(
        grid(table), desc=f"table {table} ({model})", enabled=FLAGS.progress):
      name = point if len(models_of(table)) == 1 else f"{model}/{point}"
      config = dataclasses.replace(base, **overrides)
      measured[model if table in ("VIII", "IX") else name] = run_point(
          ctx, config, experiment, os.path.join(root, name))
  lines = report(table, FLAGS.dataset, measured)
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  print(path)


if __name__ == "__main__":
  app.run(main)
