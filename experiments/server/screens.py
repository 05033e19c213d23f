"""Server-side defences chosen by name (``--defence``): the screen a request passes.

A defence is ``scorer(ctx, calibration, rate) -> score(images, labels)`` (higher =
more suspicious), fitted on what the server legitimately holds (its training
images, its model, honest samples). ``build`` calibrates the chosen one at
``FALSE_REJECTION_RATE`` on honest training samples the user does not own and
returns it as the service's ``screens`` (``ounl_jax.service``, paper Sec. VII);
``none`` (the default, the paper's server) installs nothing. The defences
experiment (``experiments.defences``) measures every scorer here.

Adding a defence is one function here and one line in ``DEFENCES``.

>>> sorted(DEFENCES)
['exact_hash', 'margin', 'membership', 'none', 'perceptual_hash']
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from experiments.setup import configs
from experiments.run import pipeline
from ounl_jax import data as data_lib
from ounl_jax.defences import hashing
from ounl_jax.defences import margin
from ounl_jax.defences import membership
from ounl_jax.defences import screening

FALSE_REJECTION_RATE = 0.01   # The defences experiment's default (Sec. VII).
HONEST_SAMPLES = 2000         # Per half (calibration, evaluation); capped.


def jpeg_reencode(images: np.ndarray, quality: int) -> np.ndarray:
  """Each image through a JPEG encode/decode at ``quality`` (a re-encoding upload)."""
  out = []
  for image in hashing.quantise(images):
    buffer = io.BytesIO()
    squeeze = image.shape[-1] == 1
    Image.fromarray(image[..., 0] if squeeze else image).save(
        buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    out.append(decoded[..., None] if squeeze else decoded)
  return data_lib.to_unit_range(np.stack(out))


def honest_halves(train: data_lib.LabelledImages, exclude_ids: np.ndarray,
                  per_half: int, seed: int):
  """Two disjoint seeded sets of training samples the user does not own."""
  pool = np.flatnonzero(~np.isin(train.ids, exclude_ids))
  pool = np.random.default_rng(seed).permutation(pool)
  per_half = min(per_half, len(pool) // 2)
  return (train.take(np.sort(pool[:per_half])),
          train.take(np.sort(pool[per_half:2 * per_half])))


def _hash(kind: str):
  def scorer(ctx, calibration, rate):
    del calibration, rate
    registry = hashing.fit(hashing.HashSettings(kind=kind), ctx.splits.train.images)
    return lambda x, y: hashing.score(registry, x, y)
  return scorer


def _margin(ctx, calibration, rate):
  del calibration, rate
  detector = margin.fit(margin.MarginSettings(), ctx.trained.model,
                        ctx.trained.variables)
  return lambda x, y: margin.score(detector, x, y)


def fit_membership(ctx, calibration, rate) -> membership.MembershipCheck:
  return membership.fit(
      membership.MembershipSettings(rate), ctx.trained.model,
      ctx.trained.variables, (calibration.images, calibration.labels),
      (ctx.splits.valid.images, ctx.splits.valid.labels))


def _membership(ctx, calibration, rate):
  check = fit_membership(ctx, calibration, rate)
  return lambda x, y: membership.score(check, x, y)


DEFENCES = {"none": None, "exact_hash": _hash("exact"),
            "perceptual_hash": _hash("perceptual"), "margin": _margin,
            "membership": _membership}
REASONS = {"exact_hash": "not found among the hashes of the training images",
           "perceptual_hash": "no training image has a similar perceptual hash",
           "margin": "sits at the model's decision boundary",
           "membership": "its loss is that of a sample the model was not "
                         "trained on"}


def build(ctx: pipeline.Context, config: configs.ExperimentConfig,
          user_ids: np.ndarray, *, seed: int = 0) -> tuple:
  """The service's screens for ``config.server.defence`` (calibrated)."""
  name = config.server.defence
  if DEFENCES[name] is None:
    return ()
  calibration, _ = honest_halves(ctx.splits.train, user_ids, HONEST_SAMPLES, seed)
  score = DEFENCES[name](ctx, calibration, FALSE_REJECTION_RATE)
  threshold = screening.calibrate(score(calibration.images, calibration.labels),
                                  FALSE_REJECTION_RATE)
  return (screening.Screen(name, score, threshold, REASONS[name]),)
