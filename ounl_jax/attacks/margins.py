"""The loss ZOO minimises: log-probabilities, the margin of Eq. 6 and Eq. 4's loss
with its per-probe changes (Sec. III-C; docs/protocol.md §8.1 and §19).

  L(x') = ||x' - x0||^2 + c * max(m(x'), -kappa),
  m = max_{i != t} log p_i - log p_t          (targeted, towards t),
  m = log p_a - max_{i != a} log p_i          (untargeted, away from a).

Numerics (docs/protocol.md §19): the margin differences between a probe and the
iterate come from per-class log-ratios ``log(p_i / p0_i)`` (``log1p`` of the exact
float32 difference, and ``log p = log1p(-sum of the others)`` for a dominant class),
so they are not rounded at the scale of the margin itself. The functions take one
sample's answers; callers ``vmap`` them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Added inside the logarithms, as in the released code (docs/protocol.md §8.1).
TINY = 1e-30


def log_probabilities(p):
  """``log(p + 1e-30)`` (released), but ``log1p(-others)`` for a class above 1/2.

  Near p = 1 float32 keeps ``1 - p`` only to 6e-8; the sum of the other classes is
  exact there.
  """
  top = jax.nn.one_hot(jnp.argmax(p, -1), p.shape[-1], dtype=bool)
  others = jnp.sum(jnp.where(top, 0.0, p), -1, keepdims=True)
  return jnp.where(top & (p > 0.5), jnp.log1p(-others), jnp.log(p + TINY))


def log_ratios(p, p0):
  """``log(p_i / p0_i)`` for rows p (Q, K) against p0 (K,), without cancellation."""
  top = jax.nn.one_hot(jnp.argmax(p0), p0.shape[-1], dtype=bool)
  others = jnp.sum(jnp.where(top, 0.0, p), -1, keepdims=True)
  others0 = jnp.sum(jnp.where(top, 0.0, p0))
  dominant = jnp.log1p((others0 - others) / (1.0 - others0))
  safe0 = jnp.maximum(p0, TINY)
  small = jnp.where(p0 > TINY, jnp.log1p((p - p0) / safe0),
                    jnp.log(p + TINY) - jnp.log(p0 + TINY))
  return jnp.where(top & (p0 > 0.5), dominant, small)


def margin(logp, cls, targeted: bool):
  """Eq. 6's margin m (before ``max(., -kappa)``) from log-probabilities (.., K)."""
  own = jax.nn.one_hot(cls, logp.shape[-1], dtype=bool)
  other = jnp.max(jnp.where(own, -jnp.inf, logp), -1)
  mine = jnp.sum(jnp.where(own, logp, 0.0), -1)
  return other - mine if targeted else mine - other


def margin_changes(logp0, ratios, cls, targeted: bool):
  """m(probe) - m(iterate) per probe row, exact in the log-ratios."""
  own = jax.nn.one_hot(cls, logp0.shape[-1], dtype=bool)
  other0 = jnp.max(jnp.where(own, -jnp.inf, logp0))
  gaps = jnp.where(own, -jnp.inf, logp0 - other0)  # 0 at the runner-up.
  other_change = jnp.max(gaps[None, :] + ratios, -1)
  own_change = jnp.sum(jnp.where(own[None, :], ratios, 0.0), -1)
  return other_change - own_change if targeted else own_change - other_change


class ProbeLoss(NamedTuple):
  """The iterate's loss terms and the estimated gradient on the B coordinates."""

  gradient: jax.Array   # (B,)
  loss: jax.Array       # L = ||x' - x0||^2 + c f
  margin_term: jax.Array  # f = max(m, -kappa)
  margin: jax.Array     # m
  predicted: jax.Array  # argmax of the iterate's probabilities


def loss_and_changes(probabilities, centre, start, cls, settings):
  """Eq. 4 at the centre (loss, f0, margin m0) and each probe's change of f (Eq. 5).

  ``probabilities[0]`` answers the centre, the rest the probes; f is the margin
  clipped at -kappa, and its changes are exact where neither side is clipped.
  """
  p0 = probabilities[0]
  logp0 = log_probabilities(p0)
  m0 = margin(logp0, cls, settings.targeted)
  f0 = jnp.maximum(m0, -settings.kappa)
  loss = jnp.sum(jnp.square(centre - start)) + settings.c * f0
  dm = margin_changes(logp0, log_ratios(probabilities[1:], p0), cls,
                      settings.targeted)
  unclipped = (m0 > -settings.kappa) & (m0 + dm > -settings.kappa)
  df = jnp.where(unclipped, dm, jnp.maximum(m0 + dm, -settings.kappa) - f0)
  return loss, f0, m0, df


def probability_margin(probabilities):
  """Top-1 minus top-2 probability of each answer (.., K) (the adaptive stop)."""
  top = jax.lax.top_k(probabilities, 2)[0]
  return top[..., 0] - top[..., 1]
