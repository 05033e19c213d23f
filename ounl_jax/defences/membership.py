"""Membership check by per-sample loss (paper Sec. VII, "Membership Inference").

An honest request names training samples, which the model fits better than unseen
data (lower loss); a sample that does not look like a member is suspicious. The
score is the cross-entropy of the submitted label under the server's model,

    score(x, y) = -log p_y(x),

and the threshold between members (training samples) and non-members (the
validation split) is the usual loss-threshold attack (Yeom et al., 2018): ``fit``
records both loss distributions so an experiment can report how well the two
separate on this model; the service's threshold is still set on honest requests
with ``screening.calibrate`` (at most 1% of members rejected). The paper's caveat
holds: on a well-generalised model the two distributions overlap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ounl_jax import models
from ounl_jax.defences import _model
from ounl_jax.defences import screening


@dataclasses.dataclass(frozen=True)
class MembershipSettings:
  """Attributes:
    false_rejection_rate: fraction of members the fitted threshold rejects.
    batch_size: images per forward pass.
  """

  false_rejection_rate: float = screening.DEFAULT_FALSE_REJECTION_RATE
  batch_size: int = 500


class MembershipCheck(NamedTuple):
  """The model, the member-calibrated loss threshold and how it separates.

  Attributes:
    threshold: losses above it look like non-members (flagged).
    member_rejection_rate: members flagged at ``threshold`` (<= the setting).
    nonmember_detection_rate: validation (non-member) samples flagged.
    auc: ROC AUC of loss, non-members against members (0.5 = no signal).
  """

  settings: MembershipSettings
  model: models.Model
  variables: Any
  threshold: float
  member_rejection_rate: float
  nonmember_detection_rate: float
  auc: float


def losses(model: models.Model, variables, images, labels, *,
           batch_size: int = 500) -> np.ndarray:
  """Per-sample cross-entropy -log p_y(x) (inference mode)."""
  log_p = _model.log_probabilities(model, variables, images, batch_size=batch_size)
  labels = np.asarray(labels, np.int64)
  return -log_p[np.arange(len(labels)), labels]


def fit(settings: MembershipSettings, model: models.Model, variables,
        members: tuple[Any, Any], nonmembers: tuple[Any, Any]) -> MembershipCheck:
  """Calibrates the loss threshold on (images, labels) of members and non-members."""
  member_loss = losses(model, variables, *members, batch_size=settings.batch_size)
  other_loss = losses(model, variables, *nonmembers, batch_size=settings.batch_size)
  threshold = screening.calibrate(member_loss, settings.false_rejection_rate)
  return MembershipCheck(settings, model, variables, threshold,
                         screening.flag_rate(member_loss, threshold),
                         screening.flag_rate(other_loss, threshold),
                         screening.roc_auc(member_loss, other_loss))


def score(check: MembershipCheck, images, labels) -> np.ndarray:
  """The submitted label's cross-entropy per sample (higher = less member-like)."""
  return losses(check.model, check.variables, images, labels,
                batch_size=check.settings.batch_size)
