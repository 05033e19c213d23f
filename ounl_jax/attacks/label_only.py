"""Label-only Pushing-I / Pushing-II: a decision-based attack on the oracle's labels.

The paper pushes with ZOO, which needs class probabilities (Sec. III-C; docs/protocol.md
§8). A service that answers labels only still leaks the decision boundary. This module
pushes with HopSkipJump (HSJ; Chen, Jordan and Wainwright, IEEE S&P 2020, the L2
version, with the constants of the authors' reference code), which reads nothing but
the top class:

1. **Start** (HSJ's initialisation by blending): for every sample x of class A, blend
   ``x(a) = (1 - a) x + a s`` with ``C`` start images s (the user's own images of
   another class, or of class B when targeted; or uniform noise) at ``G`` levels
   ``a = k / G``; the adversarial blend nearest to x is the start point.
2. **Boundary search** (HSJ's binary search): bisect the blend factor
   on the segment from x to the adversarial point for ``T`` steps; the bracket
   ``[lo, hi]`` has ``x(lo)`` non-adversarial and ``x(hi)`` adversarial.
3. **Walk** (one HSJ iteration t): at the boundary point b = x(hi), estimate
   the normal from ``B`` random unit directions u_b,
   ``g = mean_b (phi_b - mean phi) u_b`` (HSJ's baseline-corrected Monte-Carlo
   estimate; phi = +1 adversarial, -1 not), with probe radius
   ``delta = max(gamma ||b - x|| / d, sqrt(d) ||x(hi) - x(lo)||)`` (``0.1`` at
   t = 1; HSJ's radius is sqrt(d) times its bisection threshold, and the second
   term keeps that ratio when fewer bisection steps leave a wider bracket, so the
   probes still straddle the boundary), step
   ``b + eps g / ||g||`` for ``eps = ||b - x|| / sqrt(t) * 2^-k``, k < K (HSJ's
   geometric step sizes), and bisect each adversarial step back towards x.

   Unlike HSJ, which takes the largest adversarial step, all K steps are bisected
   in parallel and the nearest boundary point is kept if it is nearer than the
   current one (a line search on the projected distance). With B directions in d
   dimensions the estimate's cosine with the true normal is only about
   ``sqrt(2B / (pi d))`` (0.3 for B = 32, d = 192), and the largest adversarial
   step then often lands farther away after the projection; the line search makes
   the distance non-increasing at K * T queries per iteration instead of T.
   With ``direction_resolution`` r the directions live in a low-frequency subspace
   (Gaussian on an r x r x C grid, upsampled; QEBA, Li et al., CVPR 2020), where
   the same B directions estimate the normal's low-frequency part much better.

**Pushing-I** is the inner end of the final bracket (the last point still labelled A;
targeted: not labelled B, verified to be A), **Pushing-II** the outer end (the first
point across; targeted: labelled B). The walk only accepts a nearer bracket, so the
final bracket is the nearest found, and both ends come from one bisection.

Query accounting is exact: ``1`` clean query per sample, ``C * G`` for the start,
``T`` for the first bisection, ``B + K + K * T`` per walk iteration and, with
``verify``, one query per found Pushing-I and Pushing-II image. The walk runs on the
shared host scheduler (``scheduler.py``) in groups of ``sample_chunk_size``
samples: a sample stops when its distance fell by less than ``stop_tolerance`` over
``iterations_per_chunk`` iterations, and the batch shrinks to the live samples; rows
that are done (or padding on several devices) are masked out of the oracle's
answers and counts, so the oracle's count equals the sum of the per-sample counts.

The attack sees only ``oracle.query``; with a probabilities oracle it takes the
argmax, so its result is the same as with a labels oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import oracle as oracle_lib
from ounl_jax import devices as devices_lib
from ounl_jax.attacks import estimators
from ounl_jax.attacks import pushing
from ounl_jax.attacks import scheduler
from ounl_jax.attacks import trajectory

STARTS = ("blend", "noise")
PIXEL_MIN, PIXEL_MAX = -0.5, 0.5


@dataclasses.dataclass(frozen=True)
class LabelOnlySettings(pushing.FinishSettings):
  """Settings of label-only pushing (HopSkipJump, L2).

  Attributes (and ``pushing.FinishSettings``': ``target_class`` B starts from the
  user's B images; without ``verify`` ``Pushed.predicted`` is -1 and the
  bisection's answers are trusted):
    start: ``blend`` (blend with ``start_images`` the user holds) or ``noise``
      (blend with uniform noise images).
    start_candidates: C start images tried per sample.
    blend_levels: G blend factors k / G, k = 1..G, per start image.
    binary_search_steps: T bisection steps; None takes HSJ's threshold
      ``theta = gamma / d^1.5``, i.e. ``ceil(log2(1 / theta))``.
    max_iterations: walk iterations per sample.
    directions: B random directions per normal estimate.
    direction_resolution: r draws the directions on an (r, r, C) grid, upsampled
      bilinearly (a low-frequency subspace of dimension r * r * C); None draws
      them per pixel (HSJ).
    step_candidates: K geometric step sizes ``eps0 * 2^-k`` tried per iteration
      (each is bisected; the nearest boundary point is kept).
    gamma: HSJ's gamma (probe radius ``gamma * dist / d`` and the threshold).
    iterations_per_chunk: walk iterations per compiled call; between calls the host
      drops samples that stopped improving.
    stop_tolerance: a sample stops when its best distance fell by less than this
      fraction over a chunk (0 never stops early).
    sample_chunk_size: samples attacked together (bounds memory to
      ``sample_chunk_size * B`` images per forward batch).
  """

  start: str = "blend"
  start_candidates: int = 4
  blend_levels: int = 8
  binary_search_steps: int | None = None
  max_iterations: int = 40
  directions: int = 64
  direction_resolution: int | None = None
  step_candidates: int = 4
  gamma: float = 1.0
  iterations_per_chunk: int = 10
  stop_tolerance: float = 1e-3
  sample_chunk_size: int = 64

  def __post_init__(self):
    if self.start not in STARTS:
      raise ValueError(f"Unknown start {self.start!r}; choose one of {STARTS}.")
    for name in ("start_candidates", "blend_levels", "directions", "step_candidates",
                 "iterations_per_chunk", "sample_chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"LabelOnlySettings.{name} must be >= 1, got "
                         f"{getattr(self, name)}.")
    if self.max_iterations < 0:
      raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}.")
    if self.direction_resolution is not None and self.direction_resolution < 1:
      raise ValueError("direction_resolution must be >= 1 or None, got "
                       f"{self.direction_resolution}.")
    if self.binary_search_steps is not None and self.binary_search_steps < 1:
      raise ValueError("binary_search_steps must be >= 1 or None, got "
                       f"{self.binary_search_steps}.")
    if self.gamma <= 0:
      raise ValueError(f"gamma must be > 0, got {self.gamma}.")
    super().__post_init__()
    if self.label_mode == "prediction" and not self.verify:
      raise ValueError("label_mode='prediction' needs verify=True: the prediction "
                       "is the verification query's answer.")

  def search_steps(self, dim: int) -> int:
    """T: the setting, or HSJ's ``ceil(log2(d^1.5 / gamma))`` (at least 1)."""
    if self.binary_search_steps is not None:
      return self.binary_search_steps
    return max(1, math.ceil(math.log2(dim ** 1.5 / self.gamma)))

  def start_queries(self) -> int:
    """C * G images per sample to find a start point."""
    return self.start_candidates * self.blend_levels

  def iteration_queries(self, dim: int) -> int:
    """B + K + K * T images per sample and walk iteration."""
    return (self.directions + self.step_candidates
            + self.step_candidates * self.search_steps(dim))


def query_efficient_settings(**overrides) -> LabelOnlySettings:
  """Label-only pushing on a budget of about 400 queries per CIFAR sample.

  C = 8 start images at G = 8 blend levels, T = 10 bisection steps, and 6 walk
  iterations of B = 32 directions drawn on an 8 x 8 grid (upsampled) with K = 2
  step sizes: ``1 + 64 + 10 + 6 * 54 + 2 = 401`` queries per pushed sample (clean
  and verification queries included). On the cpu-scale CIFAR-10 model it gives
  92% of ZOO's class-A gap at 12x fewer median queries (docs/results.md,
  attackers). Overrides are ``LabelOnlySettings`` fields.
  """
  settings = dict(start_candidates=8, blend_levels=8, binary_search_steps=10,
                  step_candidates=2, directions=32, direction_resolution=8,
                  max_iterations=6)
  settings.update(overrides)
  return LabelOnlySettings(**settings)


class LabelOnlyState(NamedTuple):
  """The walk of S samples (flattened images, d = H * W * C).

  Attributes:
    original: (S, d) the clean samples x.
    original_class: (S,) class A.
    target_class: (S,) class B (targeted) or class A (untargeted, unused).
    sample_ids: (S,) the samples' indices in the request (seed the random draws).
    inner, outer: (S, d) the current bracket's ends x(lo) and x(hi).
    distance: (S,) ``||outer - original||``.
    best_inner, best_outer, best_distance: the bracket with the smallest distance.
    best_iteration: (S,) the walk iteration of the best bracket (0: the start).
    checkpoint_distance: (S,) ``best_distance`` at the last stop check.
    found: (S,) a start point was found (the walk crossed).
    iterations: (S,) walk iterations run.
    queries: (S,) attack queries spent (start, bisections, walk).
    done: (S,) finished (no start, stalled, or ``max_iterations``) or padding.
  """

  original: jax.Array
  original_class: jax.Array
  target_class: jax.Array
  sample_ids: jax.Array
  inner: jax.Array
  outer: jax.Array
  distance: jax.Array
  best_inner: jax.Array
  best_outer: jax.Array
  best_distance: jax.Array
  best_iteration: jax.Array
  checkpoint_distance: jax.Array
  found: jax.Array
  iterations: jax.Array
  queries: jax.Array
  done: jax.Array


def query_labels(oracle: oracle_lib.Oracle, oracle_state, flat_images, image_shape,
                 mask=None):
  """The oracle's top class of (N, d) images: one counted query of the N images
  where ``mask`` (default all)."""
  answers, oracle_state = oracle.query(
      oracle_state, flat_images.reshape((-1,) + tuple(image_shape)), mask)
  if oracle.output != "labels":
    answers = jnp.argmax(answers, -1)  # Decision-based: only the top class is used.
  return answers.astype(jnp.int32), oracle_state


def is_adversarial(predicted, original_class, target_class, *, targeted: bool):
  """HSJ's phi > 0: labelled B (targeted) or a valid class other than A (-1, a
  refused answer, is never adversarial)."""
  if targeted:
    return predicted == target_class
  return (predicted != original_class) & (predicted >= 0)


def _blend(original, other, factor):
  """``(1 - a) x + a s`` per sample, clipped against float rounding."""
  return jnp.clip((1.0 - factor[:, None]) * original + factor[:, None] * other,
                  PIXEL_MIN, PIXEL_MAX)


def binary_search(oracle, oracle_state, original, outer, original_class,
                  target_class, *, steps: int, targeted: bool, image_shape,
                  mask=None):
  """Bisects ``[x, outer]`` for ``steps`` steps (HSJ's binary search; one query each
  for the rows where ``mask``, default all).

  ``original`` must be non-adversarial and ``outer`` adversarial.

  Returns:
    ``(inner, outer, oracle_state)``: x(lo) (non-adversarial) and x(hi).
  """
  count = original.shape[0]

  def bisect(_, carry):
    low, high, state = carry
    middle = 0.5 * (low + high)
    labels, state = query_labels(oracle, state, _blend(original, outer, middle),
                                 image_shape, mask)
    adversarial = is_adversarial(labels, original_class, target_class,
                                 targeted=targeted)
    return (jnp.where(adversarial, low, middle), jnp.where(adversarial, middle, high),
            state)

  low, high, oracle_state = jax.lax.fori_loop(
      0, steps, bisect, (jnp.zeros((count,)), jnp.ones((count,)), oracle_state))
  return _blend(original, outer, low), _blend(original, outer, high), oracle_state


def draw_start_images(key, sample_ids, pool, *, settings: LabelOnlySettings, dim: int):
  """(S, C, d) start images: the user's pool (blend) or uniform noise per sample.

  Sample i takes pool images ``(i * C + c) mod M`` (blend), or noise drawn from
  ``fold_in(key, i)`` (noise), so its start does not depend on its batch mates.
  """
  candidates = settings.start_candidates
  if settings.start == "blend":
    index = (sample_ids[:, None] * candidates + jnp.arange(candidates)) % pool.shape[0]
    return pool[index]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)
  return jax.vmap(lambda k: jax.random.uniform(k, (candidates, dim),
                                               minval=PIXEL_MIN,
                                               maxval=PIXEL_MAX))(keys)


