"""The black-box pushers behind the pushing attacks (``experiments/attacks/registry.py``).

Each returns a ``pushing.PushResult`` (Pushing-I and Pushing-II submissions), so the
sample rule, the push cache, the conditions and the reports are shared:

* ``zoo``: the paper's coordinate ZOO-ADAM with the released settings (Sec. III-C).
* ``zoo_directions``: ZOO with the query-efficient random-direction estimator.
* ``label_only``: decision-based pushing on the oracle's labels (HopSkipJump-style).

A pusher is a factory ``(settings, start_images) -> Pusher``, registered with
``registry.register_attack(registry.AttackSpec(name, display_name, pusher=...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from ounl_jax.attacks import label_only
from ounl_jax.attacks import pushing as pushing_lib
from ounl_jax.attacks import zoo


class Pusher(NamedTuple):
  """``push(oracle, images, labels, key, oracle_state, on_chunk, resume=None) ->
  PushResult``; ``resume``: a ``scheduler.Resume`` (restored samples, their
  saving, a deadline), which only attackers with ``per_sample_keys`` use.

  ``per_sample_keys``: ``key`` may be (N,) keys, sample i drawing from ``key[i]``
  alone (then ``released_rule.push_released`` pushes in one stream); else one key.
  """

  push: Callable[..., pushing_lib.PushResult]
  per_sample_keys: bool = False


def zoo_pusher(settings: pushing_lib.PushSettings, start_images) -> Pusher:
  """The paper's coordinate ZOO-ADAM (Sec. III-C), one key per sample."""
  del start_images

  def push(oracle, images, labels, key, oracle_state, on_chunk, resume=None):
    return pushing_lib.push(oracle, images, labels, key, settings,
                            oracle_state=oracle_state, on_chunk=on_chunk,
                            resume=resume)
  return Pusher(push, per_sample_keys=True)


def zoo_directions_pusher(settings: pushing_lib.PushSettings, start_images
                          ) -> Pusher:
  """ZOO with the query-efficient random-direction estimator."""
  released = settings.zoo
  efficient = zoo.query_efficient_settings(
      max_iterations=released.max_iterations,
      iterations_per_chunk=released.iterations_per_chunk,
      sample_chunk_size=released.sample_chunk_size)
  return zoo_pusher(dataclasses.replace(settings, zoo=efficient), start_images)


def label_only_pusher(settings: pushing_lib.PushSettings, start_images) -> Pusher:
  """Decision-based pushing on the oracle's labels (HopSkipJump-style)."""
  # About 400 queries per sample: 12x below ZOO at 92% of its class-A gap on the
  # cpu-scale model (docs/results.md, attackers).
  walk = label_only.query_efficient_settings(
      target_class=settings.target_class, max_l2=settings.max_l2,
      label_mode=settings.label_mode,
      sample_chunk_size=settings.zoo.sample_chunk_size)

  def push(oracle, images, labels, key, oracle_state, on_chunk, resume=None):
    del on_chunk, resume  # Whole blocks, one call each: nothing to resume.
    return label_only.label_only_push(oracle, images, labels, key, walk,
                                      start_images=start_images,
                                      oracle_state=oracle_state)
  return Pusher(push)


def start_images(pool_images, pool_labels, class_a: int, target: int | None,
                 count: int = 256) -> np.ndarray:
  """Images the user holds of another class (of the target, when targeted)."""
  keep = pool_labels == target if target is not None else pool_labels != class_a
  return np.asarray(pool_images[np.flatnonzero(keep)[:count]])
