"""Scales (``--scale=smoke|cpu|paper``): each a config, built from the defaults.

A scale states only where it differs from the configs' defaults (which are the
library's settings, ``experiments/setup/configs.py``), by flag name; a flag given
explicitly on the command line always wins over its scale. The flags' defaults,
as ``--helpfull`` shows them, are those of ``DEFAULT_SCALE``.

* ``smoke``: seconds. Tiny width, a few hundred images: for tests and CI.
* ``cpu``: minutes on a 2-core CPU. Reduced width, every training image.
* ``paper``: the paper's settings (App. B; docs/protocol.md §2-§8), for an
  accelerator.

>>> experiment_config("smoke").train.width, experiment_config("cpu").train.width
(8, 16)
>>> experiment_config("paper").attack.push.zoo.max_iterations
20000
"""

from __future__ import annotations

from experiments.run import errors
from experiments.setup import configs
from experiments.setup import overrides

DEFAULT_SCALE = "cpu"

SCALES = {
    "smoke": {
        "width": 8,
        "max_train_per_class": 500,
        "max_test_per_class": 20,
        "epochs": 6,
        "patience": 6,
        "max_iterations": 100,
        "iterations_per_chunk": 25,
        "max_samples": 8,
    },
    "cpu": {
        # Calibrated (README, docs/results.md): every training image, so that the
        # user's 10% of class A is the paper's N = 400; about 12 minutes on 2 cores.
        "width": 16,
        "epochs": 12,
        "patience": 3,
        "max_iterations": 300,
        # Finished samples are neither answered nor billed (masked queries); short
        # chunks refill their slots sooner, which saves compute.
        "iterations_per_chunk": 2,
    },
    "paper": {
        # The paper's widths (VGG 128, ResNet 64): width None. Up to 100 epochs,
        # patience 10 and ZOO's 20,000 iterations are the defaults.
        "iterations_per_chunk": 50,
    },
}


def _preset(name: str) -> dict:
  if name not in SCALES:
    raise errors.UserError(f"--scale={name}: choose one of {', '.join(SCALES)} "
                           "(e.g. --scale=cpu).")
  return SCALES[name]


def experiment_config(name: str) -> configs.ExperimentConfig:
  """The over-unlearning config of scale ``name``."""
  return overrides.override(configs.ExperimentConfig(), **_preset(name))


def train_config(name: str) -> configs.TrainConfig:
  """The training config of scale ``name``."""
  return experiment_config(name).train


def value(name: str, flag: str):
  """What scale ``name`` runs with for ``flag`` (a train or FLAG_PATHS flag)."""
  return overrides.flag_default(flag, experiment_config(name))


def differs(flag: str) -> dict[str, object]:
  """``{scale: value}`` when the scales do not all agree on ``flag``, else {}."""
  values = {name: value(name, flag) for name in SCALES}
  return values if len(set(map(repr, values.values()))) > 1 else {}
