"""Zeroth-order gradient estimators of Eq. 4 and the coordinate updates
(Sec. III-C, Eq. 7-8; docs/protocol.md §8.1 and §12).

* **Coordinates** (the released ZOO): draw ``B`` coordinates without replacement,
  query the iterate and ``w +- h e_j`` (``2B + 1`` images; ``B + 1`` with the
  forward difference of Eq. 8) and estimate
  ``g_j = (L(w + h e_j) - L(w - h e_j)) / 2h``; coordinate-wise ADAM with
  per-coordinate step counters (released) or the plain step of Eq. 7 updates them.
* **Directions** (not in the paper or the released code): ``q`` antithetic random
  directions, ``2q + 1`` queries, optionally drawn on a coarse grid and upsampled
  (ZOO's dimension reduction); ``draw_directions`` is also the label-only attack's
  direction sampler (``label_only.py``).

Every function is one sample's (callers ``vmap``); ``settings`` is a
``zoo.ZooSettings``. The loss differences are formed without cancellation
(``margins.py``; docs/protocol.md §19).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ounl_jax.attacks import margins

DISTRIBUTIONS = ("gaussian", "rademacher")


class CoordinateAdamState(NamedTuple):
  """Coordinate-wise ADAM: moments and per-coordinate update counters, (S, d)."""

  m: jax.Array
  v: jax.Array
  steps: jax.Array


def draw_coordinates(key: jax.Array, dim: int, count: int) -> jax.Array:
  """``count`` distinct coordinates of ``dim``, uniformly (docs/protocol.md §8.1)."""
  return jax.random.choice(key, dim, (count,), replace=False)


def coordinate_probes(modifier, anchor, coordinates, settings):
  """The ``2B + 1`` (or ``B + 1``) images queried in one iteration of one sample.

  Row 0 is the iterate ``tanh(w + a) / 2``; rows 1..B move coordinate j to
  ``w_j + h``, rows B+1..2B (symmetric only) to ``w_j - h``.

  Returns:
    ``(probes (Q, d), probe_values (Q - 1,))`` where ``probe_values`` are the moved
    pixel values.
  """
  centre = jnp.tanh(modifier + anchor) / 2
  w, a = modifier[coordinates], anchor[coordinates]
  moved = [jnp.tanh(w + settings.h + a) / 2]
  if settings.difference == "symmetric":
    moved.append(jnp.tanh(w - settings.h + a) / 2)
  probe_values = jnp.concatenate(moved)
  probe_coordinates = jnp.concatenate(
      [jnp.full((1,), -1, coordinates.dtype)]
      + [coordinates] * len(moved))
  values = jnp.concatenate([jnp.zeros((1,), centre.dtype), probe_values])
  # One fused elementwise select (no scatter): row r replaces pixel coordinate[r].
  hit = jnp.arange(centre.shape[0])[None, :] == probe_coordinates[:, None]
  return jnp.where(hit, values[:, None], centre[None, :]), probe_values


def coordinate_gradient(probabilities, modifier, anchor, coordinates, probe_values,
                        cls, settings) -> margins.ProbeLoss:
  """Finite-difference gradient of Eq. 4 on the drawn coordinates (Eq. 8).

  Args:
    probabilities: (Q, K) the oracle's answers for ``coordinate_probes`` (row 0 the
      iterate).
    modifier, anchor: (d,) w and arctanh(tanh_scale x).
    coordinates: (B,) the drawn coordinates.
    probe_values: (Q - 1,) the moved pixel values from ``coordinate_probes``.
    cls: the target class (targeted) or the original class (untargeted).
    settings: ``zoo.ZooSettings``.
  """
  count = coordinates.shape[0]
  start = jnp.tanh(anchor) / 2
  centre = jnp.tanh(modifier + anchor) / 2
  p0 = probabilities[0]
  loss, f0, m0, df = margins.loss_and_changes(probabilities, centre, start, cls,
                                              settings)
  d0 = centre[coordinates] - start[coordinates]
  d_plus = probe_values[:count] - start[coordinates]
  if settings.difference == "symmetric":
    d_minus = probe_values[count:] - start[coordinates]
    change = (jnp.square(d_plus) - jnp.square(d_minus)
              + settings.c * (df[:count] - df[count:]))
    gradient = change / (2 * settings.h)
  else:
    change = jnp.square(d_plus) - jnp.square(d0) + settings.c * df
    gradient = change / settings.h
  return margins.ProbeLoss(gradient, loss, f0, m0, jnp.argmax(p0).astype(jnp.int32))


def coordinate_adam(modifier, adam: CoordinateAdamState, coordinates, gradient,
                    settings):
  """One coordinate-wise ADAM step on the drawn coordinates of one sample.

  ``m_j <- b1 m_j + (1 - b1) g_j``, ``v_j <- b2 v_j + (1 - b2) g_j^2``,
  ``t_j <- t_j + 1``,
  ``w_j <- w_j - lr sqrt(1 - b2^t_j) / (1 - b1^t_j) m_j / (sqrt(v_j) + eps)``
  (the released ``coordinate_ADAM``; docs/protocol.md §8.1).

  Returns:
    ``(modifier, adam)`` updated.
  """
  b1, b2 = settings.beta1, settings.beta2
  m = b1 * adam.m[coordinates] + (1 - b1) * gradient
  v = b2 * adam.v[coordinates] + (1 - b2) * jnp.square(gradient)
  steps = adam.steps[coordinates] + 1
  t = steps.astype(jnp.float32)
  correction = jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))
  step = settings.learning_rate * correction * m / (jnp.sqrt(v) + settings.epsilon)
  return (modifier.at[coordinates].add(-step),
          CoordinateAdamState(adam.m.at[coordinates].set(m),
                              adam.v.at[coordinates].set(v),
                              adam.steps.at[coordinates].set(steps)))


def coordinate_descent(modifier, adam: CoordinateAdamState, coordinates, gradient,
                       settings):
  """The paper's Eq. 7: ``w_j <- w_j - lr g_j`` (ADAM state untouched)."""
  return modifier.at[coordinates].add(-settings.learning_rate * gradient), adam