def find_starts(oracle, oracle_state, original, original_class, target_class, starts,
                live, *, settings: LabelOnlySettings, image_shape):
  """The adversarial blend nearest to each live sample (the start; C * G queries).

  Returns:
    ``(start (S, d), found (S,), oracle_state)``.
  """
  count, candidates, dim = starts.shape
  levels = settings.blend_levels
  factors = jnp.arange(1, levels + 1, dtype=jnp.float32) / levels
  points = ((1.0 - factors[None, None, :, None]) * original[:, None, None, :]
            + factors[None, None, :, None] * starts[:, :, None, :])
  points = jnp.clip(points, PIXEL_MIN, PIXEL_MAX)
  labels, oracle_state = query_labels(
      oracle, oracle_state, points.reshape(-1, dim), image_shape,
      jnp.repeat(live, candidates * levels))
  labels = labels.reshape(count, candidates, levels)
  adversarial = is_adversarial(labels, original_class[:, None, None],
                               target_class[:, None, None],
                               targeted=settings.targeted)
  distance = (factors[None, None, :]
              * jnp.linalg.norm(starts - original[:, None, :], axis=-1)[:, :, None])
  distance = jnp.where(adversarial, distance, jnp.inf).reshape(count, -1)
  best = jnp.argmin(distance, axis=-1)
  start = points.reshape(count, candidates * levels, dim)[jnp.arange(count), best]
  return start, jnp.isfinite(distance.min(-1)) & live, oracle_state


