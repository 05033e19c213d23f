"""Runs one table of the paper and compares it with the paper's numbers.

``python -m experiments.reproduce --table=IV --dataset=cifar10 --scale=cpu``

Tables III-XII and the sweeps of Fig. 5, 8 and 10 (``experiments/reports/paper_tables.py``
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
import fnmatch
import os

from absl import flags

from experiments.setup import cli
from experiments.run import errors
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from experiments.setup import overrides
from experiments.reports import paper_tables
from experiments.run import pipeline
from experiments.reports import run_report
from experiments.run import runner
from experiments.setup import validation


def define_flags(fv, *, table: str = "IV") -> None:
  """The experiments' flags and ``--table`` (entry modules only)."""
  cli.define_experiment_flags(fv)
  flags.DEFINE_enum("table", table, list(paper_tables.TABLES),
                    "Which table (or figure: fig5, fig8, fig10) of the paper to "
                    "reproduce.", flag_values=fv)
  flags.DEFINE_list("points", None, "Run only the grid points whose names match one "
                    "of these shell patterns (e.g. 'fraction_0.1*'); the report "
                    "then covers those points. Default: every point.",
                    flag_values=fv)


def grid(table: str, points=None) -> list[tuple[str, dict]]:
  """The table's grid points, or those matching ``points`` (shell patterns)."""
  everything = paper_tables.TABLES[table].grid()
  if not points:
    return everything
  chosen = [(name, o) for name, o in everything
            if any(fnmatch.fnmatch(name, p) for p in points)]
  if not chosen:
    raise errors.UserError(
        f"--points={','.join(points)} matches no point of table {table}; its "
        f"points are {', '.join(name for name, _ in everything)}.")
  return chosen


def run_point(ctx: pipeline.Context, config: configs.ExperimentConfig,
              directory: str, model_dir: str, show_progress: bool) -> dict:
  """Runs a grid point, or reuses its results.json if the config matches.

  Pushes are cached in ``model_dir``, so points (and tables) that push the same
  samples with the same settings share one push.
  """
  path = os.path.join(directory, "results.json")
  if os.path.exists(path):
    saved = records.read_json(path)
    if saved.get("config") == records.to_jsonable(config.to_dict()):
      return saved
  os.makedirs(directory, exist_ok=True)
  results = runner.run_experiment(ctx, config, model_dir,
                                  show_progress=show_progress)
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


def check(table: str, base: configs.ExperimentConfig, workdir: str,
          points=None) -> None:
  """Every grid point's settings, before any model is trained."""
  wanted = paper_tables.TABLES[table].dataset
  if wanted is not None and base.train.dataset != wanted:
    raise errors.UserError(f"--table={table} is the paper's {wanted} table; run "
                           f"it with --dataset={wanted}.")
  for _, changes in grid(table, points):
    validation.check_experiment(overrides.override(base, **changes))
  validation.check_workdir(workdir)


def measure(table: str, base: configs.ExperimentConfig, workdir: str, *,
            data_dir: str | None, show_progress: bool, points=None) -> dict:
  """Every grid point of ``table``, one trained model per architecture."""
  spec = paper_tables.TABLES[table]
  models = spec.models or (base.train.model,)
  root = os.path.join(workdir, f"table_{table}")
  measured = {}
  for model in models:
    train_config = dataclasses.replace(base.train, model=model)
    model_dir = workdir if len(models) == 1 else os.path.join(workdir, model)
    ctx = pipeline.prepare(train_config, model_dir, data_dir=data_dir,
                           show_progress=show_progress)
    for point, changes in progress.progress(
        grid(table, points), desc=f"table {table} ({model})",
        enabled=show_progress):
      name = point if len(models) == 1 else f"{model}/{point}"
      config = overrides.override(base, model=model, **changes)
      measured[model if spec.models else name] = run_point(
          ctx, config, os.path.join(root, name), model_dir, show_progress)
  return measured


def run(table: str, base: configs.ExperimentConfig, workdir: str, *,
        data_dir: str | None = None, show_progress: bool = True,
        points=None) -> str:
  """Runs (or reuses) the table's grid; writes and returns ``report.md``'s path."""
  progress.quiet_logs()
  check(table, base, workdir, points)
  measured = measure(table, base, workdir, data_dir=data_dir,
                     show_progress=show_progress, points=points)
  root = os.path.join(workdir, f"table_{table}")
  lines = report(table, base.train.dataset, measured)
  os.makedirs(root, exist_ok=True)
  if table in ("fig8", "fig10"):
    run_report.sweep_figure(measured, os.path.join(root, f"{table}.png"))
    lines += [f"![{table}]({table}.png)", ""]
  path = os.path.join(root, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv, fv=flags.FLAGS):
  del argv
  path = run(fv.table, cli.experiment_config(fv), fv.workdir, data_dir=fv.data_dir,
             show_progress=fv.progress, points=fv.points)
  with open(path) as f:
    print(f.read())
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)
