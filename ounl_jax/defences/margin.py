"""Boundary-margin detector (paper Sec. VII, "Other Defences": anomaly detection).

Pushing (Sec. IV-B) moves a sample to the server model's decision boundary:
Pushing-I stops just before the prediction changes, Pushing-II just after. There
the top two class probabilities are nearly equal, while the training samples an
honest user asks to forget are mostly classified with confidence. The score is

    score(x) = -(p_(1)(x) - p_(2)(x)),

the negated gap between the largest and second-largest softmax probability under
the server's model (in [-1, 0]; higher = closer to the boundary = more suspicious).
It needs no query budget: the server runs its own model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ounl_jax import models
from ounl_jax.defences import _model


@dataclasses.dataclass(frozen=True)
class MarginSettings:
  """Attributes:
    batch_size: images per forward pass.
  """

  batch_size: int = 500


class MarginDetector(NamedTuple):
  """The model the margins are measured with (the server's, at fit time)."""

  settings: MarginSettings
  model: models.Model
  variables: Any


def fit(settings: MarginSettings, model: models.Model, variables) -> MarginDetector:
  """Binds the server's model; nothing to learn."""
  return MarginDetector(settings, model, variables)


def margins(probabilities: np.ndarray) -> np.ndarray:
  """Top-1 minus top-2 probability per row."""
  top2 = np.sort(np.asarray(probabilities, np.float64), axis=-1)[:, -2:]
  return top2[:, 1] - top2[:, 0]


def score(detector: MarginDetector, images, labels=None) -> np.ndarray:
  """-(top-1 - top-2 probability) per sample; labels unused."""
  del labels
  log_p = _model.log_probabilities(detector.model, detector.variables, images,
                                   batch_size=detector.settings.batch_size)
  return -margins(np.exp(log_p))