def label_only_init(oracle, oracle_state, original, original_class, target_class,
                    sample_ids, start, *, settings: LabelOnlySettings, image_shape):
  """The first bracket: bisect from x to its start point (T queries per sample)."""
  dim = original.shape[1]
  steps = settings.search_steps(dim)
  inner, outer, oracle_state = binary_search(
      oracle, oracle_state, original, start, original_class, target_class,
      steps=steps, targeted=settings.targeted, image_shape=image_shape)
  distance = jnp.linalg.norm(outer - original, axis=-1)
  count = original.shape[0]
  zeros = jnp.zeros((count,), jnp.int32)
  state = LabelOnlyState(
      original=original, original_class=original_class, target_class=target_class,
      sample_ids=sample_ids, inner=inner, outer=outer, distance=distance,
      best_inner=inner, best_outer=outer, best_distance=distance,
      best_iteration=zeros, checkpoint_distance=distance,
      found=jnp.ones((count,), bool), iterations=zeros,
      queries=jnp.full((count,), settings.start_queries() + steps, jnp.int32),
      done=jnp.full((count,), settings.max_iterations == 0))
  return state, oracle_state


def normal_probes(key, boundary, delta, *, directions: int,
                  image_shape: tuple[int, ...], resolution: int | None = None):
  """``B`` probes ``clip(b + delta u)`` and the effective unit steps (one sample).

  The unit directions u are ``estimators.draw_directions`` normalised: Gaussian per
  pixel (HSJ), or with ``resolution`` r on an (r, r, C) grid upsampled bilinearly
  (QEBA's low-frequency subspace; as ZOO's ``direction_resolution``).
  """
  units = estimators.draw_directions(
      key, directions, image_shape if resolution else boundary.shape,
      resolution=resolution)
  units = units / jnp.linalg.norm(units, axis=-1, keepdims=True)
  probes = jnp.clip(boundary + delta * units, PIXEL_MIN, PIXEL_MAX)
  return probes, (probes - boundary) / delta


