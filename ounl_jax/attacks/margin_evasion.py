"""Adaptive pushing against a boundary-margin screen (not in the paper).

A server that screens requests with the margin detector (``ounl_jax/defences/
margin.py``: top-1 minus top-2 probability) flags the samples that sit at its
decision boundary, which is where Pushing puts them (docs/protocol.md §8.2). An
attacker who knows that moves each pushed sample along its own push direction
``d = x_pushed - x`` to the point where the oracle's probability margin is at least
``kappa``:

* **Pushing-I** (still class A): back off towards the original,
  ``x(t) = x + t d`` with the largest ``t`` in [0, 1] whose prediction is A and
  whose margin is at least ``kappa`` (bisection, ``search_steps`` queries).
* **Pushing-II** (across): overshoot past the boundary, the smallest ``t >= 1``
  whose prediction is not A (the target, if targeted) and whose margin is at least
  ``kappa``, found by doubling ``t`` and then bisection, with
  ``||x(t) - x||_2 <= max_l2`` (the pushing bound, Sec. IV-B).

Every probe is one counted oracle query (probabilities); samples whose search
fails keep ``success`` False. The cost is a few dozen queries per sample on top of
the push, against the thousands a fresh ZOO push at ``stop_margin = kappa``
(``PushSettings.stop_margin``) costs. ``kappa = 0`` returns the push as it is.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from ounl_jax import oracle as oracle_lib


@dataclasses.dataclass(frozen=True)
class MarginEvasionSettings:
  """Attributes:
    kappa: the probability margin (top-1 minus top-2) the submitted samples keep.
    max_l2: the pushing bound on ``||x' - x||_2``.
    search_steps: bisection queries per sample.
    max_doublings: how often Pushing-II's ``t`` may double before giving up.
    batch_size: images per oracle query.
  """

  kappa: float = 0.1
  max_l2: float = 20.0
  search_steps: int = 10
  max_doublings: int = 6
  batch_size: int = 256

  def __post_init__(self):
    if not 0.0 <= self.kappa < 1.0:
      raise ValueError(f"kappa={self.kappa} must be in [0, 1) (a probability margin).")
    if self.max_l2 <= 0 or self.search_steps < 1 or self.max_doublings < 0:
      raise ValueError("max_l2 must be > 0, search_steps >= 1, max_doublings >= 0.")


class Evaded(NamedTuple):
  """Samples moved to margin ``kappa``; ``images`` are NaN where not a success."""

  images: np.ndarray
  success: np.ndarray
  scale: np.ndarray       # t of the chosen point x + t d (NaN where failed).
  l2: np.ndarray
  margin: np.ndarray      # the oracle's margin at the chosen point.
  queries: np.ndarray     # per-sample probes answered.
  oracle_state: oracle_lib.OracleState


def _flat(x: np.ndarray) -> np.ndarray:
  """(N, ...) -> (N, D), also for N = 0."""
  return x.reshape(len(x), int(np.prod(x.shape[1:])))


def _probabilities(oracle, state, images, batch_size):
  answers = []
  for start in range(0, len(images), batch_size):
    out, state = oracle.query(state, images[start:start + batch_size])
    oracle_lib.check_budget(oracle, state)
    answers.append(np.asarray(out, np.float64))
  return np.concatenate(answers), state


def _accepts(probabilities, class_a, target, inside: bool, kappa: float):
  """The predicate of docs/protocol.md §16: right side of A and margin >= kappa."""
  top2 = np.sort(probabilities, axis=-1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]
  predicted = probabilities.argmax(-1)
  side = predicted == class_a if inside else (
      predicted != class_a if target is None else predicted == target)
  return side & (margin >= kappa), margin


class _Probe:
  """Counts and answers probes ``x + t d`` for the samples still searching."""

  def __init__(self, oracle, state, originals, directions, class_a, target,
               settings, inside):
    self.oracle, self.state, self.settings = oracle, state, settings
    self.originals, self.directions = originals, directions
    self.class_a, self.target, self.inside = class_a, target, inside
    self.queries = np.zeros(len(originals), np.int64)

  def __call__(self, rows, t):
    shape = (-1,) + (1,) * (self.originals.ndim - 1)
    images = np.clip(self.originals[rows] + t.reshape(shape) * self.directions[rows],
                     -0.5, 0.5).astype(np.float32)
    if not len(rows):
      return np.zeros(0, bool), np.zeros(0), images
    p, self.state = _probabilities(self.oracle, self.state, images,
                                   self.settings.batch_size)
    self.queries[rows] += 1
    ok, margin = _accepts(p, self.class_a[rows], self.target, self.inside,
                          self.settings.kappa)
    return ok, margin, images


def _bisect(probe, rows, good, bad, steps):
  """Moves ``good`` (accepted) towards ``bad`` (not) along each row's line."""
  for _ in range(steps):
    middle = (good + bad) / 2
    ok, _, _ = probe(rows, middle)
    good, bad = np.where(ok, middle, good), np.where(ok, bad, middle)
  return good


