"""Runs one table of the paper and compares it with the paper's numbers.

``python -m experiments.reproduce --table=IV --dataset=cifar10 --scale=cpu``

Tables III-XII and the sweeps of Fig. 5, 8 and 10 (``experiments/reports/paper_tables.py``
holds each grid and the paper's numbers). Table IV runs Eq. 13 as written and the
released code's noise regime side by side.

The grid runs as stages (``experiments/run/grid.py``): the server's model is trained
once per architecture in ``WORKDIR`` (or ``WORKDIR/<model>`` for Tables VIII-IX),
a push shared by points is pushed once, block by block, into the model's workdir,
and every grid point runs in ``WORKDIR/table_<T>/<point>/`` (results.json,
results.md, figures). ``--engine=local`` runs the stages one after another here;
``--engine=ray`` runs them as Ray tasks, on this machine or a cluster
(``experiments/run/engines.py``), with the same results. Finished stages are
reused, so a rerun after an interruption does only what is missing. Writes ``WORKDIR/table_<T>/report.md`` with
the paper's numbers (docs/protocol.md §14) beside the measured ones; the last line
printed is its path.
"""

from __future__ import annotations

import fnmatch
import os
import sys

from absl import flags

from experiments.setup import cli
from experiments.run import engines
from experiments.run import errors
from experiments.run import grid as grid_lib
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from experiments.setup import overrides
from experiments.reports import paper_tables
from experiments.reports import run_report
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
  flags.DEFINE_enum("engine", "local", list(engines.ENGINES),
                    "Where the grid's stages run: local (one after another in "
                    "this process) or ray (Ray tasks, side by side; pip install "
                    "-e '.[ray]'). Both give the same results.", flag_values=fv)
  flags.DEFINE_string("ray_address", None, "--engine=ray: a running cluster's "
                      "HOST:PORT (or $RAY_ADDRESS); unset starts Ray here. The "
                      "workdir must be on storage every node mounts.",
                      flag_values=fv)
  flags.DEFINE_float("gpus_per_task", None, "--engine=ray: GPUs each stage asks "
                     "for (fractions pack several on one GPU); unset: 1 where the "
                     "cluster has GPUs, else none (one CPU).", flag_values=fv)


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


def report(table: str, dataset: str, measured: dict,
           failed: dict | None = None) -> list[str]:
  """Markdown lines: paper beside measured, with the difference; a failed point's
  error in its own row."""
  lines = [f"# Table {table} on {dataset}: paper vs measured", ""]
  lines += paper_tables.TABLES[table].report(dataset, measured)
  if failed:
    lines += ["", "Failed points (rerun the command to retry them):", "",
              "| Point | error |", "|---|---|"]
    lines += [f"| {p} | {e} |" for p, e in failed.items()]
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


def points_of(table: str, base: configs.ExperimentConfig, workdir: str,
              points=None) -> list[grid_lib.Point]:
  """The table's points: one model folder per architecture."""
  spec = paper_tables.TABLES[table]
  models = spec.models or (base.train.model,)
  root = os.path.join(workdir, f"table_{table}")
  chosen = []
  for model in models:
    model_dir = workdir if len(models) == 1 else os.path.join(workdir, model)
    for point, changes in grid(table, points):
      name = point if len(models) == 1 else f"{model}/{point}"
      chosen.append(grid_lib.Point(name, overrides.override(base, model=model,
                                                            **changes),
                                   os.path.join(root, name), model_dir))
  return chosen


def measure(table: str, base: configs.ExperimentConfig, workdir: str, *,
            data_dir: str | None, show_progress: bool, points=None,
            engine: str = "local", ray_address: str | None = None,
            gpus_per_task: float | None = None) -> tuple[dict, dict]:
  """Every grid point of ``table`` as stages on ``engine``: ``(measured, failed)``,
  the points' results read from their results.json and the failed points' errors."""
  chosen = points_of(table, base, workdir, points)
  workdir = os.path.abspath(workdir)
  data_dir = os.path.abspath(data_dir) if data_dir else data_dir
  stages = grid_lib.plan(chosen, workdir, data_dir, " ".join(sys.argv))
  outcomes = engines.run(engine, stages, os.path.join(workdir, "grid"),
                         address=ray_address, gpus_per_task=gpus_per_task,
                         show_progress=show_progress)
  measured, failed = {}, {}
  single = not paper_tables.TABLES[table].models
  for point, stage in zip(chosen, stages[-len(chosen):]):
    key = point.name if single else point.config.train.model
    if outcomes[stage.name].status == "failed":
      failed[point.name] = outcomes[stage.name].error
    else:
      measured[key] = records.read_json(os.path.join(point.directory,
                                                     "results.json"))
  return measured, failed


def run(table: str, base: configs.ExperimentConfig, workdir: str, *,
        data_dir: str | None = None, show_progress: bool = True,
        points=None, engine: str = "local", ray_address: str | None = None,
        gpus_per_task: float | None = None) -> str:
  """Runs (or reuses) the table's grid; writes and returns ``report.md``'s path.

  Raises ``errors.UserError`` naming the failed points once the report (with
  their errors) is written.
  """
  progress.quiet_logs()
  check(table, base, workdir, points)
  engines.check(engine)
  measured, failed = measure(table, base, workdir, data_dir=data_dir,
                             show_progress=show_progress, points=points,
                             engine=engine, ray_address=ray_address,
                             gpus_per_task=gpus_per_task)
  root = os.path.join(workdir, f"table_{table}")
  lines = report(table, base.train.dataset, measured, failed)
  os.makedirs(root, exist_ok=True)
  if table in ("fig8", "fig10"):
    run_report.sweep_figure(measured, os.path.join(root, f"{table}.png"))
    lines += [f"![{table}]({table}.png)", ""]
  path = os.path.join(root, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  if failed:
    first, error = next(iter(failed.items()))
    raise errors.UserError(
        f"{len(failed)} of {len(failed) + len(measured)} points failed "
        f"({', '.join(failed)}); {first}: {error} Every error is in {path}; "
        "rerun the same command to retry them (finished stages are reused).")
  return path


def main(argv, fv=flags.FLAGS):
  del argv
  path = run(fv.table, cli.experiment_config(fv), fv.workdir, data_dir=fv.data_dir,
             show_progress=fv.progress, points=fv.points, engine=fv.engine,
             ray_address=fv.ray_address, gpus_per_task=fv.gpus_per_task)
  with open(path) as f:
    print(f.read())
  print(path)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli.run_main(main)