def normal_from_signs(phi, units):
  """``mean (phi - mean phi) u`` normalised; ``mean(phi) mean(u)`` if all agree."""
  mean_phi = jnp.mean(phi)
  agree = jnp.abs(mean_phi) == 1.0
  centred = jnp.where(agree, phi, phi - mean_phi)
  scale = jnp.where(agree, 1.0 / phi.shape[0], 1.0 / max(phi.shape[0] - 1, 1))
  gradient = scale * jnp.sum(centred[:, None] * units, axis=0)
  return gradient / jnp.maximum(jnp.linalg.norm(gradient), 1e-12)


def label_only_step(state: LabelOnlyState, oracle_state, key, *, oracle,
                    settings: LabelOnlySettings, image_shape):
  """One HopSkipJump iteration of every sample that is not done (module doc,
  step 3); done rows are masked out of the oracle's answers and counts.

  Queries per sample: B (normal) + K (step sizes) + K * T (bisections), each group
  one flat oracle call per round. Every ``iterations_per_chunk`` iterations (and
  at ``max_iterations``) a sample whose best distance fell by less than
  ``stop_tolerance`` since the last check stops.
  """
  count, dim = state.original.shape
  targeted = settings.targeted
  active = jnp.logical_not(state.done)
  t = (state.iterations + 1).astype(jnp.float32)
  keys = jax.vmap(lambda i, it: jax.random.fold_in(jax.random.fold_in(key, i), it))(
      state.sample_ids, state.iterations)
  # HSJ's probe radius gamma * dist / d is sqrt(d) times its bisection threshold;
  # with fewer bisection steps the bracket is wider, and probes from its outer end
  # must still reach across the boundary: at least sqrt(d) bracket widths.
  width = jnp.linalg.norm(state.outer - state.inner, axis=-1)
  delta = jnp.where(t == 1, 0.1 * (PIXEL_MAX - PIXEL_MIN),
                    jnp.maximum(settings.gamma * state.distance / dim,
                                math.sqrt(dim) * width))
  probes, units = jax.vmap(functools.partial(
      normal_probes, directions=settings.directions, image_shape=image_shape,
      resolution=settings.direction_resolution))(keys, state.outer, delta)
  labels, oracle_state = query_labels(oracle, oracle_state, probes.reshape(-1, dim),
                                      image_shape,
                                      jnp.repeat(active, settings.directions))
  adversarial = is_adversarial(labels.reshape(count, -1),
                               state.original_class[:, None],
                               state.target_class[:, None], targeted=targeted)
  normal = jax.vmap(normal_from_signs)(jnp.where(adversarial, 1.0, -1.0), units)

  # HSJ's geometric step sizes, all K in one query.
  sizes = (state.distance / jnp.sqrt(t))[:, None] * 2.0 ** -jnp.arange(
      settings.step_candidates, dtype=jnp.float32)[None, :]
  candidates = jnp.clip(state.outer[:, None, :] + sizes[..., None] * normal[:, None, :],
                        PIXEL_MIN, PIXEL_MAX)
  repeat = lambda a: jnp.repeat(a, settings.step_candidates, axis=0)
  labels, oracle_state = query_labels(oracle, oracle_state,
                                      candidates.reshape(-1, dim), image_shape,
                                      repeat(active))
  adversarial = is_adversarial(labels.reshape(count, -1),
                               state.original_class[:, None],
                               state.target_class[:, None], targeted=targeted)
  # Bisect every candidate towards x at once; keep the nearest boundary point.
  steps = settings.search_steps(dim)
  inner, outer, oracle_state = binary_search(
      oracle, oracle_state, repeat(state.original), candidates.reshape(-1, dim),
      repeat(state.original_class), repeat(state.target_class), steps=steps,
      targeted=targeted, image_shape=image_shape, mask=repeat(active))
  distance = jnp.linalg.norm(outer.reshape(count, -1, dim)
                             - state.original[:, None, :], axis=-1)
  distance = jnp.where(adversarial, distance, jnp.inf)
  nearest = jnp.argmin(distance, axis=-1)
  rows = jnp.arange(count)
  distance = distance[rows, nearest]
  moved = distance < state.distance
  keep = lambda new, old: jnp.where(moved[:, None], new, old)
  inner = keep(inner.reshape(count, -1, dim)[rows, nearest], state.inner)
  outer = keep(outer.reshape(count, -1, dim)[rows, nearest], state.outer)
  distance = jnp.where(moved, distance, state.distance)
  iteration = state.iterations + 1
  better = distance < state.best_distance
  pick = lambda new, old: jnp.where(better[:, None], new, old)
  best_distance = jnp.where(better, distance, state.best_distance)
  check = (iteration % settings.iterations_per_chunk == 0) | (
      iteration >= settings.max_iterations)
  stalled = best_distance > (1.0 - settings.stop_tolerance) * state.checkpoint_distance
  walked = state._replace(
      inner=inner, outer=outer, distance=distance,
      best_inner=pick(inner, state.best_inner),
      best_outer=pick(outer, state.best_outer),
      best_distance=best_distance,
      best_iteration=jnp.where(better, iteration, state.best_iteration),
      checkpoint_distance=jnp.where(check, best_distance, state.checkpoint_distance),
      iterations=iteration,
      queries=state.queries + settings.iteration_queries(dim),
      done=check & (stalled | (iteration >= settings.max_iterations)))
  return scheduler.select_rows(active, walked, state), oracle_state


