"""The trajectory bookkeeping of Pushing-I / Pushing-II (Sec. III-C;
docs/protocol.md §8.2).

A pusher's iterates x^(0), x^(1), ... are not kept; per sample it remembers the few
that Pushing-I / II may submit, each an ``Iterate`` (image, its L2 distance to the
original, the oracle's class for it, the iteration; ``iteration`` -1 while none is):

* ``last_within``: the last iterate predicted as A before the first crossing (the
  paper's x^(t-1));
* ``farthest_within``: the largest-L2 such iterate (the released Pushing-I);
* ``first_crossing``: the first crossing iterate (the paper's x^(t));
* ``closest_crossing``: the smallest-L2 crossing iterate (the released Pushing-II);
* with ``stop_margin`` > 0, ``near_within``: the first iterate inside A before the
  first crossing whose probability margin (top-1 minus top-2) is below
  ``stop_margin``, and ``far_across``: the first crossing iterate whose margin is
  at least ``stop_margin`` (the adaptive stop, not in the paper).

A crossing is: targeted, predicted as B; untargeted, predicted as anything but A.
Targeted, an iterate predicted as a third class is neither kept nor a crossing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ounl_jax.attacks import margins
from ounl_jax.attacks import scheduler


class Iterate(NamedTuple):
  """One remembered iterate per sample (``iteration`` is -1 while none is)."""

  image: jax.Array       # (S, d) in [-0.5, 0.5]
  l2: jax.Array          # (S,) ||image - x||_2 to the original x
  predicted: jax.Array   # (S,) the oracle's class for it (-1: not seen)
  iteration: jax.Array   # (S,) int32


def empty(count: int, dim: int, l2: float) -> Iterate:
  """No iterate yet: NaN images, ``l2`` (the value any first candidate beats)."""
  return Iterate(jnp.full((count, dim), jnp.nan, jnp.float32),
                 jnp.full((count,), l2, jnp.float32),
                 jnp.full((count,), -1, jnp.int32),
                 jnp.full((count,), -1, jnp.int32))


def _remember(iterate: Iterate, mask, image, l2, predicted, iteration) -> Iterate:
  return scheduler.select_rows(mask, Iterate(image, l2, predicted, iteration),
                               iterate)


def track(state, active, centre, predicted, settings, probabilities=None):
  """Records the queried iterates x^(k) (S, d) of the active samples.

  Args:
    state: a NamedTuple with ``original``, ``original_class``, ``target_class``,
      ``iterations`` (k), ``crossed`` and the ``Iterate`` fields of the module doc
      (``zoo_state.ZooState``).
    active: (S,) bool, samples that ran this iteration.
    centre: (S, d) the iterates; predicted: (S,) the oracle's classes for them.
    settings: with ``targeted`` and ``stop_margin``.
    probabilities: (S, K) the oracle's answers for them (``stop_margin`` > 0).

  Returns:
    ``state`` with the remembered iterates and ``crossed`` updated.
  """
  l2 = jnp.sqrt(jnp.sum(jnp.square(centre - state.original), -1))
  within = predicted == state.original_class
  crossing = (predicted == state.target_class if settings.targeted
              else predicted != state.original_class)
  before = active & jnp.logical_not(state.crossed)
  remember = functools.partial(_remember, image=centre, l2=l2,
                               predicted=predicted, iteration=state.iterations)
  if settings.stop_margin > 0:
    near = margins.probability_margin(probabilities) < settings.stop_margin
    state = state._replace(
        near_within=remember(state.near_within, before & within & near
                             & (state.near_within.iteration < 0)),
        far_across=remember(state.far_across, active & crossing
                            & jnp.logical_not(near)
                            & (state.far_across.iteration < 0)))
  return state._replace(
      crossed=state.crossed | (active & crossing),
      last_within=remember(state.last_within, before & within),
      farthest_within=remember(state.farthest_within,
                               before & within & (l2 > state.farthest_within.l2)),
      first_crossing=remember(state.first_crossing, before & crossing),
      closest_crossing=remember(state.closest_crossing,
                                active & crossing
                                & (l2 < state.closest_crossing.l2)))
