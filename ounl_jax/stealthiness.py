"""Stealthiness of modified unlearning samples: SSIM and LPIPS (App. D, Table XIII).

The paper measures how close each Pushing-I / Pushing-II sample stays to its original
with two perceptual metrics, as mean +- std over 50 random (original, modified)
CIFAR-10 pairs:

* **SSIM** (Wang et al., 2004), through ``dm_pix.ssim`` (a maintained implementation):
  a Gaussian window of size 11 and sigma 1.5, k1 = 0.01, k2 = 0.03, "valid" filtering,
  computed per channel and averaged over channels and positions, on images shifted
  from [-0.5, 0.5] to [0, 1] (``max_val=1``). 1 means identical.
* **LPIPS** (Zhang et al., 2018, version 0.1, AlexNet backbone, the ``lpips``
  package's default ``net='alex'``). For layers l = 1..5 (the ReLU outputs of
  AlexNet's five convolutions) with features f_l unit-normalised over channels,

    LPIPS(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f_l(x) - f_l(y))_{h,w,c}^2,

  with learned non-negative per-channel weights w_l (the ``lin`` layers; this is the
  paper's ||w_l * (f_l(x) - f_l(y))||^2 with the weights applied to the squared
  difference, exactly as the ``lpips`` package computes it, so its released weights
  reproduce its numbers). Inputs are scaled to [-1, 1] and then through LPIPS's
  ScalingLayer, (x - shift) / scale. 0 means identical.

The paper released no code for this analysis, and it does not say which SSIM window or
LPIPS backbone it used; the defaults above are the packages' defaults.

LPIPS needs pretrained weights (torchvision's ImageNet AlexNet and the LPIPS ``lin``
layers), which cannot be downloaded here: ``load_lpips_weights`` reads a ``.npz`` the
user converts once (see its docstring). ``random_lpips_params`` builds a random
network of the same structure for tests only; distances from it mean nothing.

Images everywhere are float32 NHWC in [-0.5, 0.5], the project's convention.
``load_lpips_weights`` is the one function here that reads a file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

# dm_pix.ssim settings (its defaults; Wang et al. 2004).
SSIM_SETTINGS = {"max_val": 1.0, "filter_size": 11, "filter_sigma": 1.5,
                 "k1": 0.01, "k2": 0.03}

# LPIPS ScalingLayer constants (lpips/pretrained_networks + lpips.py, version 0.1).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# AlexNet features (torchvision ``alexnet().features``): per convolution, its index in
# ``features``, kernel size, stride, padding, and whether a 3x3/2 max-pool precedes it.
ALEX_WIDTHS = (64, 192, 384, 256, 256)
_ALEX_CONVS = (
    # (torch index, kernel, stride, padding, max-pool before)
    (0, 11, 4, 2, False),
    (3, 5, 1, 2, True),
    (6, 3, 1, 1, True),
    (8, 3, 1, 1, False),
    (10, 3, 1, 1, False),
)
NUM_LPIPS_LAYERS = len(_ALEX_CONVS)

_NORMALIZE_EPS = 1e-10  # lpips.normalize_tensor

_HOW_TO_GET_WEIGHTS = """\
Convert the official weights once, on a machine with torch and the lpips package
(pip install lpips), with:

  import lpips, numpy as np
  sd = lpips.LPIPS(net="alex", version="0.1").state_dict()
  arrays = {"features." + k.split(".", 2)[2]: v.numpy()
            for k, v in sd.items() if k.startswith("net.slice")}
  arrays.update({k: v.numpy() for k, v in sd.items() if k.startswith("lin")})
  np.savez("lpips_alex.npz", **arrays)

