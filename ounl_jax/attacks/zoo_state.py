"""The state of a ZOO run: one row per sample (Sec. III-C; docs/protocol.md §8).

``zoo_init`` is ZOO's ``init`` in optax's shape; ``zoo.zoo_step`` updates the state
and ``scheduler.schedule`` moves its rows in and out of the compiled batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ounl_jax.attacks import estimators
from ounl_jax.attacks import trajectory


class ZooState(NamedTuple):
  """Everything one ZOO run of S samples carries (all leading axes are S).

  Attributes:
    original: (S, d) the original images x, flattened.
    anchor: (S, d) ``arctanh(tanh_scale * x)``; the iterate is
      ``tanh(modifier + anchor) / 2``.
    original_class: (S,) class A.
    target_class: (S,) class B (targeted) or class A (untargeted).
    keys: (S,) typed PRNG keys, folded with the iteration for the coordinates.
    modifier: (S, d) w, in tanh space.
    adam: the coordinate-ADAM moments and counters.
    iterations: (S,) iterations run.
    queries: (S,) images queried for this sample (exact).
    done: (S,) finished (or never started).
    succeeded: (S,) the margin term has reached its minimum once (ADAM was reset).
    crossed: (S,) the trajectory has crossed (left A / reached B).
    loss: (S,) L of the last queried iterate.
    previous_loss: (S,) L at the last early-abort check.
    last_within, farthest_within, first_crossing, closest_crossing, near_within,
      far_across: the remembered iterates (``trajectory.py``; Pushing-I/II).
  """

  original: jax.Array
  anchor: jax.Array
  original_class: jax.Array
  target_class: jax.Array
  keys: jax.Array
  modifier: jax.Array
  adam: estimators.CoordinateAdamState
  iterations: jax.Array
  queries: jax.Array
  done: jax.Array
  succeeded: jax.Array
  crossed: jax.Array
  loss: jax.Array
  previous_loss: jax.Array
  last_within: trajectory.Iterate
  farthest_within: trajectory.Iterate
  first_crossing: trajectory.Iterate
  closest_crossing: trajectory.Iterate
  near_within: trajectory.Iterate
  far_across: trajectory.Iterate


def zoo_init(images, labels, key: jax.Array, settings: zoo.ZooSettings, *,
             targets=None, active=None, sample_ids=None) -> ZooState:
  """The state before the first iteration (w = 0, fresh ADAM).

  Args:
    images: (S, H, W, C) in [-0.5, 0.5].
    labels: (S,) original classes A.
    key: typed PRNG key; sample s uses ``fold_in(key, sample_ids[s])``, so its
      coordinate draws do not depend on which samples share its chunk. Or (S,)
      keys, sample s drawing from ``key[s]`` (``sample_ids`` unused).
    settings: ``zoo.ZooSettings``.
    targets: (S,) target classes; required when ``settings.targeted``.
    active: (S,) bool, samples to attack (others start done, with no query).
    sample_ids: (S,) int, the samples' global indices (default ``arange(S)``).
  """
  images = jnp.asarray(images, jnp.float32)
  count = images.shape[0]
  original = images.reshape(count, -1)
  dim = original.shape[1]
  if settings.coordinates_per_iteration > dim:
    raise ValueError(f"Cannot draw {settings.coordinates_per_iteration} coordinates "
                     f"from images of {dim} values.")
  labels = jnp.asarray(labels, jnp.int32)
  if settings.targeted:
    if targets is None:
      raise ValueError("A targeted ZOO attack needs `targets`.")
    target_class = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (count,))
  else:
    target_class = labels
  active = (jnp.ones((count,), bool) if active is None
            else jnp.asarray(active, bool))
  sample_ids = (jnp.arange(count) if sample_ids is None
                else jnp.asarray(sample_ids, jnp.int32))
  zeros = jnp.zeros_like(original)
  return ZooState(
      original=original,
      anchor=jnp.arctanh(original * settings.tanh_scale),
      original_class=labels, target_class=target_class,
      keys=(key if jnp.ndim(key) else
            jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids)),
      modifier=zeros,
      adam=estimators.CoordinateAdamState(zeros, zeros,
                                          jnp.zeros(original.shape, jnp.int32)),
      iterations=jnp.zeros((count,), jnp.int32),
      queries=jnp.zeros((count,), jnp.int32),
      done=jnp.logical_not(active),
      succeeded=jnp.zeros((count,), bool), crossed=jnp.zeros((count,), bool),
      loss=jnp.full((count,), jnp.nan, jnp.float32),
      previous_loss=jnp.full((count,), jnp.inf, jnp.float32),
      last_within=trajectory.empty(count, dim, -1.0),
      farthest_within=trajectory.empty(count, dim, -1.0),
      first_crossing=trajectory.empty(count, dim, jnp.inf),
      closest_crossing=trajectory.empty(count, dim, jnp.inf),
      near_within=trajectory.empty(count, dim, -1.0),
      far_across=trajectory.empty(count, dim, jnp.inf))
