"""The paper's experiment, step by step, shared by every over-unlearning script.

1. Train (or reuse) the server's model (``training.train_or_restore``).
2. Select the malicious user's samples (docs/protocol.md §4).
3. The attack chosen by name (``experiments/attacks/registry.py``) makes its submissions,
   ``{condition: (images, labels)}``, through the black-box oracle only (the
   white-box ``unlearning_gradient`` is the documented exception).
4. ``run_conditions`` (driven by ``experiments.run.runner``): for every submission a fresh server holding the clean model
   (same server key, so the same noise / relabelling; the defence chosen by name,
   ``experiments/server/screens.py``, screening each request) unlearns it and is evaluated
   on its test set. ``normal`` submits the same training ids unmodified, with their
   true labels (the paired baseline).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np

from experiments.run import records
from experiments.setup import configs
from experiments.run import training
from experiments.server import methods
from ounl_jax import data as data_lib
from ounl_jax import service as service_lib
from ounl_jax import unlearning


class Context(NamedTuple):
  """The trained server model and its data; ``deadline``: the ``time.monotonic()``
  value at which a push stops cleanly (``--time_budget``; None: no limit)."""

  spec: data_lib.DatasetSpec
  splits: data_lib.Splits
  trained: training.TrainedModel
  train_config: configs.TrainConfig
  deadline: float | None = None


class Submissions(NamedTuple):
  """What an attack hands the runner (``experiments/attacks/registry.py``).

  Attributes:
    experiment: the results' kind, ``pushing`` or ``blending`` (their layout).
    submissions: ``{condition: (images, labels)}``, ``normal`` first.
    statistics: the attack's statistics (``results["attack"]``).
    fields: further top-level results fields (``submitted_ids``, ...).
    extra_classes: ``{role: class}`` whose accuracy each condition reports.
    user_samples: the user's samples (N requested); submitted: those sent.
    user_ids: training ids the user owns (kept out of a defence's calibration).
    seconds: the attack's wall time.
  """

  experiment: str
  submissions: dict
  statistics: dict
  fields: dict
  extra_classes: dict
  user_samples: int
  submitted: int
  user_ids: np.ndarray
  seconds: float


def prepare(train_config: configs.TrainConfig, workdir: str, *,
            data_dir: str | None = None, show_progress: bool = True,
            time_budget: float | None = None) -> Context:
  """Loads the data and trains (or reuses) the server's model in ``workdir``;
  ``time_budget``: seconds from now after which a push stops (None: no limit)."""
  deadline = None if time_budget is None else time.monotonic() + time_budget
  spec = data_lib.get_spec(train_config.dataset)
  splits = training.load_splits(train_config, data_dir)
  trained = training.train_or_restore(train_config, workdir, splits,
                                      show_progress=show_progress)
  return Context(spec, splits, trained, train_config, deadline)


def class_a_of(spec: data_lib.DatasetSpec, config: configs.ExperimentConfig) -> int:
  return data_lib.class_index(spec, config.samples.unlearn_class or spec.class_a)


# Streams derived from ``samples.seed``: the fraction's draw
# (``data.select_unlearn_set``) uses the seed itself; the cap at ``max_samples``
# draws from the distinct child stream ``SeedSequence((seed, CAP_STREAM))``, so the
# cap is not the same permutation that picked the fraction.
CAP_STREAM = 1


def cap_rng(seed: int) -> np.random.Generator:
  """The generator of the cap at ``max_samples`` (independent of the selection).

  >>> int(cap_rng(88).integers(1000)) != int(np.random.default_rng(88).integers(1000))
  True
  """
  return np.random.default_rng(np.random.SeedSequence((seed, CAP_STREAM)))


def user_samples(ctx: Context, config: configs.ExperimentConfig
                 ) -> data_lib.LabelledImages:
  """The user's samples of class A (seeded; the same ids for every condition)."""
  samples = config.samples
  chosen = data_lib.select_unlearn_set(ctx.splits.train, class_a_of(ctx.spec, config),
                                       samples.fraction, seed=samples.seed)
  if samples.max_samples is not None and len(chosen) > samples.max_samples:
    keep = np.sort(cap_rng(samples.seed).choice(
        len(chosen), samples.max_samples, replace=False))
    chosen = chosen.take(keep)
  return chosen


def new_server(ctx: Context, config: configs.ExperimentConfig, *,
               output: str = "probabilities", screens: Sequence = (),
               guard=None) -> service_lib.UnlearningService:
  """A server holding the clean model (each condition starts from it)."""
  return service_lib.UnlearningService(
      ctx.trained.model, ctx.trained.variables, ctx.splits.test,
      key=jax.random.key(config.server.seed),
      method=methods.get(config.server.method),
      settings=config.server.settings(), output=output, screens=screens,
      guard=guard)


def condition_report(ctx: Context, server: service_lib.UnlearningService,
                     class_a: int, extra_classes: dict[str, int]) -> dict:
  """The server's model on its test set: overall, per class, class-A histogram."""
  evaluated = server.evaluate(class_a)
  names = ctx.spec.class_names
  report = evaluated.report
  result = {
      "overall_accuracy": report.accuracy,
      "per_class_accuracy": dict(zip(names, report.per_class_accuracy.tolist())),
      "class_a_accuracy": report.class_a_accuracy,
      "other_classes_accuracy": report.other_classes_accuracy,
      "histogram": {n: int(c) for n, c in zip(names, evaluated.histogram)},
      "histogram_total": int(np.sum(evaluated.histogram)),
  }
  for role, index in extra_classes.items():
    result[f"{role}_accuracy"] = float(report.per_class_accuracy[index])
  return result


def run_condition(ctx: Context, config: configs.ExperimentConfig, submission,
                  class_a: int, extra_classes: dict[str, int],
                  screens: Sequence = ()) -> dict:
  """A fresh clean server unlearns ``submission`` (or nothing); its report.

  A request the server's defence refuses leaves the clean model; the condition
  records the refusal and the screen that made it.
  """
  server = new_server(ctx, config, screens=screens)
  result = {}
  if submission is not None:
    try:
      receipt = server.unlearn(service_lib.UnlearningRequest(*submission))
      result = {"num_submitted": receipt.num_samples,
                "unlearn_seconds": receipt.seconds}
    except service_lib.RequestRefused as refused:
      result = {"num_submitted": 0, "refused": True, "refused_by": refused.screen,
                "flagged": len(refused.flagged)}
  result.update(condition_report(ctx, server, class_a, extra_classes))
  return result


def run_conditions(ctx: Context, config: configs.ExperimentConfig,
                   submissions: dict, class_a: int, extra_classes: dict[str, int],
                   screens: Sequence = ()) -> dict:
  """``clean``, then every ``{condition: (images, labels)}`` on a fresh server."""
  conditions = {"clean": run_condition(ctx, config, None, class_a, extra_classes)}
  for name, submission in submissions.items():
    conditions[name] = run_condition(ctx, config, submission, class_a,
                                     extra_classes, screens)
  return conditions


def run_summary(ctx: Context, config: configs.ExperimentConfig, experiment: str,
                class_a: int, user_samples_count: int, submitted_count: int) -> dict:
  """What every over-unlearning results file starts with."""
  settings = config.server.settings()
  noise_share = (unlearning.noise_term_count(submitted_count, settings)
                 / max(submitted_count, 1)
                 if isinstance(settings, unlearning.FirstOrderSettings) else None)
  final = ctx.trained.metrics["final"]
  return {
      "experiment": experiment,
      "dataset": ctx.spec.name,
      "data_note": ("CIFAR-10 (JPEG-q75 copy)" if ctx.spec.name == "cifar10"
                    else ctx.spec.name),
      "class_a": ctx.spec.class_names[class_a],
      "unlearning": config.server.method,
      "unlearning_settings": dataclasses.asdict(settings),
      "user_samples": user_samples_count,
      "noise_term_share": noise_share,
      "clean_model": {"train_accuracy": final["train"]["accuracy"],
                      "test_accuracy": final["test"]["accuracy"],
                      "num_params": ctx.trained.metrics["num_params"]},
  }


def stamp(results: dict, config: configs.ExperimentConfig) -> dict:
  """Adds the full config, seeds, versions and commit to a results dict."""
  return {**results, **records.run_metadata(config.to_dict())}