def label_only_run_chunk(state, oracle_state, key, *, oracle, settings, image_shape,
                         mesh=None):
  """Up to ``iterations_per_chunk`` walk iterations (``scheduler.run_steps``)."""
  step = functools.partial(label_only_step, key=key, oracle=oracle,
                           settings=settings, image_shape=image_shape)
  return scheduler.run_steps(step, state, oracle_state,
                             iterations=settings.iterations_per_chunk, mesh=mesh)


@functools.lru_cache(maxsize=16)
def _compiled(oracle, settings, image_shape, mesh):
  """The jitted phases for one oracle, settings and mesh (cached)."""
  find = jax.jit(lambda *a: find_starts(oracle, *a, settings=settings,
                                        image_shape=image_shape))
  init = jax.jit(lambda *a: label_only_init(oracle, *a, settings=settings,
                                            image_shape=image_shape))
  chunk = jax.jit(functools.partial(label_only_run_chunk, oracle=oracle,
                                    settings=settings, image_shape=image_shape,
                                    mesh=mesh))
  starts = jax.jit(functools.partial(draw_start_images, settings=settings,
                                     dim=int(np.prod(image_shape))))
  return find, init, chunk, starts


def _static(oracle: oracle_lib.Oracle) -> oracle_lib.Oracle:
  """The oracle without its server handle, when it has one (shared compilations:
  the parameters travel in the ``OracleState``)."""
  return oracle.static() if hasattr(oracle, "static") else oracle


