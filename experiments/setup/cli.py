"""Command-line flags, defined only by the entry modules' ``__main__``.

Shared modules define no flag at import time, so every experiment module can be
imported in one process. An entry module calls ``define_*_flags(flags.FLAGS)``
under ``if __name__ == "__main__":``; tests pass a fresh ``flags.FlagValues()``.
Every default comes from ``experiments.setup.configs`` (and so from the library's
settings dataclasses); a ``--scale`` preset fills the keys it has unless the flag
is given (docs/protocol.md §2-§8).

>>> from absl import flags
>>> fv = flags.FlagValues()
>>> define_experiment_flags(fv)
>>> _ = fv(["prog", "--scale=smoke", "--fraction=0.5"])
>>> config = experiment_config(fv)
>>> config.samples.fraction, config.samples.max_samples, config.train.width
(0.5, 8, 8)
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from experiments.run import errors
from experiments.setup import configs
from experiments.setup import scales
from experiments.setup import validation

_EXPERIMENT = configs.ExperimentConfig()

_HELP = {
    "unlearn_class": "Class A whose samples the user owns (default: the paper's, "
                     "airplane / apple).",
    "fraction": "Fraction of class A's training samples the user owns and asks to "
                "unlearn (paper: 0.1 and 0.5).",
    "max_samples": "Cap on the number of samples (preset if unset).",
    "sample_rule": "released: push class-A samples until N = fraction x class A "
                   "are pushed, submit those N (the authors' code); "
                   "fraction_first: draw the fraction, drop the failures.",
    "attack": "The attack (experiments/attacks/registry.py): zoo (the paper's, released "
              "settings), zoo_directions, label_only, unlearning_gradient "
              "(white-box upper bound), transfer, blending.",
    "unlearning": "The server's unlearning method.",
    "tau": "First-order unlearning rate (2e-4, the released code; Warnecke's "
           "CIFAR value is 2e-5).",
    "reduction": "First-order gradient reduction (sum, as the released code).",
    "scope": "First-order parameter scope (head, as the released code).",
    "reference_code": "The released code's first-order update: the noise term is "
                      "dropped on full gradient batches (docs/protocol.md §5), the "
                      "regime behind the paper's numbers (default). "
                      "--noreference_code: Eq. 13 as written.",
    "reference_batch_size": "With --reference_code: the gradient batch whose full "
                            "batches lose the noise term (released 256).",
    "finetune_epochs": "Fine-tune unlearning epochs.",
    "finetune_learning_rate": "Fine-tune SGD rate.",
    "target_class": "Targeted pushing towards this class (Tables V-VI); "
                    "untargeted when unset.",
    "max_iterations": "ZOO iterations (preset if unset).",
    "iterations_per_chunk": "ZOO iterations per compiled call (preset if unset).",
    "sample_chunk_size": "Samples pushed at once (memory).",
    "pushing_i": "Pushing-I selection: last (paper) or largest_l2 (code).",
    "pushing_ii": "Pushing-II selection: first_crossing (paper) or smallest_l2 "
                  "(released code).",
    "label_mode": "Submitted label of pushed samples (docs/protocol.md §9).",
    "max_l2": "L2 bound on the pushing perturbation.",
    "blend_class": "Class B blended in (default: the paper's, cat / orange).",
    "blend_ratio": "Blending ratio r, the weight on the class-B image (Eq. 1's "
                   "lambda = 1 - r).",
    "blend_label_mode": "Submitted label of blended samples (paper: prediction).",
    "blend_pool": "Split the user draws its own images from (never the server's "
                  "training data).",
    "defence": "The server's screen on every request (experiments/server/screens.py): "
               "none, or a Sec. VII defence calibrated at 1% false rejection.",
    "unlearn_seed": "Seed of the sample selection.",
    "attack_seed": "Seed of the attack.",
    "server_seed": "Seed of the server's unlearning noise.",
}
_ENUMS = {
    "sample_rule": ("released", "fraction_first"),
    "reduction": ("sum", "mean"), "scope": ("head", "all"),
    "pushing_i": ("last", "largest_l2"),
    "pushing_ii": ("first_crossing", "smallest_l2"),
    "label_mode": ("original", "prediction", "target"),
    "blend_label_mode": ("prediction", "original", "target"),
    "blend_pool": ("valid", "test"),
}
_INTEGERS = ("max_samples", "max_iterations", "iterations_per_chunk",
             "sample_chunk_size", "reference_batch_size", "finetune_epochs",
             "unlearn_seed", "attack_seed", "server_seed")
_FLOATS = ("fraction", "tau", "max_l2", "blend_ratio", "finetune_learning_rate")


def _define(fv, name: str, default, help_text: str, **kwargs) -> None:
  """One flag, its kind read from the default's type or the tables above."""
  if name in _ENUMS:
    flags.DEFINE_enum(name, default, list(_ENUMS[name]), help_text, flag_values=fv)
  elif name in kwargs.get("choices", {}):
    flags.DEFINE_enum(name, default, kwargs["choices"][name], help_text,
                      flag_values=fv)
  elif isinstance(default, bool):
    flags.DEFINE_bool(name, default, help_text, flag_values=fv)
  elif name in _INTEGERS:
    flags.DEFINE_integer(name, default, help_text, flag_values=fv)
  elif name in _FLOATS:
    flags.DEFINE_float(name, default, help_text, flag_values=fv)
  else:
    flags.DEFINE_string(name, default, help_text, flag_values=fv)


