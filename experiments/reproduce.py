"""Runs one table of the paper and compares it with the paper's numbers.

``python -m experiments.reproduce --table=IV --dataset=cifar10 --scale=cpu``

Tables III-XII and the sweeps of Fig. 5, 8 and 10 (``experiments/paper_tables.py``
holds each grid and the paper's numbers). Table IV runs Eq. 13 as written and the
released code's noise regime side by side.

Every grid point runs in ``WORKDIR/table_<T>/<point>/`` (results.json, results.md,
figures); pushes are saved once in the model's workdir and shared; points already there with the same configuration are
reused, and the server's model is trained once per architecture in ``WORKDIR`` (or
``WORKDIR/<model>`` for Tables VIII-IX). Writes ``WORKDIR/table_<T>/report.md`` with
the paper's numbers (docs/protocol.md §14) beside the measured ones; the last line
printed is its path.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from experiments import common
from experiments import paper_tables
from experiments import pipeline
from experiments import reporting
from experiments import runner
from experiments import validation

FLAGS = common.FLAGS
flags.DEFINE_enum("table", "IV", list(paper_tables.TABLES),
                  "Which table (or figure: fig5, fig8, fig10) of the paper to "
                  "reproduce.")


def run_point(ctx, config, experiment: str, directory: str, model_dir: str) -> dict:
  """Runs a grid point, or reuses its results.json if the config matches.

  Pushes are cached in ``model_dir``, so points (and tables) that push the same
  samples with the same settings share one push.
  """
  path = os.path.join(directory, "results.json")
  wanted = common.to_jsonable({"train": ctx.train_config.to_dict(),
                               "attack": config.to_dict()})
  if os.path.exists(path):
    saved = common.read_json(path)
    if saved.get("config") == wanted:
      return saved
  os.makedirs(directory, exist_ok=True)
  if experiment == "pushing":
    results = pipeline.run_pushing(ctx, config, model_dir,
                                   show_progress=FLAGS.progress)
  else:
    results = pipeline.run_blending(ctx, config)
  results = common.to_jsonable(pipeline.stamp(results, ctx.train_config, config))
  runner.write_results(results, directory)
  return results


def report(table: str, dataset: str, measured: dict) -> list[str]:
  """Markdown lines: paper beside measured, with the difference."""
  lines = [f"# Table {table} on {dataset}: paper vs measured", ""]
  lines += paper_tables.TABLES[table].report(dataset, measured)
  commands = sorted({r["command"] for r in measured.values() if "command" in r})
  lines += ["", "Measured at reduced scale unless --scale=paper: see README "
            "'What the cpu scale reproduces'. Data: "
            + ("CIFAR-10 (JPEG-q75 copy)." if dataset == "cifar10" else dataset + "."),
            "", "Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
  return lines


def check_flags(table: str, base) -> None:
  """Every grid point's flags, before any model is trained."""
  wanted = paper_tables.TABLES[table].dataset
  if wanted is not None and FLAGS.dataset != wanted:
    raise common.UserError(f"--table={table} is the paper's {wanted} table; run "
                           f"it with --dataset={wanted}.")
  spec = validation.check_train(common.train_config_from_flags())
  for _, _, overrides in paper_tables.TABLES[table].grid():
    validation.check_attack(spec, dataclasses.replace(base, **overrides))
  validation.check_workdir(FLAGS.workdir)


def main(argv):
  del argv
  common.quiet_logs()
  table = FLAGS.table
  spec = paper_tables.TABLES[table]
  base = pipeline.attack_config_from_flags()
  check_flags(table, base)
  root = os.path.join(FLAGS.workdir, f"table_{table}")
  models = spec.models or (FLAGS.model,)
  measured = {}
  for model in models:
    train_config = dataclasses.replace(common.train_config_from_flags(), model=model)
    model_dir = FLAGS.workdir if len(models) == 1 else os.path.join(FLAGS.workdir,
                                                                   model)
    ctx = pipeline.prepare(train_config, model_dir, data_dir=FLAGS.data_dir,
                           show_progress=FLAGS.progress)
    for point, experiment, overrides in common.progress(
        spec.grid(), desc=f"table {table} ({model})", enabled=FLAGS.progress):
      name = point if len(models) == 1 else f"{model}/{point}"
      config = dataclasses.replace(base, **overrides)
      measured[model if spec.models else name] = run_point(
          ctx, config, experiment, os.path.join(root, name), model_dir)
  lines = report(table, FLAGS.dataset, measured)
  os.makedirs(root, exist_ok=True)
  if table in ("fig8", "fig10"):
    reporting.sweep_figure(measured, os.path.join(root, f"{table}.png"))
    lines += [f"![{table}]({table}.png)", ""]
  path = os.path.join(root, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  print(path)


if __name__ == "__main__":
  common.run_main(main)
