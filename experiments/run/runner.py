"""Runs one over-unlearning experiment from its config and writes its result files.

``run(config, workdir) -> results`` is what ``experiments.pushing``,
``experiments.blending`` and ``experiments.finetune`` do after parsing their flags
(and what tests call directly): check every setting before any data is read,
train or reuse the server's model, run the attack chosen by name
(``experiments/attacks/registry.py``), have a fresh server unlearn and evaluate each
submission (``pipeline.run_conditions``), and write ``results.json``, ``results.md``
and the figures.
"""

from __future__ import annotations

import os
import time

from experiments.attacks import registry
from experiments.run import progress
from experiments.run import records
from experiments.setup import configs
from experiments.run import pipeline
from experiments.reports import run_report
from experiments.server import screens
from experiments.setup import validation


def write_results(results: dict, workdir: str) -> str:
  """results.json, results.md and figures; returns the path of results.json."""
  path = records.write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(run_report.markdown(results))
  run_report.write_figures(results, workdir)
  return path


def run_experiment(ctx: pipeline.Context, config: configs.ExperimentConfig,
                   workdir: str, *, show_progress: bool = True) -> dict:
  """The attack ``config.attack.name`` and every condition: the stamped results."""
  class_a = pipeline.class_a_of(ctx.spec, config)
  host_rss = {"before_attack": records.host_peak_rss_mib()}
  made = registry.get(config.attack.name).make_submissions(
      ctx, config, workdir, show_progress=show_progress)
  host_rss["after_attack"] = records.host_peak_rss_mib()
  installed = screens.build(ctx, config, made.user_ids)
  started = time.time()
  conditions = pipeline.run_conditions(ctx, config, made.submissions, class_a,
                                       made.extra_classes, installed)
  results = {
      **pipeline.run_summary(ctx, config, made.experiment, class_a,
                             made.user_samples, made.submitted),
      **made.fields,
      **({"defence": config.server.defence} if installed else {}),
      "conditions": conditions,
      "attack": made.statistics,
      "timings": {"unlearn_and_evaluate_seconds": time.time() - started,
                  "attack_seconds": made.seconds},
      "host_peak_rss_mib": {**host_rss, "at_end": records.host_peak_rss_mib()},
  }
  return records.to_jsonable(pipeline.stamp(results, config))


def run(config: configs.ExperimentConfig, workdir: str, *,
        data_dir: str | None = None, show_progress: bool = True,
        time_budget: float | None = None) -> dict:
  """Checks, trains or reuses the model, attacks, evaluates, writes; the results.

  ``time_budget``: seconds from the start after which a push stops cleanly with
  its finished samples saved (``errors.TimeBudgetReached``; None: no limit).
  """
  progress.quiet_logs()
  validation.check_experiment(config)
  validation.check_workdir(workdir)
  ctx = pipeline.prepare(config.train, workdir, data_dir=data_dir,
                         show_progress=show_progress, time_budget=time_budget)
  results = run_experiment(ctx, config, workdir, show_progress=show_progress)
  write_results(results, workdir)
  return results


def main(fv, **fixed) -> None:
  """The scripts' thin main: flags to config, ``run``, the report, the path."""
  from experiments.setup import cli  # pylint: disable=g-import-not-at-top
  config = cli.experiment_config(fv, **fixed)
  results = run(config, fv.workdir, data_dir=fv.data_dir, show_progress=fv.progress,
                time_budget=fv.time_budget if "time_budget" in fv else None)
  print(run_report.markdown(results))
  print(os.path.join(fv.workdir, "results.json"))