def _pusher(oracle, images, labels, targets, index, pool, key, settings, mesh):
  """The ``scheduler.Pusher`` of the samples ``index`` (rows of the arrays): start
  and first bisection in ``init`` (samples without a start finish there), the walk
  in ``run_chunk``."""
  image_shape = tuple(images.shape[1:])
  find, first_bracket, chunk, draw_starts = _compiled(_static(oracle), settings,
                                                      image_shape, mesh)
  walk_key = jax.random.fold_in(key, 1)

  def init(ids, live, oracle_state):
    group = index[ids]
    original = jnp.asarray(images[group].reshape(len(group), -1))
    ids_j = jnp.asarray(group, jnp.int32)
    start, found, oracle_state = find(
        oracle_state, original, jnp.asarray(labels[group]),
        jnp.asarray(targets[group]),
        draw_starts(jax.random.fold_in(key, 0), ids_j, pool), jnp.asarray(live))
    oracle_lib.check_budget(oracle, oracle_state)
    rows = np.flatnonzero(np.asarray(found))
    empty = LabelOnlyState(
        original=original, original_class=jnp.asarray(labels[group]),
        target_class=jnp.asarray(targets[group]), sample_ids=ids_j,
        inner=original, outer=original, distance=jnp.zeros(len(group)),
        best_inner=original, best_outer=original, best_distance=jnp.zeros(len(group)),
        best_iteration=jnp.zeros(len(group), jnp.int32),
        checkpoint_distance=jnp.zeros(len(group)),
        found=jnp.zeros(len(group), bool), iterations=jnp.zeros(len(group), jnp.int32),
        queries=jnp.where(jnp.asarray(live), settings.start_queries(), 0).astype(
            jnp.int32),
        done=jnp.ones(len(group), bool))
    if len(rows) == 0:
      return empty, oracle_state
    walked, oracle_state = first_bracket(
        oracle_state, original[rows], jnp.asarray(labels[group[rows]]),
        jnp.asarray(targets[group[rows]]), ids_j[rows], start[rows])
    return jax.tree_util.tree_map(lambda a, b: a.at[rows].set(b), empty,
                                  walked), oracle_state

  def run_chunk(state, oracle_state):
    return chunk(state, oracle_state, walk_key)

  return scheduler.Pusher(init, run_chunk, settings.max_iterations, refill=False)


