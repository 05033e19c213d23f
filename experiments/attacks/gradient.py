"""Gradient through unlearning (``ounl_jax.attacks.unlearning_gradient``).

Two attacks, registered as ``unlearning_gradient`` and ``transfer``:

* ``unlearning_gradient`` is **white-box**: it receives the server's model and
  parameters explicitly and differentiates through the first-order update. It
  breaks the black-box boundary of the threat model on purpose: it is the upper
  bound the black-box attacks are measured against, never a realistic user. It
  assumes the server's first-order settings (``config.server.first_order``).
* ``transfer`` keeps the boundary: the user trains a surrogate of the server's
  architecture on its own data (``config.samples.pool``) and optimises against it.

Both submit the user's samples (``pipeline.user_samples``) within the same L2 bound
as Pushing (docs/protocol.md §8.1); ``normal`` submits the same ids unmodified.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments.setup import configs
from experiments.run import pipeline
from experiments.run import training
from ounl_jax import data as data_lib
from ounl_jax.attacks import unlearning_gradient as gradient_lib

HELD_OUT = 256  # Own class-A images whose loss the objective raises.


def settings_of(ctx: pipeline.Context, config: configs.ExperimentConfig
                ) -> gradient_lib.UnlearningGradientSettings:
  target = config.attack.target_class
  return gradient_lib.UnlearningGradientSettings(
      max_l2=config.attack.push.max_l2,
      target_class=None if target is None else data_lib.class_index(ctx.spec,
                                                                    target),
      unlearning=config.server.first_order)


def _attack(ctx, config, model, variables, name: str) -> pipeline.Submissions:
  """Optimises the user's samples against (model, variables); the submissions."""
  samples = pipeline.user_samples(ctx, config)
  class_a = pipeline.class_a_of(ctx.spec, config)
  pool = getattr(ctx.splits, config.samples.pool)
  held_out = pool.images[pool.labels == class_a][:HELD_OUT]
  started = time.time()
  result = gradient_lib.unlearning_gradient_attack(
      model, variables, samples.images, samples.labels, held_out,
      jax.random.key(config.attack.seed), settings_of(ctx, config))
  seconds = time.time() - started
  ok = np.asarray(result.submission.success)
  l2 = np.asarray(result.submission.l2)[ok]
  statistics = {"samples": int(len(ok)), "successes": int(ok.sum()),
                "l2_mean": float(l2.mean()) if len(l2) else None,
                "l2_max": float(l2.max()) if len(l2) else None,
                "objective_first": float(result.objectives[0])
                if len(result.objectives) else None,
                "objective_final": result.final_objective,
                "attack_seconds": seconds}
  submissions = {"normal": (samples.images[ok], samples.labels[ok]),
                 name: (result.submission.images[ok], result.submission.labels[ok])}
  fields = {"attacker": name, "white_box": name == "unlearning_gradient",
            "submitted_ids": samples.ids[ok]}
  return pipeline.Submissions("unlearning_gradient", submissions, statistics,
                              fields, {}, len(samples), int(ok.sum()), samples.ids,
                              seconds)


def white_box(ctx: pipeline.Context, config: configs.ExperimentConfig,
              workdir: str, *, show_progress: bool = True) -> pipeline.Submissions:
  """The upper bound: the server's own model and parameters (white-box)."""
  del workdir, show_progress
  return _attack(ctx, config, ctx.trained.model, ctx.trained.variables,
                 "unlearning_gradient")


def transfer(ctx: pipeline.Context, config: configs.ExperimentConfig,
             workdir: str, *, show_progress: bool = True) -> pipeline.Submissions:
  """Black-box: a surrogate trained on the user's own data, then the attack."""
  del workdir, show_progress
  pool = getattr(ctx.splits, config.samples.pool)
  model = training.build_model(ctx.train_config)
  surrogate = gradient_lib.train_surrogate(
      model, pool.images, pool.labels,
      jax.random.fold_in(jax.random.key(config.attack.seed), 1),
      batch_size=min(ctx.train_config.batch_size, len(pool)))
  return _attack(ctx, config, model, surrogate, "transfer")