# ---------------------------------------------------------------------------------
# Random directions (``estimator='directions'``; not the released ZOO).
# ---------------------------------------------------------------------------------


def draw_directions(key: jax.Array, count: int, input_shape: tuple[int, ...], *,
                    resolution: int | None = None,
                    distribution: str = "gaussian") -> jax.Array:
  """``count`` random directions u_i (count, d): Gaussian or Rademacher per value.

  With ``resolution`` r they are drawn on an (r, r, C) grid and upsampled
  bilinearly to (H, W, C): a low-frequency search space, like ZOO's attack-space
  dimension reduction (``use_resize``, off in the released code; docs/protocol.md
  §8.1 and §12) and QEBA's subspace for the label-only attack. The draw's shape is
  part of the random stream: without ``resolution`` the values are drawn in
  ``input_shape`` ((H, W, C) for ZOO, (d,) for the label-only attack).
  """
  shape = (count,) + tuple(input_shape)
  if resolution is not None:
    shape = (count, resolution, resolution, input_shape[-1])
  if distribution == "gaussian":
    u = jax.random.normal(key, shape, jnp.float32)
  else:
    u = jax.random.rademacher(key, shape, jnp.float32)
  if resolution is not None:
    u = jax.image.resize(u, (count,) + tuple(input_shape), "linear")
  return u.reshape(count, -1)


def direction_probes(modifier, anchor, directions, settings):
  """The ``2q + 1`` images of one iteration: the iterate, then ``w + s u_i`` and
  ``w - s u_i`` (antithetic pairs, s = ``direction_h``), each ``tanh(. + a) / 2``."""
  moved = settings.direction_h * directions
  tanh_space = jnp.concatenate([modifier[None], modifier + moved, modifier - moved])
  return jnp.tanh(tanh_space + anchor) / 2


def direction_gradient(probabilities, probes, anchor, directions, cls,
                       settings) -> margins.ProbeLoss:
  """Antithetic random-direction estimate of the gradient of Eq. 4 (NES / SPSA):

    g = 1 / (2 s q) sum_i (L(w + s u_i) - L(w - s u_i)) u_i,

  with the margin differences of Eq. 6 from per-class log-ratios against the
  iterate (as ``coordinate_gradient``). Returns a ``ProbeLoss`` whose gradient is
  over all d values.
  """
  q = directions.shape[0]
  start = jnp.tanh(anchor) / 2
  centre = probes[0]
  p0 = probabilities[0]
  loss, f0, m0, df = margins.loss_and_changes(probabilities, centre, start, cls,
                                              settings)
  plus, minus = probes[1:q + 1] - start, probes[q + 1:] - start
  # ||x+ - x0||^2 - ||x- - x0||^2 = sum (x+ - x-)(x+ + x- - 2 x0), no cancellation.
  distance = jnp.sum((plus - minus) * (plus + minus), -1)
  change = distance + settings.c * (df[:q] - df[q:])
  gradient = (change / (2 * settings.direction_h * q)) @ directions
  return margins.ProbeLoss(gradient, loss, f0, m0, jnp.argmax(p0).astype(jnp.int32))