def label_only_push(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
                    settings: LabelOnlySettings, *, start_images=None,
                    oracle_state: oracle_lib.OracleState | None = None,
                    mesh=None) -> pushing.PushResult:
  """Pushes the user's samples to the boundary with labels only (HopSkipJump).

  Args:
    oracle: the black-box service; only its top class is read (labels oracle).
    images: (N, H, W, C) the user's samples in [-0.5, 0.5]; labels: (N,) class A.
    key: typed PRNG key (noise starts and the walk's random directions).
    settings: ``LabelOnlySettings``.
    start_images: (M, H, W, C) images the user holds of another class (class B when
      targeted), for ``start='blend'``.
    oracle_state: the user's query count so far (default ``oracle.init()``).
    mesh: the devices the samples are split over (default
      ``devices.sample_mesh()``; one device runs the single-device program).

  Returns:
    ``pushing.PushResult``: ``iterations`` are walk iterations, ``crossed`` marks
    samples with a start point, ``Pushed.iteration`` the walk iteration of the
    chosen bracket (0: the first bisection).

  Example (a tiny model and a labels-only oracle):

  >>> import jax, numpy as np
  >>> from ounl_jax import models, oracle as oracle_lib
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
  ...                                 input_shape=(8, 8, 3), num_classes=4,
  ...                                 output="labels")
  >>> x = np.zeros((2, 8, 8, 3), np.float32); y = np.array([0, 0])
  >>> x_other = np.full((4, 8, 8, 3), 0.4, np.float32)
  >>> settings = query_efficient_settings()
  >>> result = label_only_push(oracle, x, y, jax.random.key(7), settings,
  ...                          start_images=x_other)
  >>> images, labels, index = result.pushing_ii.successful()
  >>> len(images) == len(labels) == len(index) <= 2
  True
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  count = len(labels)
  image_shape = tuple(images.shape[1:])
  dim = int(np.prod(image_shape))
  if settings.start == "blend":
    if start_images is None or len(start_images) == 0:
      raise ValueError("start='blend' needs start_images: images the user holds of "
                       "another class (of class B when targeted).")
    pool = jnp.asarray(np.asarray(start_images, np.float32).reshape(-1, dim))
  else:
    pool = jnp.zeros((1, dim), jnp.float32)
  oracle_state = oracle.init() if oracle_state is None else oracle_state
  clean, oracle_state = pushing.clean_query(
      oracle, oracle_state, images, labels, target_class=settings.target_class,
      batch_size=settings.evaluation_batch_size)
  targets = np.full(count, -1 if settings.target_class is None
                    else settings.target_class, np.int32)
  inner = trajectory.empty(count, dim, np.nan)
  outer = trajectory.empty(count, dim, np.nan)
  inner, outer = (jax.tree_util.tree_map(np.array, inner),
                  jax.tree_util.tree_map(np.array, outer))
  iterations = np.zeros(count, np.int32)
  crossed = np.zeros(count, bool)
  attack_queries = np.zeros(count, np.int32)
  statistics = scheduler.statistics()
  index = np.flatnonzero(clean.attacked)
  if len(index):
    mesh = devices_lib.sample_mesh() if mesh is None else mesh
    mesh = mesh if devices_lib.is_sharded(mesh) else None
    result = scheduler.schedule(
        _pusher(oracle, images, labels, targets, index, pool, key, settings, mesh),
        len(index), oracle=oracle, oracle_state=oracle_state,
        slots=settings.sample_chunk_size, mesh=mesh)
    state, oracle_state, statistics = result
    attack_queries[index] = state.queries
    crossed[index] = state.found
    walked = index[state.found]
    for iterate, image in ((inner, state.best_inner), (outer, state.best_outer)):
      iterate.image[walked] = image[state.found]
      iterate.iteration[walked] = state.best_iteration[state.found]
    iterations[walked] = state.iterations[state.found]
  original = images.reshape(count, -1)
  chosen = tuple(iterate._replace(l2=np.linalg.norm(iterate.image - original, axis=-1))
                 for iterate in (inner, outer))
  return pushing.finish_push(oracle, oracle_state, images, labels, clean, chosen,
                             settings, crossed=crossed, iterations=iterations,
                             attack_queries=attack_queries, statistics=statistics)
