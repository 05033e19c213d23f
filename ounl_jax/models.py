"""The paper's models (App. B; docs/protocol.md §2), returning logits.

The module system (Flax Linen) stays inside this file. Everything else sees a
``Model`` with ``init(key) -> variables`` and a pure
``apply(variables, x, *, train=False, rngs=None)``:

* ``train=False`` (inference: BatchNorm running statistics, no dropout) returns logits;
* ``train=True`` (dropout on, BatchNorm batch statistics) returns
  ``(logits, new_batch_stats)``; ``rngs`` is the dropout key.

Layer order follows the released Keras code: Conv -> ReLU -> BatchNorm (BN after the
activation), BN momentum 0.99 / epsilon 1e-3, he_uniform conv and hidden-dense init,
glorot_uniform output layer, zero biases.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

HE_UNIFORM = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
GLOROT_UNIFORM = nn.initializers.glorot_uniform()
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

# Dropout after VGG block k (docs/protocol.md §2.1 gives 0.1/0.1/0.2 for three blocks; deeper
# blocks continue the progression).
VGG_DROPOUT = (0.1, 0.1, 0.2, 0.2, 0.3)

# The classifier head: the last dense layer, its BatchNorm and the output layer. This
# is the "last 6 trainable tensors" that the released first-order update touches
# (docs/protocol.md §5).
HEAD_LAYERS = ("head_dense", "head_bn", "logits")


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.99,
                      epsilon=1e-3, name=name)


class VGG(nn.Module):
  """VGG with ``num_blocks`` blocks of two 3x3 convolutions (App. B, docs/protocol.md §2.1)."""

  num_blocks: int
  num_classes: int
  width: int = 128
  dense_width: int = 512

  @nn.compact
  def __call__(self, x, train: bool = False):
    for block in range(self.num_blocks):
      for _ in range(2):
        x = nn.Conv(self.width, (3, 3), padding="SAME", kernel_init=HE_UNIFORM)(x)
        x = nn.relu(x)
        x = _batch_norm(train)(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Dropout(VGG_DROPOUT[block], deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.dense_width, kernel_init=HE_UNIFORM, name="head_dense")(x)
    x = nn.relu(x)
    x = _batch_norm(train, name="head_bn")(x)
    return nn.Dense(self.num_classes, kernel_init=GLOROT_UNIFORM, name="logits")(x)


class ResidualBlock(nn.Module):
  """conv-BN-ReLU-conv-BN, add the (optionally downsampled) input, ReLU."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    shortcut = x
    y = nn.Conv(self.features, (3, 3), strides=self.stride, padding="SAME",
                use_bias=False, kernel_init=HE_NORMAL)(x)
    y = nn.relu(_batch_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False,
                kernel_init=HE_NORMAL)(y)
    y = _batch_norm(train)(y)
    if self.stride != 1 or shortcut.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride,
                         use_bias=False, kernel_init=HE_NORMAL)(shortcut)
      shortcut = _batch_norm(train)(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """The paper's ResNet (App. B; docs/protocol.md §2.3).

  Stem conv 64 -> BN -> ReLU, two residual blocks of 64, one of 128 with a 1x1
  stride-2 downsample (added, as in the released code), global average pooling, a
  hidden dense layer (ReLU, not the released code's softmax, docs/protocol.md §16.12), BN and
  the output layer.
  """

  num_classes: int
  width: int = 64
  dense_width: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False,
                kernel_init=HE_NORMAL)(x)
    x = nn.relu(_batch_norm(train)(x))
    x = ResidualBlock(self.width)(x, train)
    x = ResidualBlock(self.width)(x, train)
    x = ResidualBlock(2 * self.width, stride=2)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.dense_width, kernel_init=HE_UNIFORM, name="head_dense")(x)
    x = nn.relu(x)
    x = _batch_norm(train, name="head_bn")(x)
    return nn.Dense(self.num_classes, kernel_init=GLOROT_UNIFORM, name="logits")(x)


class Model(NamedTuple):
  """A model seen as pure functions.

  Attributes:
    name: ``vgg3``, ``vgg4``, ``vgg5`` or ``resnet``.
    init: ``init(key) -> variables`` (``{'params', 'batch_stats'}``).
    apply: ``apply(variables, x, *, train=False, rngs=None)``; see the module doc.
    input_shape: (H, W, C).
    num_classes: number of outputs.
  """

  name: str
  init: Callable[[jax.Array], Any]
  apply: Callable[..., Any]
  input_shape: tuple[int, int, int]
  num_classes: int


MODEL_NAMES = ("vgg3", "vgg4", "vgg5", "resnet")


def _module(name: str, num_classes: int, width: int | None) -> nn.Module:
  if name.startswith("vgg"):
    width = 128 if width is None else width
    return VGG(num_blocks=int(name[3:]), num_classes=num_classes, width=width,
               dense_width=4 * width)
  width = 64 if width is None else width
  return ResNet(num_classes=num_classes, width=width, dense_width=2 * width)


def check_model_name(name: str) -> str:
  """The canonical model name; ValueError naming the closest choice otherwise."""
  key = name.lower()
  if key not in MODEL_NAMES:
    close = difflib.get_close_matches(key, MODEL_NAMES, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Choose one of: "
                     f"{', '.join(MODEL_NAMES)} (e.g. --model=vgg3).")
  return key


def get_model(name: str, *, num_classes: int,
              input_shape: Sequence[int] = (32, 32, 3),
              width: int | None = None) -> Model:
  """The paper's model by name.

  Args:
    name: ``vgg3`` (the main model), ``vgg4``, ``vgg5`` or ``resnet``.
    num_classes: number of classes of the dataset.
    input_shape: (H, W, C) of one image.
    width: convolution filters (VGG default 128, ResNet 64); the hidden dense layer
      scales with it (VGG 4x = 512, ResNet 2x = 128). Smaller widths are for CPU.

  Raises:
    ValueError: unknown model name, naming the choices.
  """
  key = check_model_name(name)
  if width is not None and width < 1:
    raise ValueError(f"width must be >= 1, got {width} (None: the paper's width).")
  module = _module(key, num_classes, width)
  input_shape = tuple(int(d) for d in input_shape)

  def init(rng: jax.Array):
    dummy = jnp.zeros((1,) + input_shape, jnp.float32)
    return dict(module.init({"params": rng}, dummy, train=False))

  def apply(variables, x, *, train: bool = False, rngs=None):
    if not train:
      return module.apply(variables, x, train=False)
    if rngs is not None and not isinstance(rngs, dict):
      rngs = {"dropout": rngs}
    logits, updates = module.apply(variables, x, train=True, rngs=rngs,
                                   mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  return Model(key, init, apply, input_shape, num_classes)


def count_params(params) -> int:
  """Number of trainable scalars (the Keras ``trainable_params`` count)."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def head_mask(params) -> Any:
  """A boolean pytree: True on the classifier head (``HEAD_LAYERS``).

  The head is the last dense layer, its BatchNorm scale/bias and the output layer,
  i.e. the "last 6 trainable tensors" of the released first-order update
  (docs/protocol.md §5).
  """
  return {k: jax.tree_util.tree_map(lambda _, k=k: k in HEAD_LAYERS, v)
          for k, v in params.items()}


def predict_probabilities(model: Model, variables, x) -> jax.Array:
  """Softmax probabilities in inference mode (what the released model outputs)."""
  return jax.nn.softmax(model.apply(variables, x))