and pass the file (e.g. --lpips_weights=lpips_alex.npz)."""


# ---------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------


def ssim(originals: jax.Array, modified: jax.Array) -> jax.Array:
  """Per-pair SSIM (Wang et al., 2004) through ``dm_pix.ssim``.

  Both inputs are shifted from [-0.5, 0.5] to [0, 1] and compared with ``max_val=1``,
  a Gaussian window of size 11 and sigma 1.5, k1 = 0.01 and k2 = 0.03 (dm-pix's
  defaults, ``SSIM_SETTINGS``). The SSIM map is computed per channel over "valid"
  window positions and averaged over positions and channels.

  Args:
    originals: (N, H, W, C) float images in [-0.5, 0.5] (H, W >= 11).
    modified: the modified images, same shape.

  Returns:
    (N,) SSIM values in [-1, 1]; 1 for identical images.

  Example:
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> ssim(x, x).tolist()
    [1.0, 1.0]
  """
  originals = jnp.asarray(originals, jnp.float32)
  modified = jnp.asarray(modified, jnp.float32)
  if originals.shape != modified.shape or originals.ndim != 4:
    raise ValueError("ssim needs two (N, H, W, C) batches of the same shape, got "
                     f"{originals.shape} and {modified.shape}.")
  return dm_pix.ssim(originals + 0.5, modified + 0.5, **SSIM_SETTINGS)


# ---------------------------------------------------------------------------
# LPIPS parameters
# ---------------------------------------------------------------------------


def lpips_param_shapes(widths: Sequence[int] = ALEX_WIDTHS) -> dict[str, tuple]:
  """The arrays ``load_lpips_weights`` expects: key -> shape (PyTorch layouts).

  With the default widths these are the official LPIPS 'alex' shapes:

    features.0.weight  (64, 3, 11, 11)    features.0.bias  (64,)
    features.3.weight  (192, 64, 5, 5)    features.3.bias  (192,)
    features.6.weight  (384, 192, 3, 3)   features.6.bias  (384,)
    features.8.weight  (256, 384, 3, 3)   features.8.bias  (256,)
    features.10.weight (256, 256, 3, 3)   features.10.bias (256,)
    lin0.model.1.weight (1, 64, 1, 1)     ...     lin4.model.1.weight (1, 256, 1, 1)

  Convolution weights are OIHW (torchvision's ``alexnet().features``); the ``lin``
  weights are the ``lpips`` package's 1x1 convolutions.

  Args:
    widths: output channels of the five convolutions.

  Returns:
    A dict from key name to shape.
  """
  _check_widths(widths)
  shapes = {}
  in_channels = 3
  for (index, kernel, _, _, _), width in zip(_ALEX_CONVS, widths):
    shapes[f"features.{index}.weight"] = (width, in_channels, kernel, kernel)
    shapes[f"features.{index}.bias"] = (width,)
    in_channels = width
  for layer, width in enumerate(widths):
    shapes[f"lin{layer}.model.1.weight"] = (1, width, 1, 1)
  return shapes


def lpips_params_from_arrays(arrays: Mapping[str, Any], *,
                             widths: Sequence[int] = ALEX_WIDTHS) -> dict[str, Any]:
  """Checks named arrays (``lpips_param_shapes``) and builds the params pytree.

  Extra keys (e.g. ``scaling_layer.shift``) are ignored.

  Args:
    arrays: key -> array, in the layout of ``lpips_param_shapes(widths)``.
    widths: the expected convolution widths (the official ones by default).

  Returns:
    ``{"conv": [{"w": OIHW, "b": (C,)}] * 5, "lin": [(C,)] * 5}`` of float32 arrays.

  Raises:
    ValueError: a key is missing or misshaped.
  """
  expected = lpips_param_shapes(widths)
  missing = [k for k in expected if k not in arrays]
  if missing:
    raise ValueError(f"LPIPS weights lack {len(missing)} of the {len(expected)} "
                     f"arrays needed, e.g. {missing[:3]}. Expected keys and shapes: "
                     f"{expected}.\n{_HOW_TO_GET_WEIGHTS}")
  wrong = {k: tuple(np.shape(arrays[k])) for k in expected
           if tuple(np.shape(arrays[k])) != expected[k]}
  if wrong:
    raise ValueError("LPIPS weights have the wrong shapes: "
                     + ", ".join(f"{k} is {s}, expected {expected[k]}"
                                 for k, s in wrong.items())
                     + f".\n{_HOW_TO_GET_WEIGHTS}")
  params = {"conv": [], "lin": []}
  for index, _, _, _, _ in _ALEX_CONVS:
    params["conv"].append({
        "w": jnp.asarray(arrays[f"features.{index}.weight"], jnp.float32),
        "b": jnp.asarray(arrays[f"features.{index}.bias"], jnp.float32)})
  for layer in range(NUM_LPIPS_LAYERS):
    lin = np.asarray(arrays[f"lin{layer}.model.1.weight"], np.float32).reshape(-1)
    params["lin"].append(jnp.asarray(lin))
  return params


def lpips_params_to_arrays(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of ``lpips_params_from_arrays``: the documented key -> array dict.

  Args:
    params: an LPIPS params pytree.

  Returns:
    key -> numpy array, ready for ``np.savez``.
  """
  arrays = {}
  for (index, _, _, _, _), conv in zip(_ALEX_CONVS, params["conv"]):
    arrays[f"features.{index}.weight"] = np.asarray(conv["w"])
    arrays[f"features.{index}.bias"] = np.asarray(conv["b"])
  for layer, lin in enumerate(params["lin"]):
    arrays[f"lin{layer}.model.1.weight"] = np.asarray(lin).reshape(1, -1, 1, 1)
  return arrays


def load_lpips_weights(path: str | os.PathLike, *,
                       widths: Sequence[int] = ALEX_WIDTHS) -> dict[str, Any]:
  """Reads pretrained LPIPS-alex weights from a user-provided ``.npz``.

  The file holds the arrays of ``lpips_param_shapes`` (torchvision AlexNet features in
  OIHW layout, ``features.{0,3,6,8,10}.{weight,bias}``, and the ``lpips`` package's
  ``lin{0..4}.model.1.weight`` of shape (1, C, 1, 1)). Nothing can be downloaded
  here; convert the official weights once with torch and ``pip install lpips``:

    import lpips, numpy as np
    sd = lpips.LPIPS(net="alex", version="0.1").state_dict()
    arrays = {"features." + k.split(".", 2)[2]: v.numpy()
              for k, v in sd.items() if k.startswith("net.slice")}
    arrays.update({k: v.numpy() for k, v in sd.items() if k.startswith("lin")})
    np.savez("lpips_alex.npz", **arrays)

  (LPIPS's ``net.sliceK.I.weight`` is torchvision's ``features.I.weight``.)

  Args:
    path: the ``.npz`` file.
    widths: expected convolution widths (the official AlexNet's by default; tests
      pass smaller ones).

  Returns:
    The params pytree for ``lpips``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: an array is missing or misshaped, or the file is not an npz.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No LPIPS weights at {path!r}.\n{_HOW_TO_GET_WEIGHTS}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError) as error:
    raise ValueError(f"{path!r} is not a readable .npz of LPIPS weights ({error})."
                     f"\n{_HOW_TO_GET_WEIGHTS}") from error
  return lpips_params_from_arrays(arrays, widths=widths)


def random_lpips_params(key: jax.Array, *,
                        widths: Sequence[int] = ALEX_WIDTHS) -> dict[str, Any]:
  """A randomly initialised LPIPS network of the same structure. FOR TESTS ONLY.

  Distances computed with these parameters are NOT LPIPS: they have no perceptual
  meaning and must never be reported. They only exercise the code path (identity,
  symmetry, non-negativity, growth with the perturbation).

  Args:
    key: PRNG key.
    widths: output channels of the five convolutions (e.g. ``(8,) * 5`` for speed).

  Returns:
    An LPIPS params pytree (He-normal convolutions, zero biases, uniform [0, 1) lin
    weights).
  """
  shapes = lpips_param_shapes(widths)
  weight_shapes = [shapes[f"features.{index}.weight"] for index, *_ in _ALEX_CONVS]
  sizes = [int(np.prod(shape)) for shape in weight_shapes]
  # Two draws in all (each jax.random call compiles once; keeps tests fast).
  weight_key, lin_key = jax.random.split(key)
  flat = np.asarray(jax.random.normal(weight_key, (sum(sizes),)), np.float32)
  lins = np.asarray(jax.random.uniform(lin_key, (sum(widths),)), np.float32)
  weights = np.split(flat, np.cumsum(sizes)[:-1])
  params = {"conv": [], "lin": []}
  for weight, shape in zip(weights, weight_shapes):
    fan_in = shape[1] * shape[2] * shape[3]
    params["conv"].append({
        "w": jnp.asarray(weight.reshape(shape) * np.sqrt(2.0 / fan_in)),
        "b": jnp.zeros(shape[0], jnp.float32)})
  params["lin"] = [jnp.asarray(lin)
                   for lin in np.split(lins, np.cumsum(widths)[:-1])]
  return params


def _check_widths(widths: Sequence[int]) -> None:
  if len(widths) != NUM_LPIPS_LAYERS or any(int(w) < 1 for w in widths):
    raise ValueError(f"LPIPS-alex has {NUM_LPIPS_LAYERS} convolutions; got widths "
                     f"{tuple(widths)}.")


# ---------------------------------------------------------------------------
# LPIPS distance
# ---------------------------------------------------------------------------


def _max_pool(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(kernel_size=3, stride=2), no padding, NHWC."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), "VALID")


def alexnet_features(params: Mapping[str, Any], x: jax.Array) -> list[jax.Array]:
  """The five LPIPS taps (relu1..relu5) of AlexNet's features, NHWC.

  Args:
    params: an LPIPS params pytree.
    x: (N, H, W, 3) inputs already through the ScalingLayer.

  Returns:
    Five (N, h_l, w_l, C_l) activations.
  """
  taps = []
  for (_, _, stride, padding, pool_before), conv in zip(_ALEX_CONVS, params["conv"]):
    if pool_before:
      x = _max_pool(x)
    x = jax.lax.conv_general_dilated(
        x, conv["w"], window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    x = jax.nn.relu(x + conv["b"])
    taps.append(x)
  return taps


def _scale_input(images: jax.Array) -> jax.Array:
  """[-0.5, 0.5] -> [-1, 1] -> LPIPS ScalingLayer."""
  shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
  scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
  return (2.0 * jnp.asarray(images, jnp.float32) - shift) / scale


def _unit_normalize(features: jax.Array) -> jax.Array:
  """lpips.normalize_tensor: divide by the channel L2 norm (+1e-10)."""
  norm = jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True))
  return features / (norm + _NORMALIZE_EPS)


@jax.jit
def lpips(params: Mapping[str, Any], originals: jax.Array,
          modified: jax.Array) -> jax.Array:
  """Per-pair LPIPS distance (Zhang et al., 2018; v0.1, AlexNet).

  ``sum_l mean_{h,w} sum_c w_{l,c} (n(f_l(x)) - n(f_l(y)))^2`` where ``n`` divides by
  the channel norm; see the module docstring. Only meaningful with pretrained weights
  from ``load_lpips_weights``.

  Args:
    params: LPIPS params (``load_lpips_weights``; ``random_lpips_params`` in tests).
    originals: (N, H, W, 3) images in [-0.5, 0.5]; CIFAR's 32x32 works (the deepest
      taps are then 1x1).
    modified: the modified images, same shape.

  Returns:
    (N,) distances, non-negative (the lin weights are); exactly 0 for identical
    images.
  """
  num = originals.shape[0]
  both = jnp.concatenate([jnp.asarray(originals), jnp.asarray(modified)], axis=0)
  total = jnp.zeros(num, jnp.float32)
  for features, lin in zip(alexnet_features(params, _scale_input(both)),
                           params["lin"]):
    fx, fy = features[:num], features[num:]
    difference = _unit_normalize(fx) - _unit_normalize(fy)
    # XLA's vectorised and scalar division paths can round the same normalisation
    # differently (~1e-8), which would make d(x, x) ~1e-15. Where the raw features
    # and their norms are equal the exact difference is 0, so use it.
    same_norm = (jnp.sum(fx**2, axis=-1, keepdims=True)
                 == jnp.sum(fy**2, axis=-1, keepdims=True))
    difference = jnp.where((fx == fy) & same_norm, 0.0, difference)
    total = total + jnp.mean(jnp.sum(difference**2 * lin, axis=-1), axis=(1, 2))
  return total


# ---------------------------------------------------------------------------
# Pairs and summaries
# ---------------------------------------------------------------------------


def sample_pairs(key: jax.Array, count: int, n: int = 50) -> np.ndarray:
  """Seeded indices of ``min(n, count)`` distinct pairs out of ``count``.

  Args:
    key: PRNG key.
    count: how many pairs there are to draw from.
    n: how many to draw (the paper: 50).

  Returns:
    Sorted int array of distinct indices in [0, count).
  """
  if count < 0 or n < 0:
    raise ValueError(f"count and n must be non-negative, got {count} and {n}.")
  size = min(n, count)
  if size == 0:
    return np.zeros((0,), np.int64)
  chosen = jax.random.choice(key, count, (size,), replace=False)
  return np.sort(np.asarray(chosen, np.int64))


def summarize(values: Any) -> dict[str, float | int | None]:
  """Mean, (population, ``np.std``) standard deviation and count of a metric.

  Args:
    values: a 1-D sequence of per-pair values.

  Returns:
    ``{"mean", "std", "count"}``; mean and std are None when there are no values.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    return {"mean": None, "std": None, "count": 0}
  return {"mean": float(np.mean(values)), "std": float(np.std(values)),
          "count": int(values.size)}