def define_common_flags(fv, *, workdir: str = "./runs/default",
                        scale: str = "cpu") -> None:
  """Flags every experiment has: data, model, scale, training, workdir, seed."""
  train = configs.TrainConfig()
  flags.DEFINE_string("dataset", train.dataset, "cifar10, cifar100 or stl10.",
                      flag_values=fv)
  flags.DEFINE_string("model", train.model, "vgg3, vgg4, vgg5 or resnet.",
                      flag_values=fv)
  flags.DEFINE_enum("scale", scale, list(scales.SCALES),
                    "Preset of sizes: smoke (seconds), cpu (minutes on a 2-core "
                    "CPU), paper (the paper's settings). Explicit flags override.",
                    flag_values=fv)
  flags.DEFINE_string("workdir", workdir, "Folder for checkpoints, results and "
                      "figures (WORKSPACE.md).", flag_values=fv)
  flags.DEFINE_string("data_dir", None,
                      "TFDS data folder; defaults to $TFDS_DATA_DIR.", flag_values=fv)
  flags.DEFINE_integer("seed", train.seed, "Seed of the split, the model init and "
                       "training.", flag_values=fv)
  for name in ("width", "max_train_per_class", "max_test_per_class", "epochs",
               "patience"):
    flags.DEFINE_integer(name, getattr(train, name), f"{name} (preset if unset).",
                         flag_values=fv)
  flags.DEFINE_integer("batch_size", train.batch_size, "Training batch size (App. "
                       "B: 64).", flag_values=fv)
  flags.DEFINE_float("learning_rate", train.learning_rate, "Adam-AMSGrad learning "
                     "rate; default per dataset (1e-3, CIFAR-100 1e-4).",
                     flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=fv)
  flags.DEFINE_bool("debug", False, "Show the full traceback of a user error "
                    "instead of its one-line message.", flag_values=fv)


def define_experiment_flags(fv, *, workdir: str = "./runs/cifar10") -> None:
  """The common flags and every ``configs.FLAG_PATHS`` flag (pushing, blending)."""
  from experiments.attacks import registry  # pylint: disable=g-import-not-at-top
  from experiments.server import screens  # pylint: disable=g-import-not-at-top
  from ounl_jax import unlearning  # pylint: disable=g-import-not-at-top
  define_common_flags(fv, workdir=workdir)
  choices = {"attack": list(registry.ATTACKS), "defence": list(screens.DEFENCES),
             "unlearning": list(unlearning.METHODS)}
  for name in configs.FLAG_PATHS:
    _define(fv, name, configs.flag_default(name), _HELP[name], choices=choices)


def from_preset(fv, name: str) -> Any:
  """The flag's value if given on the command line, else the scale preset's."""
  preset = scales.get_scale(fv.scale)
  if fv[name].present or name not in preset:
    return fv[name].value
  return preset[name]


def train_config(fv) -> configs.TrainConfig:
  return configs.TrainConfig(**{f.name: from_preset(fv, f.name)
                                for f in dataclasses.fields(configs.TrainConfig)})


def experiment_config(fv, **overrides) -> configs.ExperimentConfig:
  """The flags as an ``ExperimentConfig``; ``overrides`` (flag names) win."""
  values = {name: from_preset(fv, name) for name in configs.FLAG_PATHS}
  values.update(overrides)
  train = train_config(fv)
  # Checked by flag name first: one line naming the flag, before any work.
  validation.check_attack(validation.check_train(train), values)
  config = dataclasses.replace(configs.ExperimentConfig(), train=train)
  return configs.override(config, **values)


def run_main(main, fv=flags.FLAGS) -> None:
  """``app.run(main)``; a user error prints one line and exits 2 (--debug: raise)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def wrapped(argv):
    try:
      return main(argv)
    except errors.user_errors() as error:
      if fv.debug:
        raise
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
