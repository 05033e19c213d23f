"""Utility guard: unlearn tentatively, keep it only if accuracy holds (paper Sec. VII:
"monitor the run-time model performance during deployment").

The server evaluates the tentatively unlearned model on a held-out split it owns
(never the split it reports on) and refuses the request, keeping the previous
model, when overall accuracy or any class's accuracy has fallen more than a bound
below the accuracies of the model the guard was fitted on (the clean model). The
drops are cumulative, so splitting an attack into many small requests does not
slip under a per-request bound; an honest request that unlearns part of a class
costs that class some accuracy, which the class bound must leave room for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ounl_jax import evaluation
from ounl_jax import models


@dataclasses.dataclass(frozen=True)
class UtilitySettings:
  """Attributes:
    max_overall_drop: largest allowed fall in overall held-out accuracy (absolute).
    max_class_drop: largest allowed fall in any one class's held-out accuracy.
  """

  max_overall_drop: float = 0.05
  max_class_drop: float = 0.15


class UtilityGuard(NamedTuple):
  """The held-out split and the fitted model's accuracies on it."""

  settings: UtilitySettings
  model: models.Model
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  accuracy: float
  per_class_accuracy: np.ndarray


class GuardVerdict(NamedTuple):
  """The tentative model against the baseline (drops are baseline - now)."""

  ok: bool
  accuracy: float
  per_class_accuracy: np.ndarray
  overall_drop: float
  class_drops: np.ndarray
  worst_class: int
  reason: str

  def summary(self) -> dict:
    return {"ok": self.ok, "accuracy": self.accuracy,
            "overall_drop": self.overall_drop,
            "worst_class": self.worst_class,
            "worst_class_drop": float(self.class_drops[self.worst_class]),
            "reason": self.reason}


def _accuracies(model, variables, images, labels, num_classes):
  predictions = evaluation.predict_labels(model, variables, images)
  return (evaluation.accuracy(predictions, labels),
          evaluation.per_class_accuracy(predictions, labels, num_classes))


def fit(settings: UtilitySettings, model: models.Model, variables, images,
        labels) -> UtilityGuard:
  """Measures the baseline accuracies of ``variables`` on the held-out split."""
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  accuracy, per_class = _accuracies(model, variables, images, labels,
                                    model.num_classes)
  return UtilityGuard(settings, model, images, labels, model.num_classes, accuracy,
                      per_class)


def check(guard: UtilityGuard, variables) -> GuardVerdict:
  """Whether ``variables`` stays within the bounds of the baseline."""
  accuracy, per_class = _accuracies(guard.model, variables, guard.images,
                                    guard.labels, guard.num_classes)
  overall_drop = guard.accuracy - accuracy
  drops = guard.per_class_accuracy - per_class
  # Classes absent from the held-out split (NaN) cannot be judged.
  judged = np.where(np.isnan(drops), -np.inf, drops)
  worst = int(np.argmax(judged))
  settings = guard.settings
  reasons = []
  if overall_drop > settings.max_overall_drop:
    reasons.append(f"held-out accuracy would fall by {overall_drop:.1%} "
                   f"({guard.accuracy:.1%} -> {accuracy:.1%}), more than the "
                   f"{settings.max_overall_drop:.1%} allowed")
  if judged[worst] > settings.max_class_drop:
    reasons.append(f"class {worst}'s held-out accuracy would fall by "
                   f"{drops[worst]:.1%} ({guard.per_class_accuracy[worst]:.1%} -> "
                   f"{per_class[worst]:.1%}), more than the "
                   f"{settings.max_class_drop:.1%} allowed")
  return GuardVerdict(not reasons, accuracy, per_class, float(overall_drop), drops,
                      worst, "; ".join(reasons))
