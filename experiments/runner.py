"""Runs one over-unlearning experiment from flags and writes its result files.

Shared by ``experiments.pushing``, ``experiments.blending`` and
``experiments.finetune``: importing this module defines their flags.
"""

import os

from experiments import common
from experiments import pipeline
from experiments import reporting
from experiments import validation

FLAGS = common.FLAGS
common.define_common_flags({"workdir": "./runs/cifar10"})
pipeline.define_attack_flags()


def write_results(results: dict, workdir: str) -> str:
  """results.json, results.md and figures; returns the path of results.json."""
  path = common.write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(reporting.markdown(results))
  reporting.write_figures(results, workdir)
  return path


def run(experiment: str, **overrides) -> str:
  """Runs ``pushing`` or ``blending`` with the flags (``overrides`` win)."""
  common.quiet_logs()
  train_config = common.train_config_from_flags()
  config = pipeline.attack_config_from_flags(**overrides)
  validation.check_attack(validation.check_train(train_config), config)
  validation.check_workdir(FLAGS.workdir)
  ctx = pipeline.prepare(train_config, FLAGS.workdir, data_dir=FLAGS.data_dir,
                         show_progress=FLAGS.progress)
  if experiment == "pushing":
    results = pipeline.run_pushing(ctx, config, FLAGS.workdir,
                                   show_progress=FLAGS.progress)
  else:
    results = pipeline.run_blending(ctx, config)
  results = pipeline.stamp(results, train_config, config)
  path = write_results(results, FLAGS.workdir)
  print(reporting.markdown(results))
  return path
