"""Screening unlearning requests: thresholds, rates, ROC AUC and the service hook.

Every detector of this package (paper Sec. VII, "Possible Defence") has the same
shape: a frozen settings dataclass, ``fit(settings, ...)`` on what the server
legitimately holds, and ``score(fitted, images, labels) -> (N,)`` per-sample scores,
higher meaning more suspicious. A sample is flagged when its score is strictly above
a threshold, and ``calibrate`` picks the threshold so that at most a given fraction
(1% by default) of honest samples is flagged.

``Screen`` packs a fitted detector and its threshold for
``UnlearningService(..., screens=...)``; ``apply_screens`` is what the service runs
before any unlearning.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

DEFAULT_FALSE_REJECTION_RATE = 0.01


def _binomial_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
  if p <= 0.0:
    return 1.0
  log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
               + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
  top = max(log_terms)
  return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def exceedances_allowed(n: int, rate: float, confidence: float | None) -> int:
  """How many of n honest scores may lie above the threshold.

  Without ``confidence``: floor(rate * n), the empirical quantile (its true false
  rejection on new honest samples is about ``rate`` on average, and above it about
  half the time). With it: the largest k with P(Binomial(n, rate) <= k) <= 1 -
  confidence. The true rejection rate of the threshold with k of n above it is
  Beta(k + 1, n - k) distributed, and P(Beta(k + 1, n - k) > rate) = P(Binomial(n,
  rate) <= k), so it stays at most ``rate`` with probability ``confidence``
  (0 when n is too small for that: the largest score).

  >>> exceedances_allowed(2000, 0.01, None), exceedances_allowed(2000, 0.01, 0.95)
  (20, 12)
  >>> exceedances_allowed(100, 0.05, 0.95), exceedances_allowed(10, 0.01, 0.95)
  (1, 0)
  """
  if confidence is None:
    return math.floor(rate * n + 1e-9)
  k = 0
  while k + 1 < n and _binomial_cdf(k + 1, n, rate) <= 1.0 - confidence:
    k += 1
  return k


def calibrate(honest_scores, rate: float = DEFAULT_FALSE_REJECTION_RATE, *,
              confidence: float | None = None) -> float:
  """The threshold flagging at most ``rate`` of honest samples (flag: s > t).

  With n honest scores sorted ascending and k = ``exceedances_allowed(n, rate,
  confidence)``, the threshold is the (n - k)-th smallest score: at most k scores
  lie strictly above it (fewer when scores tie at the threshold, e.g. a binary
  score). ``confidence`` (say 0.95) holds ``rate`` on new honest samples with that
  probability instead of on the calibration samples.
  """
  scores = np.sort(np.asarray(honest_scores, np.float64).ravel())
  if not len(scores):
    raise ValueError("calibrate needs at least one honest score.")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate must be in [0, 1), got {rate}.")
  if confidence is not None and not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  if not np.isfinite(scores).all():
    raise ValueError("Honest scores must be finite.")
  k = exceedances_allowed(len(scores), rate, confidence)
  return float(scores[len(scores) - 1 - k])


def flagged(scores, threshold: float) -> np.ndarray:
  """Boolean mask of the suspicious samples (score strictly above threshold)."""
  return np.asarray(scores, np.float64) > threshold


def flag_rate(scores, threshold: float) -> float:
  """Fraction flagged: the false-rejection rate on honest samples, the detection
  rate on attack samples."""
  scores = np.asarray(scores)
  return float(np.mean(flagged(scores, threshold))) if len(scores) else float("nan")


def roc_auc(honest_scores, attack_scores) -> float:
  """Probability that an attack sample scores above an honest one (ties count 1/2).

  The Mann-Whitney U statistic divided by n_honest * n_attack, via average ranks.
  """
  honest = np.asarray(honest_scores, np.float64).ravel()
  attack = np.asarray(attack_scores, np.float64).ravel()
  if not len(honest) or not len(attack):
    return float("nan")
  both = np.concatenate([honest, attack])
  order = np.argsort(both, kind="mergesort")
  ranks = np.empty(len(both), np.float64)
  ranks[order] = np.arange(1, len(both) + 1)
  # Average the ranks of tied scores.
  values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
  sums = np.zeros(len(values))
  np.add.at(sums, inverse, ranks)
  ranks = (sums / counts)[inverse]
  u = ranks[len(honest):].sum() - len(attack) * (len(attack) + 1) / 2
  return float(u / (len(honest) * len(attack)))


def roc_curve(honest_scores, attack_scores) -> tuple[np.ndarray, np.ndarray]:
  """(false-rejection rates, detection rates) over every distinct threshold."""
  honest = np.asarray(honest_scores, np.float64).ravel()
  attack = np.asarray(attack_scores, np.float64).ravel()
  thresholds = np.concatenate([[np.inf], np.unique(np.concatenate(
      [honest, attack]))[::-1], [-np.inf]])
  fpr = np.array([np.mean(honest > t) for t in thresholds])
  tpr = np.array([np.mean(attack > t) for t in thresholds])
  return fpr, tpr


# ----------------------------------------------------------------------------------
# The service hook

PARTIAL_POLICIES = ("refuse", "drop")


class Screen(NamedTuple):
  """A fitted detector and its threshold, as the service runs it.

  Attributes:
    name: shown in refusals and receipts (e.g. ``"margin"``).
    score: ``score(images, labels) -> (N,)`` scores, higher = more suspicious
      (a fitted detector's ``score`` with its fitted state bound).
    threshold: samples scoring strictly above it are flagged.
    reason: what a flag means, for the user (e.g. "sits at the decision boundary").
  """

  name: str
  score: Callable[[np.ndarray, np.ndarray], np.ndarray]
  threshold: float
  reason: str


class ScreenOutcome(NamedTuple):
  """One screen's verdict on a request: its scores and the flagged indices."""

  name: str
  threshold: float
  scores: np.ndarray
  flagged: tuple[int, ...]
  reason: str

  def summary(self) -> dict:
    return {"screen": self.name, "threshold": self.threshold,
            "flagged": len(self.flagged), "flagged_indices": list(self.flagged),
            "reason": self.reason}


def apply_screens(screens: Sequence[Screen], images: np.ndarray,
                  labels: np.ndarray) -> tuple[ScreenOutcome, ...]:
  """Runs every screen on the whole request (paper Sec. VII defences)."""
  outcomes = []
  for screen in screens:
    scores = np.asarray(screen.score(images, labels), np.float64)
    if scores.shape != (len(labels),):
      raise ValueError(f"Screen {screen.name!r} returned scores of shape "
                       f"{scores.shape}; expected ({len(labels)},).")
    indices = tuple(int(i) for i in np.flatnonzero(flagged(scores,
                                                          screen.threshold)))
    outcomes.append(ScreenOutcome(screen.name, float(screen.threshold), scores,
                                  indices, screen.reason))
  return tuple(outcomes)


def keep_mask(outcomes: Sequence[ScreenOutcome], count: int) -> np.ndarray:
  """Samples that no screen flagged."""
  keep = np.ones(count, bool)
  for outcome in outcomes:
    keep[list(outcome.flagged)] = False
  return keep
