"""The blending attack (Sec. III-B, V-A, Eq. 1): its submissions.

Each of the user's class-A samples is blended with a class-B image the user holds
(``config.samples.pool``, never the server's training data) and submitted with the
oracle's predicted label (docs/protocol.md §10); ``normal`` submits the same
samples unmodified.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from experiments.setup import configs
from experiments.run import pipeline
from ounl_jax import data as data_lib
from ounl_jax.attacks import blending as blending_lib


def class_b_of(spec: data_lib.DatasetSpec, config: configs.ExperimentConfig) -> int:
  return data_lib.class_index(spec, config.attack.blend_class or spec.class_b)


def blend(ctx: pipeline.Context, config: configs.ExperimentConfig,
          samples: data_lib.LabelledImages) -> blending_lib.BlendResult:
  """``samples`` blended through the oracle of a fresh clean server."""
  pool = getattr(ctx.splits, config.samples.pool)
  settings = blending_lib.BlendSettings(
      class_b=class_b_of(ctx.spec, config), ratio=config.attack.blend_ratio,
      label_mode=config.attack.blend_label_mode)
  return blending_lib.blending_attack(
      pipeline.new_server(ctx, config).oracle(), samples.images, samples.labels,
      jax.random.key(config.attack.seed), pool.images, pool.labels, settings)


def blending(ctx: pipeline.Context, config: configs.ExperimentConfig, workdir: str,
             *, show_progress: bool = True) -> pipeline.Submissions:
  """Clean, normal and Blending on the same training ids (Sec. V-A, Table III)."""
  del workdir, show_progress
  samples = pipeline.user_samples(ctx, config)
  class_b = class_b_of(ctx.spec, config)
  started = time.time()
  blended = blend(ctx, config, samples)
  seconds = time.time() - started
  labels, counts = np.unique(blended.labels, return_counts=True)
  names = ctx.spec.class_names
  statistics = {"submitted_label_counts": {names[int(l)]: int(c)
                                           for l, c in zip(labels, counts)},
                "queries": int(blended.queries.sum()), "attack_seconds": seconds}
  fields = {"class_b": names[class_b], "blend_ratio": config.attack.blend_ratio,
            "submitted_ids": samples.ids}
  submissions = {"normal": (samples.images, samples.labels),
                 "blending": (blended.images, blended.labels)}
  return pipeline.Submissions("blending", submissions, statistics, fields,
                              {"class_b": class_b}, len(samples), len(samples),
                              samples.ids, seconds)
