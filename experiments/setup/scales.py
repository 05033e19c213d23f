"""Scale presets shared by every experiment (``--scale=smoke|cpu|paper``).

A preset is a dict of flag defaults; a flag given explicitly on the command line
always wins over the preset. Each experiment reads the keys it has flags for.

* ``smoke``: seconds. Tiny width, a few hundred images: for tests and CI.
* ``cpu``: minutes on a 2-core CPU. Reduced width and data, still real learning.
* ``paper``: the paper's settings (App. B; docs/protocol.md §2-§8), for an accelerator.
"""

from __future__ import annotations

SCALES = {
    "smoke": {
        "width": 8,
        "max_train_per_class": 500,
        "max_test_per_class": 20,
        "epochs": 6,
        "patience": 6,
        # Attack settings (experiments that push samples).
        "max_iterations": 100,
        "iterations_per_chunk": 25,
        "max_samples": 8,
    },
    "cpu": {
        # Calibrated (README, docs/results.md): every training image, so that the
        # user's 10% of class A is the paper's N = 400; about 15 minutes on 2 cores.
        "width": 16,
        "max_train_per_class": None,
        "max_test_per_class": None,
        "epochs": 12,
        "patience": 3,
        "max_iterations": 300,
        # Finished samples are neither answered nor billed (masked queries); short
        # chunks refill their slots sooner, which saves compute.
        "iterations_per_chunk": 2,
        "max_samples": None,
    },
    "paper": {
        "width": None,  # The paper's widths (VGG 128, ResNet 64).
        "max_train_per_class": None,
        "max_test_per_class": None,
        "epochs": 100,
        "patience": 10,
        "max_iterations": 20000,
        "iterations_per_chunk": 50,
        "max_samples": None,
    },
}


def get_scale(name: str) -> dict:
  if name not in SCALES:
    raise ValueError(f"Unknown scale {name!r}; choose one of {', '.join(SCALES)} "
                     "(e.g. --scale=cpu).")
  return dict(SCALES[name])