def evade_margin(oracle: oracle_lib.Oracle, oracle_state, originals, pushed,
                 class_a, settings: MarginEvasionSettings, *, inside: bool,
                 target_class: int | None = None) -> Evaded:
  """Moves pushed samples along their push direction to margin ``kappa``.

  Args:
    oracle: a probabilities oracle (the attacker's black-box access).
    oracle_state: its state; every probe is counted there.
    originals: (N, H, W, C) the samples before pushing.
    pushed: (N, H, W, C) Pushing-I (``inside``) or Pushing-II images; NaN rows
      (failed pushes) stay failed.
    class_a: (N,) the original classes.
    settings: ``MarginEvasionSettings``.
    inside: True for Pushing-I (stay in A), False for Pushing-II (stay across).
    target_class: Pushing-II's target when targeted.

  Returns:
    ``Evaded``; ``l2 <= max_l2`` holds by construction (``t <= max_l2 / ||d||`` and
    clipping to the pixel range only moves a point towards the original).
  """
  if oracle.output != "probabilities":
    raise ValueError("evade_margin needs a probabilities oracle (margins).")
  originals = np.asarray(originals, np.float32)
  pushed = np.asarray(pushed, np.float32)
  class_a = np.asarray(class_a)
  valid = _flat(np.isfinite(pushed)).all(-1)
  directions = np.where(valid.reshape((-1,) + (1,) * (pushed.ndim - 1)),
                        pushed - originals, 0.0)
  norms = np.linalg.norm(_flat(directions), axis=-1)
  probe = _Probe(oracle, oracle_state, originals, directions, class_a,
                 target_class, settings, inside)
  rows = np.flatnonzero(valid & (norms > 0))
  scale = np.full(len(pushed), np.nan)
  if inside:
    scale[rows] = _bisect(probe, rows, np.zeros(len(rows)), np.ones(len(rows)),
                          settings.search_steps)
  else:
    good, bad = _overshoot(probe, rows, settings.max_l2 / norms[rows],
                           settings.max_doublings)
    found = ~np.isnan(good)
    scale[rows[found]] = _bisect(probe, rows[found], good[found], bad[found],
                                 settings.search_steps)
  rows = np.flatnonzero(np.isfinite(scale))
  accepted, margin, images = probe(rows, scale[rows])
  success = np.zeros(len(pushed), bool)
  success[rows] = accepted
  out = np.full_like(pushed, np.nan)
  margins, l2 = np.full(len(pushed), np.nan), np.full(len(pushed), np.nan)
  out[rows[accepted]] = images[accepted]
  margins[rows[accepted]] = margin[accepted]
  moved = images[accepted] - originals[rows[accepted]]
  l2[rows[accepted]] = np.linalg.norm(_flat(moved), axis=-1)
  scale[~success] = np.nan
  return Evaded(out, success, scale, l2, margins, probe.queries, probe.state)


def _overshoot(probe, rows, t_max, doublings):
  """Pushing-II: doubles t from 1 (capped at ``t_max``) until a probe is accepted.

  Returns ``(good, bad)`` per row: the first accepted t (NaN if none) and the last
  rejected one.
  """
  good, bad = np.full(len(rows), np.nan), np.ones(len(rows))
  t = np.minimum(1.0, t_max)
  for _ in range(doublings + 1):
    searching = np.flatnonzero(np.isnan(good) & np.isfinite(t))
    if not len(searching):
      break
    ok, _, _ = probe(rows[searching], t[searching])
    good[searching[ok]] = t[searching[ok]]
    bad[searching[~ok]] = t[searching[~ok]]
    t = np.where(t >= t_max, np.inf, np.minimum(2 * t, t_max))
  return good, bad
