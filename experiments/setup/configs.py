"""One config per experiment, nested from the library's frozen settings.

Defaults live in one place: the library's settings dataclasses
(``zoo.ZooSettings``, ``pushing.PushSettings``, ``blending.BlendSettings``,
``unlearning.FirstOrderSettings``, ...). An experiment's config nests them; where the
experiments must differ from the library, the difference is stated once, below,
with its reason (docs/protocol.md). Every field is documented in its class's
``Attributes:`` section: the flags' help is read from there
(``experiments/setup/cli.py``); which flag sets which field is
``experiments/setup/overrides.py``.

>>> ExperimentConfig().server.first_order.reference_code   # Released regime (§5).
True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments.server import methods
from ounl_jax import unlearning
from ounl_jax.defences import screening
from ounl_jax.attacks import pushing as pushing_lib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What determines the server's trained model (and so its checkpoint).

  Attributes:
    dataset: cifar10, cifar100 or stl10.
    model: vgg3, vgg4, vgg5 or resnet.
    width: channels of the first block (None: the paper's, VGG 128 / ResNet 64).
    seed: seed of the split, the model's initialisation and training.
    epochs: at most this many training epochs (early stopping may end sooner).
    patience: epochs without a better validation loss before training stops.
    batch_size: training batch size (App. B: 64).
    learning_rate: Adam-AMSGrad learning rate (None: per dataset, 1e-3;
      CIFAR-100 1e-4).
    max_train_per_class: cap on each class's training images (None: all).
    max_test_per_class: cap on each class's test images (None: all).
  """

  dataset: str = "cifar10"
  model: str = "vgg3"
  width: int | None = None
  seed: int = 0
  epochs: int = 100
  patience: int = 10
  batch_size: int = 64
  learning_rate: float | None = None
  max_train_per_class: int | None = None
  max_test_per_class: int | None = None

  def __post_init__(self):
    for name in ("width", "epochs", "patience", "batch_size",
                 "max_train_per_class", "max_test_per_class"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    rate = self.learning_rate
    if rate is not None and not (math.isfinite(rate) and rate > 0):
      raise ValueError(f"learning_rate must be a positive finite number, got "
                       f"{rate}.")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


USER_POOLS = ("valid", "test")
# docs/protocol.md §4; experiments/attacks/pushing/sample_rules.py pushes by them.
SAMPLE_RULES = ("released", "fraction_first")


@dataclasses.dataclass(frozen=True)
class SamplesConfig:
  """The malicious user's samples (docs/protocol.md §4).

  Attributes:
    unlearn_class: class A whose samples the user owns (None: the paper's,
      airplane / apple).
    fraction: fraction of class A's training samples the user owns and asks to
      unlearn (paper: 0.1 and 0.5).
    rule: released: push class-A samples until N = fraction x class A are
      pushed, submit those N (the authors' code); fraction_first: draw the
      fraction, drop the failures.
    max_samples: cap on the number of samples (None: no cap).
    pool: split the user draws its own images from (never the server's training
      data): valid or test.
    seed: seed of the sample selection (the released code's --random_seed 88).
  """

  unlearn_class: str | None = None
  fraction: float = 0.1
  rule: str = "released"
  max_samples: int | None = None
  pool: str = "valid"
  seed: int = 88

  def __post_init__(self):
    if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
      raise ValueError(f"fraction must be in (0, 1] (the paper uses 0.1 and "
                       f"0.5), got {self.fraction}.")
    if self.max_samples is not None and self.max_samples < 1:
      raise ValueError(f"max_samples must be >= 1, got {self.max_samples}.")
    for name, choices in (("rule", SAMPLE_RULES), ("pool", USER_POOLS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"Unknown {name} {getattr(self, name)!r}; choose one of "
                         f"{', '.join(choices)}.")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Which attack (``experiments/attacks/registry.py``) and its settings.

  Classes are names here (the flags'); they become indices when the run starts.

  Attributes:
    name: the attack: zoo (the paper's, released settings), zoo_directions,
      label_only, unlearning_gradient (white-box upper bound), transfer,
      blending, or one registered by the caller.
    target_class: targeted pushing towards this class (Tables V-VI); None:
      untargeted.
    blend_class: class B blended in (None: the paper's, cat / orange).
    push: how to push (the library's ``PushSettings``).
    blend_ratio: blending ratio r, the weight on the class-B image (Eq. 1's
      lambda = 1 - r).
    blend_label_mode: submitted label of blended samples (paper: prediction).
    seed: seed of the attack (ZOO coordinates, class-B draws).
  """

  name: str = "zoo"
  target_class: str | None = None
  blend_class: str | None = None
  push: pushing_lib.PushSettings = pushing_lib.PushSettings()
  blend_ratio: float = 0.3
  blend_label_mode: str = "prediction"
  seed: int = 1216

  def __post_init__(self):
    if not (math.isfinite(self.blend_ratio) and 0 < self.blend_ratio <= 1):
      raise ValueError(f"blend_ratio must be in (0, 1] (the weight on the class-B "
                       f"image; the paper uses 0.3 and 0.5), got "
                       f"{self.blend_ratio}.")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """The server: its unlearning method, its defence and their seeds.

  The experiments run the released first-order regime (the noise term dropped on
  full gradient batches, docs/protocol.md §5, §16), the regime behind the paper's
  numbers; the library's ``FirstOrderSettings()`` is Eq. 13 as written.

  Attributes:
    method: the unlearning method (``experiments/server/methods.py``).
    first_order: settings of first_order unlearning.
    fine_tune: settings of fine_tune unlearning.
    gradient_ascent: settings of gradient_ascent unlearning.
    defence: the screen on every request (``experiments/server/screens.py``):
      none, or a defence calibrated at false_rejection_rate.
    false_rejection_rate: share of honest samples the defence's threshold
      refuses.
    defence_seed: seed of the honest samples the defence is calibrated on.
    seed: seed of the server's unlearning noise and relabelling.
  """

  method: str = "first_order"
  first_order: unlearning.FirstOrderSettings = unlearning.FirstOrderSettings(
      reference_code=True)
  fine_tune: unlearning.FineTuneSettings = unlearning.FineTuneSettings()
  gradient_ascent: unlearning.GradientAscentSettings = (
      unlearning.GradientAscentSettings())
  defence: str = "none"
  false_rejection_rate: float = screening.DEFAULT_FALSE_REJECTION_RATE
  defence_seed: int = 0
  seed: int = 0

  def __post_init__(self):
    if not 0 < self.false_rejection_rate < 1:
      raise ValueError("false_rejection_rate must be in (0, 1), got "
                       f"{self.false_rejection_rate}.")

  def settings(self):
    """The settings of the chosen method: the field named after a built-in one
    (which flags write into), else a registered method's own defaults."""
    if self.method in METHOD_FIELDS:
      return getattr(self, self.method)
    return methods.get(self.method).settings_class()


METHOD_FIELDS = ("first_order", "fine_tune", "gradient_ascent")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything of an over-unlearning run (pushing, blending, fine-tune)."""

  train: TrainConfig = TrainConfig()
  samples: SamplesConfig = SamplesConfig()
  attack: AttackConfig = AttackConfig()
  server: ServerConfig = ServerConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
