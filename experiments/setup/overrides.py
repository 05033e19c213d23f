"""Command-line names of config fields: which flag sets which field.

Command-line flags are flat names (``--fraction``, ``--tau``); ``FLAG_PATHS`` says
where each lands in the nested ``configs.ExperimentConfig`` (a flag may set the
same setting of several methods), ``CHOICES`` which of the library's tuples a
flag chooses from, and ``override`` sets values by flag name.

>>> config = override(configs.ExperimentConfig(), fraction=0.5, tau=2e-5)
>>> config.samples.fraction, config.server.first_order.tau
(0.5, 2e-05)
>>> flag_default("max_l2")
20.0
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.setup import configs
from ounl_jax.attacks import labels
from ounl_jax.attacks import pushing as pushing_lib
from ounl_jax.unlearning import first_order

# Flag name -> its place(s) in ExperimentConfig (the first gives the default).
FLAG_PATHS = {
    "unlearn_class": ("samples.unlearn_class",),
    "fraction": ("samples.fraction",),
    "sample_rule": ("samples.rule",),
    "max_samples": ("samples.max_samples",),
    "blend_pool": ("samples.pool",),
    "unlearn_seed": ("samples.seed",),
    "attack": ("attack.name",),
    "target_class": ("attack.target_class",),
    "max_iterations": ("attack.push.zoo.max_iterations",),
    "iterations_per_chunk": ("attack.push.zoo.iterations_per_chunk",),
    "sample_chunk_size": ("attack.push.zoo.sample_chunk_size",),
    "pushing_i": ("attack.push.pushing_i",),
    "pushing_ii": ("attack.push.pushing_ii",),
    "label_mode": ("attack.push.label_mode",),
    "max_l2": ("attack.push.max_l2",),
    "blend_class": ("attack.blend_class",),
    "blend_ratio": ("attack.blend_ratio",),
    "blend_label_mode": ("attack.blend_label_mode",),
    "attack_seed": ("attack.seed",),
    "unlearning": ("server.method",),
    "tau": ("server.first_order.tau", "server.gradient_ascent.tau"),
    "reduction": ("server.first_order.reduction",
                  "server.gradient_ascent.reduction"),
    "scope": ("server.first_order.scope", "server.gradient_ascent.scope"),
    "steps": ("server.first_order.steps", "server.gradient_ascent.steps"),
    "replacement": ("server.first_order.replacement",),
    "reference_code": ("server.first_order.reference_code",),
    "reference_batch_size": ("server.first_order.reference_batch_size",),
    "finetune_epochs": ("server.fine_tune.epochs",),
    "finetune_learning_rate": ("server.fine_tune.learning_rate",),
    "defence": ("server.defence",),
    "false_rejection_rate": ("server.false_rejection_rate",),
    "defence_seed": ("server.defence_seed",),
    "server_seed": ("server.seed",),
}
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(configs.TrainConfig))
# The choices of the flags that name one of a fixed set: the library's tuples.
# (--attack, --defence and --unlearning choose from registries: experiments/setup/cli.py.)
CHOICES = {
    "sample_rule": configs.SAMPLE_RULES, "blend_pool": configs.USER_POOLS,
    "reduction": first_order.REDUCTIONS, "scope": first_order.SCOPES,
    "pushing_i": pushing_lib.PUSHING_I, "pushing_ii": pushing_lib.PUSHING_II,
    "label_mode": labels.LABEL_MODES, "blend_label_mode": labels.LABEL_MODES,
    "replacement": first_order.REPLACEMENTS,
}


def get(config, path: str) -> Any:
  """The value at a dotted ``path`` of nested dataclasses."""
  for name in path.split("."):
    config = getattr(config, name)
  return config


def replace_path(config, path: str, value):
  """``config`` with the value at the dotted ``path`` replaced."""
  head, _, rest = path.partition(".")
  if not rest:
    return dataclasses.replace(config, **{head: value})
  return dataclasses.replace(
      config, **{head: replace_path(getattr(config, head), rest, value)})


def override(config: configs.ExperimentConfig, **values
             ) -> configs.ExperimentConfig:
  """``config`` with flat flag-named values set (``fraction=0.5``, ``model=...``)."""
  for name, value in values.items():
    if name in TRAIN_FLAGS:
      config = replace_path(config, f"train.{name}", value)
      continue
    if name not in FLAG_PATHS:
      raise KeyError(f"Unknown setting {name!r}; known: "
                     f"{', '.join(TRAIN_FLAGS + tuple(FLAG_PATHS))}.")
    for path in FLAG_PATHS[name]:
      config = replace_path(config, path, value)
  return config


def flag_default(name: str, config: configs.ExperimentConfig = configs.ExperimentConfig()
                 ) -> Any:
  """A flag's default: read from the config (and so from the library)."""
  if name in TRAIN_FLAGS:
    return getattr(config.train, name)
  return get(config, FLAG_PATHS[name][0])
