"""Server-side per-sample defences, one ``DefenceSpec`` each (``--defence``).

A defence's ``fit(ctx, calibration, rate)`` returns a ``Scorer``: ``score(images,
labels)`` (higher = more suspicious), fitted on what the server legitimately holds
(its training images, its model, honest samples), and optional ``details`` of the
fit for the report. ``build`` calibrates the chosen one at the false-rejection rate
on honest training samples the user does not own and returns it as the service's
``screens`` (``ounl_jax.service``, paper Sec. VII); ``none`` (the default, the
paper's server) installs nothing. The defences study (``experiments.defences``)
measures every registered defence.

Registering is one call, from anywhere (research code included)::

    screens.register_defence(screens.DefenceSpec(
        "my_screen", "My screen", fit=fit_my_screen,
        reason="looks like nothing the server trained on"))

>>> sorted(DEFENCES)
['exact_hash', 'margin', 'membership', 'perceptual_hash']
>>> defence_choices()[0]
'none'
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, NamedTuple

import numpy as np
from PIL import Image

from experiments.run import pipeline
from experiments.setup import configs
from ounl_jax import data as data_lib
from ounl_jax.defences import hashing
from ounl_jax.defences import margin
from ounl_jax.defences import membership
from ounl_jax.defences import screening

NO_DEFENCE = "none"
HONEST_SAMPLES = 2000         # Per half (calibration, evaluation); capped.


class Scorer(NamedTuple):
  """A fitted defence: ``score(images, labels) -> (N,)`` and what its fit found."""

  score: Callable[[np.ndarray, np.ndarray], np.ndarray]
  details: dict | None = None


@dataclasses.dataclass(frozen=True)
class DefenceSpec:
  """Everything downstream code needs of a per-sample defence.

  Attributes:
    name: the registry key and ``--defence`` value.
    display_name: its name in defences.md and the ROC figure.
    fit: ``fit(ctx, calibration, rate) -> Scorer`` (or a bare score function).
    reason: why a flagged sample is refused (the refusal's message).
  """

  name: str
  display_name: str
  fit: Callable[..., Any]
  reason: str

  def scorer(self, ctx, calibration, rate: float) -> Scorer:
    """The fitted defence (a bare score function becomes a ``Scorer``)."""
    fitted = self.fit(ctx, calibration, rate)
    return fitted if isinstance(fitted, Scorer) else Scorer(fitted)


DEFENCES: dict[str, DefenceSpec] = {}


def register_defence(spec: DefenceSpec) -> DefenceSpec:
  """Adds ``spec`` (its name must be new); ``--defence=NAME`` then installs it."""
  if spec.name in DEFENCES or spec.name == NO_DEFENCE:
    raise ValueError(f"A defence named {spec.name!r} is already registered.")
  DEFENCES[spec.name] = spec
  return spec


def defence_choices() -> tuple[str, ...]:
  """``--defence`` values: ``none`` and every registered defence."""
  return (NO_DEFENCE, *DEFENCES)


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


def honest_requests(pool: data_lib.LabelledImages, size: int, count: int,
                    num_classes: int, seed: int) -> list:
  """``count`` seeded single-class requests of up to ``size`` samples (the classes
  present in ``pool`` in turn)."""
  rng = np.random.default_rng(seed)
  present = [c for c in range(num_classes) if np.any(pool.labels == c)]
  requests = []
  for i in range(count):
    members = np.flatnonzero(pool.labels == present[i % len(present)])
    chosen = np.sort(rng.choice(members, min(size, len(members)), replace=False))
    requests.append(pool.take(chosen))
  return requests


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


def _membership(ctx, calibration, rate) -> Scorer:
  check = fit_membership(ctx, calibration, rate)
  return Scorer(lambda x, y: membership.score(check, x, y), {
      "auc_members_vs_validation": check.auc,
      "validation_flagged": check.nonmember_detection_rate,
      "members_flagged": check.member_rejection_rate})


for _spec in (
    DefenceSpec("exact_hash", "Hash registry (exact sha256)", _hash("exact"),
                "not found among the hashes of the training images"),
    DefenceSpec("perceptual_hash", "Hash registry (perceptual pHash)",
                _hash("perceptual"),
                "no training image has a similar perceptual hash"),
    DefenceSpec("margin", "Boundary margin", _margin,
                "sits at the model's decision boundary"),
    DefenceSpec("membership", "Membership (loss)", _membership,
                "its loss is that of a sample the model was not trained on"),
):
  register_defence(_spec)


def build(ctx: pipeline.Context, config: configs.ExperimentConfig,
          user_ids: np.ndarray) -> tuple:
  """The service's screens for ``config.server.defence``, calibrated at
  ``config.server.false_rejection_rate`` on honest samples drawn with
  ``config.server.defence_seed``."""
  server = config.server
  if server.defence == NO_DEFENCE:
    return ()
  spec = DEFENCES[server.defence]
  calibration, _ = honest_halves(ctx.splits.train, user_ids, HONEST_SAMPLES,
                                 server.defence_seed)
  score = spec.scorer(ctx, calibration, server.false_rejection_rate).score
  threshold = screening.calibrate(score(calibration.images, calibration.labels),
                                  server.false_rejection_rate)
  return (screening.Screen(spec.name, score, threshold, spec.reason),)
