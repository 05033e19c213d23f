"""Black-box Carlini-Wagner attack by zeroth-order optimisation (ZOO; Sec. III-C).

The user only sees the oracle's class probabilities (docs/protocol.md §8.1). In the
tanh box ``x' = tanh(w + arctanh(1.999999 x)) / 2`` it minimises Eq. 4 with the
log-probability margin of Eq. 6,

  L(w) = ||x' - x0||^2 + c * max(m(x'), -kappa),
  m = max_{i != t} log p_i - log p_t          (targeted, towards t),
  m = log p_a - max_{i != a} log p_i          (untargeted, away from a),

where ``x0 = tanh(arctanh(1.999999 x)) / 2`` as in the released code. Every iteration
draws ``B`` coordinates without replacement (seeded per sample and iteration), queries
``2B + 1`` images (the iterate and ``w +- h e_j``) and estimates
``g_j = (L(w + h e_j) - L(w - h e_j)) / 2h``; coordinate-wise ADAM with
per-coordinate step counters updates those coordinates (docs/protocol.md §8.1 and
§12). The paper's own
Eq. 7-8 (forward difference ``(L(w + h e_j) - L(w)) / h``, ``B + 1`` queries, plain
step ``w_j -= lr g_j``) are ``difference='forward', solver='descent'``.

Numerics (docs/protocol.md §19): the loss differences are formed without
cancellation. The distance term differs between two probes only in coordinate j, so its difference is
``d_j+^2 - d_j-^2``; the margin differences come from per-class log-ratios
``log(p_i / p0_i)`` against the iterate (``log1p`` of the exact float32 difference,
and ``log p = log1p(-sum of the others)`` for a dominant class), so they are not
rounded at the scale of the margin itself. What remains is the server's float32
forward pass, which a black-box user cannot control; ``h`` is a setting.

Structure (optax's shape, STYLE.md): ``zoo_init`` builds a ``ZooState`` (modifier,
ADAM moments and counters, per-sample query counts, the trajectory bookkeeping for
Pushing-I/II, done flags); ``zoo_step`` is one iteration of all S samples with ONE
flat oracle call of ``S * (2B + 1)`` images; ``zoo_run_chunk`` runs up to
``iterations_per_chunk`` steps in a ``lax.while_loop`` and stops early when every
sample is done. ``zoo_attack`` is the host loop: at most ``sample_chunk_size``
samples are in flight (bounded memory); between chunks it reports progress,
collects finished samples, refills their slots with waiting ones and, when none
wait, shrinks the batch by powers of two (at most log2(slots) + 1 compilations).

Finished samples (first crossing, early abort, maximum iterations) are masked: their
state no longer changes and their queries are no longer counted in
``ZooState.queries``, which is exact per sample. Their rows (and padding rows) still
travel in the fixed-shape batch until the current iteration chunk ends, but the
oracle call passes the per-image mask of active samples, so the oracle neither
answers nor counts them: ``oracle_state.queries`` grows by exactly
``sum(queries)``.

Devices (``ounl_jax/devices.py``): the samples axis of the chunk is split over a
1-D mesh (``devices.sample_mesh()``, default every device of ``jax.devices()``):
the per-sample state and therefore the ``S * (2B + 1)`` probe images are sharded
row-wise, the server's parameters and the query counter are replicated, and the
compiled batch is a multiple of the device count (extra rows are padding: done,
masked, never counted). Inside the chunk the state and the probes are constrained
to that layout, so every device evaluates the model on its own samples' probes and
only the query total and the "all done?" test cross devices. On one device none of
this applies and the chunk is the single-device program, bit-identical to the code
before sharding. A sample's values do not depend on the device count as long as the
server's float32 answers do not depend on the per-device batch (tested bit for bit
on forced host devices, ``tests/test_sharding.py``).

Gradient estimators (``ZooSettings.estimator``): ``coordinates`` (default) is the
released coordinate-wise ZOO above. ``directions`` (not in the paper or the released
code; ``query_efficient_settings()``) estimates the whole gradient from q antithetic
random directions per iteration, ``2q + 1`` queries, optionally drawn on a coarse
grid and upsampled (ZOO's dimension reduction), and takes a full-vector ADAM step
(``coordinate_adam`` on all d coordinates, which is plain ADAM). Everything else
(loss, early abort, ADAM reset, Pushing-I/II bookkeeping, counting) is shared.

Determinism: the same key gives bit-identical results. A sample's coordinate draws
depend only on the key, its index and its iteration; with the same compiled batch
size its trajectory does not depend on the other samples in the batch (tested), but
the server's float32 answers can differ between batch sizes (docs/protocol.md §19), so
different ``sample_chunk_size`` values can give slightly different trajectories.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import devices as devices_lib
from ounl_jax import oracle as oracle_lib

SOLVERS = ("adam", "descent")
DIFFERENCES = ("symmetric", "forward")
# ``coordinates``: the released ZOO; ``directions``: random-direction estimate.
ESTIMATORS = ("coordinates", "directions")
DISTRIBUTIONS = ("gaussian", "rademacher")
# Added inside the logarithms, as in the released code (docs/protocol.md §8.1).
TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class ZooSettings:
  """ZOO settings; the defaults are the released code's (docs/protocol.md §8.1).

  Attributes:
    targeted: move towards ``targets`` (Tables V-VI) instead of away from the
      original class.
    c: weight of the margin term in Eq. 4 (``initial_const`` 10, no binary search).
    kappa: margin ``k`` of Eq. 5-6 (confidence, 0).
    coordinates_per_iteration: B, coordinates drawn without replacement (128).
    h: finite-difference step in tanh space (1e-4).
    difference: ``symmetric`` (released, 2B+1 queries) or ``forward`` (Eq. 8,
      B+1 queries).
    solver: ``adam`` (coordinate-wise ADAM, released) or ``descent`` (Eq. 7).
    learning_rate: ADAM / descent step size (0.01).
    beta1, beta2, epsilon: ADAM constants (0.9, 0.999, 1e-8).
    reset_adam_on_success: zero the ADAM moments and counters when the margin term
      first reaches its minimum (``--reset_adam``, True).
    max_iterations: per sample (20000).
    abort_early: stop a sample whose loss did not fall below 0.9999 x its value
      ``early_abort_every`` iterations before.
    early_abort_every: 100.
    early_abort_tolerance: 0.9999.
    stop_at_first_crossing: stop a sample at its first crossing (Pushing-I and the
      paper's Pushing-II); False runs plain ZOO (the released Pushing-II).
    iterations_per_chunk: iterations per compiled call. Between calls the host
      reports progress and drops finished samples; inside a call their rows keep
      travelling (masked out of the oracle's answers and counts), so a shorter
      chunk wastes less server compute at the price of more (cheap) host round
      trips. Never one per iteration.
    sample_chunk_size: samples attacked together; bounds memory to
      ``sample_chunk_size * (2B + 1)`` images per forward batch.
    tanh_scale: ``arctanh(tanh_scale * x)`` maps [-0.5, 0.5] into the box (1.999999).
    estimator: ``coordinates`` (the released ZOO) or ``directions`` (random
      directions; not the released attack, see ``query_efficient_settings``).
    directions_per_iteration: q antithetic direction pairs (``directions`` only).
    direction_distribution: ``gaussian`` or ``rademacher`` values.
    direction_resolution: draw directions on an (r, r, C) grid upsampled to the
      image (None: full resolution).
    direction_h: the smoothing step s along a direction, in tanh space.
    stop_margin: kappa of the adaptive stop (not in the paper): track the first
      iterate inside A whose probability margin (top-1 minus top-2) falls below
      kappa and the first crossing iterate whose margin is at least kappa; with
      ``stop_at_first_crossing`` a sample stops at the latter instead of at the
      first crossing. 0 (default) tracks nothing and changes nothing.
  """

  targeted: bool = False
  c: float = 10.0
  kappa: float = 0.0
  coordinates_per_iteration: int = 128
  h: float = 1e-4
  difference: str = "symmetric"
  solver: str = "adam"
  learning_rate: float = 0.01
  beta1: float = 0.9
  beta2: float = 0.999
  epsilon: float = 1e-8
  reset_adam_on_success: bool = True
  max_iterations: int = 20000
  abort_early: bool = True
  early_abort_every: int = 100
  early_abort_tolerance: float = 0.9999
  stop_at_first_crossing: bool = False
  iterations_per_chunk: int = 10
  sample_chunk_size: int = 64
  tanh_scale: float = 1.999999
  estimator: str = "coordinates"
  directions_per_iteration: int = 10
  direction_distribution: str = "gaussian"
  direction_resolution: int | None = None
  direction_h: float = 1e-3
  stop_margin: float = 0.0

  def __post_init__(self):
    if self.solver not in SOLVERS:
      raise ValueError(f"Unknown ZOO solver {self.solver!r}; choose one of {SOLVERS}.")
    if self.difference not in DIFFERENCES:
      raise ValueError(f"Unknown finite difference {self.difference!r}; choose one "
                       f"of {DIFFERENCES}.")
    for name in ("coordinates_per_iteration", "max_iterations", "early_abort_every",
                 "iterations_per_chunk", "sample_chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"ZooSettings.{name} must be >= 1, got {getattr(self, name)}.")
    if self.h <= 0 or self.direction_h <= 0:
      raise ValueError(f"ZooSettings.h and direction_h must be > 0, got {self.h} "
                       f"and {self.direction_h}.")
    if not 0.0 <= self.stop_margin < 1.0:
      raise ValueError(f"ZooSettings.stop_margin must be in [0, 1), got "
                       f"{self.stop_margin}.")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"Unknown ZOO gradient estimator {self.estimator!r}; choose "
                       f"one of {ESTIMATORS}.")
    if self.direction_distribution not in DISTRIBUTIONS:
      raise ValueError(f"Unknown direction distribution "
                       f"{self.direction_distribution!r}; choose one of "
                       f"{DISTRIBUTIONS}.")
    if self.directions_per_iteration < 1 or (
        self.direction_resolution is not None and self.direction_resolution < 1):
      raise ValueError("ZooSettings.directions_per_iteration and "
                       "direction_resolution must be >= 1.")

  @property
  def queries_per_iteration(self) -> int:
    """Images per sample and iteration: 2B + 1 (symmetric) or B + 1 (forward)
    coordinates, or 2q + 1 with random directions."""
    if self.estimator == "directions":
      return 2 * self.directions_per_iteration + 1
    probes = 2 if self.difference == "symmetric" else 1
    return probes * self.coordinates_per_iteration + 1


def query_efficient_settings(**overrides) -> ZooSettings:
  """ZOO with the random-direction estimator (not the released attack).

  q = 10 antithetic Gaussian directions drawn on an 8 x 8 grid and upsampled
  (21 queries per iteration instead of 257), smoothing 1e-2, full-vector ADAM with
  step 0.01. Overrides are ``ZooSettings`` fields.
  """
  settings = dict(estimator="directions", directions_per_iteration=10,
                  direction_resolution=8, direction_h=1e-2, learning_rate=0.01)
  settings.update(overrides)
  return ZooSettings(**settings)


class CoordinateAdamState(NamedTuple):
  """Coordinate-wise ADAM: moments and per-coordinate update counters, (S, d)."""

  m: jax.Array
  v: jax.Array
  steps: jax.Array


class Iterate(NamedTuple):
  """One remembered iterate per sample (``iteration`` is -1 while none is)."""

  image: jax.Array       # (S, d) in [-0.5, 0.5]
  l2: jax.Array          # (S,) ||image - x||_2 to the original x
  predicted: jax.Array   # (S,) the oracle's class for it
  iteration: jax.Array   # (S,) int32


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
    last_within: the last iterate predicted as A before the first crossing
      (the paper's x^(t-1), Pushing-I).
    farthest_within: the largest-L2 iterate predicted as A before the first
      crossing (the released Pushing-I).
    first_crossing: the first crossing iterate (the paper's x^(t), Pushing-II).
    closest_crossing: the smallest-L2 crossing iterate (the released Pushing-II).
    near_within: with ``stop_margin`` > 0, the first iterate predicted as A before
      the first crossing whose probability margin (top-1 minus top-2) is below
      ``stop_margin`` (empty otherwise).
    far_across: with ``stop_margin`` > 0, the first crossing iterate whose
      probability margin is at least ``stop_margin`` (empty otherwise).
  """

  original: jax.Array
  anchor: jax.Array
  original_class: jax.Array
  target_class: jax.Array
  keys: jax.Array
  modifier: jax.Array
  adam: CoordinateAdamState
  iterations: jax.Array
  queries: jax.Array
  done: jax.Array
  succeeded: jax.Array
  crossed: jax.Array
  loss: jax.Array
  previous_loss: jax.Array
  last_within: Iterate
  farthest_within: Iterate
  first_crossing: Iterate
  closest_crossing: Iterate
  near_within: Iterate
  far_across: Iterate


def _empty_iterate(count: int, dim: int, l2: float) -> Iterate:
  return Iterate(jnp.full((count, dim), jnp.nan, jnp.float32),
                 jnp.full((count,), l2, jnp.float32),
                 jnp.full((count,), -1, jnp.int32),
                 jnp.full((count,), -1, jnp.int32))


def zoo_init(images, labels, key: jax.Array, settings: ZooSettings, *,
             targets=None, active=None, sample_ids=None) -> ZooState:
  """The state before the first iteration (w = 0, fresh ADAM).

  Args:
    images: (S, H, W, C) in [-0.5, 0.5].
    labels: (S,) original classes A.
    key: typed PRNG key; sample s uses ``fold_in(key, sample_ids[s])``, so its
      coordinate draws do not depend on which samples share its chunk. Or (S,)
      keys, sample s drawing from ``key[s]`` (``sample_ids`` unused).
    settings: ``ZooSettings``.
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
      adam=CoordinateAdamState(zeros, zeros, jnp.zeros(original.shape, jnp.int32)),
      iterations=jnp.zeros((count,), jnp.int32),
      queries=jnp.zeros((count,), jnp.int32),
      done=jnp.logical_not(active),
      succeeded=jnp.zeros((count,), bool), crossed=jnp.zeros((count,), bool),
      loss=jnp.full((count,), jnp.nan, jnp.float32),
      previous_loss=jnp.full((count,), jnp.inf, jnp.float32),
      last_within=_empty_iterate(count, dim, -1.0),
      farthest_within=_empty_iterate(count, dim, -1.0),
      first_crossing=_empty_iterate(count, dim, jnp.inf),
      closest_crossing=_empty_iterate(count, dim, jnp.inf),
      near_within=_empty_iterate(count, dim, -1.0),
      far_across=_empty_iterate(count, dim, jnp.inf))


# ---------------------------------------------------------------------------------
# One sample: probes, the loss and its finite differences, the coordinate update.
# ---------------------------------------------------------------------------------


def draw_coordinates(key: jax.Array, dim: int, count: int) -> jax.Array:
  """``count`` distinct coordinates of ``dim``, uniformly (docs/protocol.md §8.1)."""
  return jax.random.choice(key, dim, (count,), replace=False)


def probe_images(modifier, anchor, coordinates, settings: ZooSettings):
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


def log_probabilities(p):
  """``log(p + 1e-30)`` (released), but ``log1p(-others)`` for a class above 1/2.

  Near p = 1 float32 keeps ``1 - p`` only to 6e-8; the sum of the other classes is
  exact there.
  """
  top = jax.nn.one_hot(jnp.argmax(p, -1), p.shape[-1], dtype=bool)
  others = jnp.sum(jnp.where(top, 0.0, p), -1, keepdims=True)
  return jnp.where(top & (p > 0.5), jnp.log1p(-others), jnp.log(p + TINY))


def _log_ratios(p, p0):
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


def _margin_changes(logp0, ratios, cls, targeted: bool):
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


def _loss_and_changes(probabilities, centre, start, cls, settings: ZooSettings):
  """Eq. 4 at the centre (loss, f0, margin m0) and each probe's change of f (Eq. 5).

  ``probabilities[0]`` answers the centre, the rest the probes; f is the margin
  clipped at -kappa, and its changes are exact where neither side is clipped.
  """
  p0 = probabilities[0]
  logp0 = log_probabilities(p0)
  m0 = margin(logp0, cls, settings.targeted)
  f0 = jnp.maximum(m0, -settings.kappa)
  loss = jnp.sum(jnp.square(centre - start)) + settings.c * f0
  dm = _margin_changes(logp0, _log_ratios(probabilities[1:], p0), cls,
                       settings.targeted)
  unclipped = (m0 > -settings.kappa) & (m0 + dm > -settings.kappa)
  df = jnp.where(unclipped, dm, jnp.maximum(m0 + dm, -settings.kappa) - f0)
  return loss, f0, m0, df


def coordinate_gradient(probabilities, modifier, anchor, coordinates, probe_values,
                        cls, settings: ZooSettings) -> ProbeLoss:
  """Finite-difference gradient of Eq. 4 on the drawn coordinates (Eq. 8).

  Args:
    probabilities: (Q, K) the oracle's answers for ``probe_images`` (row 0 the
      iterate).
    modifier, anchor: (d,) w and arctanh(tanh_scale x).
    coordinates: (B,) the drawn coordinates.
    probe_values: (Q - 1,) the moved pixel values from ``probe_images``.
    cls: the target class (targeted) or the original class (untargeted).
    settings: ``ZooSettings``.
  """
  count = coordinates.shape[0]
  start = jnp.tanh(anchor) / 2
  centre = jnp.tanh(modifier + anchor) / 2
  p0 = probabilities[0]
  loss, f0, m0, df = _loss_and_changes(probabilities, centre, start, cls, settings)
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
  return ProbeLoss(gradient, loss, f0, m0, jnp.argmax(p0).astype(jnp.int32))


def coordinate_adam(modifier, adam: CoordinateAdamState, coordinates, gradient,
                    settings: ZooSettings):
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
                       settings: ZooSettings):
  """The paper's Eq. 7: ``w_j <- w_j - lr g_j`` (ADAM state untouched)."""
  return modifier.at[coordinates].add(-settings.learning_rate * gradient), adam


# ---------------------------------------------------------------------------------
# One sample, random directions (``estimator='directions'``; not the released ZOO).
# ---------------------------------------------------------------------------------


def draw_directions(key: jax.Array, input_shape: tuple[int, ...],
                    settings: ZooSettings) -> jax.Array:
  """q random directions u_i (q, d): Gaussian or Rademacher per value.

  With ``direction_resolution`` r they are drawn on an (r, r, C) grid and
  upsampled bilinearly to (H, W, C): a low-frequency search space, like ZOO's
  attack-space dimension reduction (``use_resize``, off in the released code;
  docs/protocol.md §8.1 and §12).
  """
  height, width, channels = input_shape
  q = settings.directions_per_iteration
  r = settings.direction_resolution
  shape = (q, height, width, channels) if r is None else (q, r, r, channels)
  if settings.direction_distribution == "gaussian":
    u = jax.random.normal(key, shape, jnp.float32)
  else:
    u = jax.random.rademacher(key, shape, jnp.float32)
  if r is not None:
    u = jax.image.resize(u, (q, height, width, channels), "linear")
  return u.reshape(q, -1)


def direction_probe_images(modifier, anchor, directions, settings: ZooSettings):
  """The ``2q + 1`` images of one iteration: the iterate, then ``w + s u_i`` and
  ``w - s u_i`` (antithetic pairs, s = ``direction_h``), each ``tanh(. + a) / 2``."""
  moved = settings.direction_h * directions
  tanh_space = jnp.concatenate([modifier[None], modifier + moved, modifier - moved])
  return jnp.tanh(tanh_space + anchor) / 2


def direction_gradient(probabilities, probes, anchor, directions, cls,
                       settings: ZooSettings) -> ProbeLoss:
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
  loss, f0, m0, df = _loss_and_changes(probabilities, centre, start, cls, settings)
  plus, minus = probes[1:q + 1] - start, probes[q + 1:] - start
  # ||x+ - x0||^2 - ||x- - x0||^2 = sum (x+ - x-)(x+ + x- - 2 x0), no cancellation.
  distance = jnp.sum((plus - minus) * (plus + minus), -1)
  change = distance + settings.c * (df[:q] - df[q:])
  gradient = (change / (2 * settings.direction_h * q)) @ directions
  return ProbeLoss(gradient, loss, f0, m0, jnp.argmax(p0).astype(jnp.int32))


# ---------------------------------------------------------------------------------
# All samples: one iteration, a chunk of iterations, the host loop.
# ---------------------------------------------------------------------------------


def _where(mask, new, old):
  """Per-sample select on pytrees whose leaves lead with S."""
  def pick(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree_util.tree_map(pick, new, old)


def _remember(iterate: Iterate, mask, image, l2, predicted, iteration) -> Iterate:
  return _where(mask, Iterate(image, l2, predicted, iteration), iterate)


def probability_margin(probabilities):
  """Top-1 minus top-2 probability of each answer (.., K) (the adaptive stop)."""
  top = jax.lax.top_k(probabilities, 2)[0]
  return top[..., 0] - top[..., 1]


def _track(state: ZooState, active, centre, probe: ProbeLoss,
           settings: ZooSettings, probabilities=None) -> ZooState:
  """Trajectory bookkeeping on the queried iterate x^(k) (docs/protocol.md §8.2).

  With ``stop_margin`` > 0 also the adaptive-stop iterates (``ZooState`` doc),
  from the iterate's ``probabilities`` (S, K).
  """
  l2 = jnp.sqrt(jnp.sum(jnp.square(centre - state.original), -1))
  predicted = probe.predicted
  within = predicted == state.original_class
  crossing = (predicted == state.target_class if settings.targeted
              else predicted != state.original_class)
  before = active & jnp.logical_not(state.crossed)
  k = state.iterations
  remember = functools.partial(_remember, image=centre, l2=l2,
                               predicted=predicted, iteration=k)
  if settings.stop_margin > 0:
    near = probability_margin(probabilities) < settings.stop_margin
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


def zoo_step(state: ZooState, oracle_state: oracle_lib.OracleState, *,
             oracle: oracle_lib.Oracle, settings: ZooSettings, mesh=None):
  """One ZOO iteration of every active sample, with one flat oracle call.

  Order per sample, as the released ``attack_batch``: query the ``2B + 1`` probes
  at x^(k); update the drawn coordinates; reset ADAM at the first success; record
  x^(k) for Pushing-I/II; check early abort; stop at the first crossing if asked.
  With a multi-device ``mesh`` the probe images stay split by sample over it
  (``devices.constrain_rows``).

  Returns:
    ``(state, oracle_state)``.
  """
  count, dim = state.modifier.shape
  active = jnp.logical_not(state.done)
  keys = jax.vmap(jax.random.fold_in)(state.keys, state.iterations)
  if settings.estimator == "directions":
    directions = jax.vmap(functools.partial(
        draw_directions, input_shape=oracle.input_shape, settings=settings))(keys)
    probes = jax.vmap(functools.partial(direction_probe_images, settings=settings))(
        state.modifier, state.anchor, directions)
    coordinates = jnp.broadcast_to(jnp.arange(dim), (count, dim))
  else:
    coordinates = jax.vmap(functools.partial(
        draw_coordinates, dim=dim, count=settings.coordinates_per_iteration))(keys)
    probes, probe_values = jax.vmap(functools.partial(
        probe_images, settings=settings))(state.modifier, state.anchor, coordinates)
  per_sample = settings.queries_per_iteration
  flat = devices_lib.constrain_rows(
      probes.reshape((count * per_sample,) + oracle.input_shape), mesh)
  # Only active samples' probes are answered and counted (docs/protocol.md §19).
  answers, oracle_state = oracle.query(oracle_state, flat,
                                       jnp.repeat(active, per_sample))
  answers = answers.reshape(count, per_sample, -1)
  if settings.estimator == "directions":
    probe = jax.vmap(functools.partial(direction_gradient, settings=settings))(
        answers, probes, state.anchor, directions, state.target_class)
  else:
    probe = jax.vmap(functools.partial(coordinate_gradient, settings=settings))(
        answers, state.modifier, state.anchor, coordinates, probe_values,
        state.target_class)

  update = coordinate_adam if settings.solver == "adam" else coordinate_descent
  modifier, adam = jax.vmap(functools.partial(update, settings=settings))(
      state.modifier, state.adam, coordinates, probe.gradient)
  first_success = (active & jnp.logical_not(state.succeeded)
                   & (probe.margin <= -settings.kappa))
  if settings.reset_adam_on_success:
    adam = _where(first_success, jax.tree_util.tree_map(jnp.zeros_like, adam), adam)
  state = state._replace(modifier=_where(active, modifier, state.modifier),
                         adam=_where(active, adam, state.adam),
                         succeeded=state.succeeded | first_success)

  centre = probes[:, 0]
  state = _track(state, active, centre, probe, settings, answers[:, 0])
  k = state.iterations
  check = active & (k % settings.early_abort_every == 0) & settings.abort_early
  aborted = check & (probe.loss > state.previous_loss * settings.early_abort_tolerance)
  finished = aborted | (k + 1 >= settings.max_iterations)
  if settings.stop_at_first_crossing and settings.stop_margin > 0:
    finished = finished | (state.far_across.iteration >= 0)
  elif settings.stop_at_first_crossing:
    finished = finished | state.crossed
  return state._replace(
      iterations=k + active,
      queries=state.queries + active * per_sample,
      done=state.done | (active & finished),
      loss=jnp.where(active, probe.loss, state.loss),
      previous_loss=jnp.where(check, probe.loss, state.previous_loss)), oracle_state


def zoo_run_chunk(state: ZooState, oracle_state: oracle_lib.OracleState, *,
                  oracle: oracle_lib.Oracle, settings: ZooSettings, mesh=None):
  """Up to ``iterations_per_chunk`` steps; stops as soon as every sample is done.

  ``mesh``: a multi-device ``devices.sample_mesh`` keeps the state's rows split
  over it (the batch must be a multiple of its size); None on one device.
  """

  def running(carry):
    state, _, i = carry
    return (i < settings.iterations_per_chunk) & jnp.any(jnp.logical_not(state.done))

  def body(carry):
    state, oracle_state, i = carry
    state, oracle_state = zoo_step(state, oracle_state, oracle=oracle,
                                   settings=settings, mesh=mesh)
    return devices_lib.constrain_rows(state, mesh), oracle_state, i + 1

  state, oracle_state, _ = jax.lax.while_loop(
      running, body, (state, oracle_state, jnp.zeros((), jnp.int32)))
  return state, oracle_state


# One jitted chunk for every oracle: the oracle is static without its server (its
# parameters travel in the OracleState), so oracles over the same model share it.
_run_chunk = jax.jit(zoo_run_chunk, static_argnames=("oracle", "settings", "mesh"))


def compiled_chunk(oracle: oracle_lib.Oracle, settings: ZooSettings, mesh=None):
  """``run(state, oracle_state)``: ``zoo_run_chunk`` jitted for these settings.

  Two oracles built by ``make_oracle(apply, parameters)`` with the same ``apply``
  share one compilation per batch shape; the parameters are jit arguments.
  ``mesh``: a multi-device ``devices.sample_mesh`` whose layout the chunk keeps
  (pass the state through ``devices.shard_rows`` and the oracle state through
  ``devices.replicate``); None (default) is the single-device program.
  """
  if not devices_lib.is_sharded(mesh):
    mesh = None
  return functools.partial(_run_chunk, oracle=oracle.static(), settings=settings,
                           mesh=mesh)


class ZooProgress(NamedTuple):
  """What ``zoo_attack`` reports after every chunk of iterations."""

  samples_done: int
  samples_total: int
  iteration: int          # largest iteration count among the samples in the batch
  max_iterations: int
  batch_size: int         # samples in the compiled batch (padding included)
  oracle_queries: int


class ZooResult(NamedTuple):
  """``state``: the final ``ZooState`` of all N samples as numpy (``keys`` None)."""

  state: ZooState
  oracle_state: oracle_lib.OracleState


def _to_host(state: ZooState) -> ZooState:
  return jax.tree_util.tree_map(np.asarray, state._replace(keys=None))


def _host_rows(host: ZooState, rows) -> ZooState:
  return jax.tree_util.tree_map(lambda a: a[rows], host)


def _fresh(ids, live, images, labels, targets, key, settings: ZooSettings) -> ZooState:
  """``zoo_init`` of the attack's samples ``ids`` (rows of its arrays)."""
  return zoo_init(images[ids], labels[ids], key[ids] if jnp.ndim(key) else key,
                  settings, targets=None if targets is None else targets[ids],
                  active=live, sample_ids=ids)


@functools.partial(jax.jit, static_argnames=("settings",))
def _refill(batch: ZooState, keep, ids, fill, images, labels, targets, key, *,
            settings: ZooSettings) -> ZooState:
  """The next batch in one compiled call: row r is ``batch``'s row ``keep[r]``, or,
  where ``fill[r]``, sample ``ids[r]`` from its start.

  The output has ``len(keep)`` rows whatever the samples, so the host loop compiles
  it once per batch size (not per number of finished samples); rows neither kept
  nor filled are padding (``keep`` points at a done row).
  """
  kept = jax.tree_util.tree_map(lambda a: a[keep], batch)
  return _where(fill, _fresh(ids, fill, images, labels, targets, key, settings), kept)


_start = jax.jit(_fresh, static_argnames=("settings",))


def batch_size_for(count: int, slots: int, devices: int = 1) -> int:
  """The compiled batch for ``count`` live samples: a power of two, at most ``slots``,
  rounded up to a multiple of ``devices``.

  Rounding to powers of two bounds the number of compilations by log2(slots) + 1
  while the padding (done rows) stays below ``count`` (plus the rounding to the
  device count; ``slots`` is itself a multiple of ``devices``).
  """
  size = 1
  while size < count:
    size *= 2
  size = min(size, slots)
  return -(-size // devices) * devices


def _next_batch(batch: ZooState, rows, live, new, size: int, arrays,
                settings: ZooSettings):
  """``size`` rows: the live ones first (their order kept), then ``new`` samples
  from their start, then padding; and the sample id of each row (-1: padding)."""
  keep = np.flatnonzero(live)
  count = len(keep) + len(new)
  pad = np.flatnonzero(np.logical_not(live))
  # Padding copies a done row (it never updates). With no done row every row is
  # kept or filled, so keep[0] below is overwritten by a new sample.
  pad_row = pad[0] if len(pad) else keep[0]
  take = np.concatenate([keep, np.full(size - len(keep), pad_row)])
  ids = np.zeros(size, np.int32)
  ids[len(keep):count] = new
  fill = np.zeros(size, bool)
  fill[len(keep):count] = True
  batch = _refill(batch, jnp.asarray(take, jnp.int32), jnp.asarray(ids),
                  jnp.asarray(fill), *arrays, settings=settings)
  rows = np.concatenate([rows[keep], np.asarray(new, np.int64),
                         np.full(size - count, -1, np.int64)])
  return batch, rows


def zoo_attack(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
               settings: ZooSettings, *, targets=None, active=None,
               oracle_state: oracle_lib.OracleState | None = None,
               on_chunk: Callable[[ZooProgress], None] | None = None,
               mesh=None) -> ZooResult:
  """Runs ZOO on all samples with at most ``sample_chunk_size`` in flight.

  Between compiled chunks of ``iterations_per_chunk`` iterations the host collects
  the finished samples, fills their slots with waiting samples and, once no sample
  waits, shrinks the batch to ``batch_size_for(live)`` (padding rows are done and
  never update). A sample's coordinate draws depend only on ``key``, its index and
  its iteration, never on its slot; its float32 answers may still depend on the
  batch size the server evaluates it in (docs/protocol.md §19).

  Args:
    oracle: the black-box service (probabilities).
    images: (N, H, W, C) in [-0.5, 0.5]; labels: (N,) their classes A.
    key: typed PRNG key for the coordinate draws, or (N,) keys, one per sample
      (sample i then draws from ``key[i]`` alone, whoever shares its batch).
    settings: ``ZooSettings``.
    targets: (N,) or one target class, for a targeted attack.
    active: (N,) bool, which samples to attack (default all); the others are
      returned as initialised (done, no query).
    oracle_state: the user's query count so far (default ``oracle.init()``).
    on_chunk: called with a ``ZooProgress`` after every compiled chunk.
    mesh: the devices the samples are split over (default
      ``devices.sample_mesh()``, every device; one device runs the single-device
      program). On n devices the samples in flight are ``sample_chunk_size``
      rounded up to a multiple of n, and every compiled batch is a multiple of n
      (padding rows are done and never counted).

  Returns:
    ``ZooResult(state, oracle_state)`` with the samples in input order.

  Example (a tiny model, two iterations; every answered image is billed):

  >>> import jax, numpy as np
  >>> from ounl_jax import models, oracle as oracle_lib
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
  ...                                 input_shape=(8, 8, 3), num_classes=4)
  >>> x = np.zeros((2, 8, 8, 3), np.float32); y = np.array([0, 0])
  >>> settings = ZooSettings(max_iterations=2, iterations_per_chunk=2,
  ...                        stop_at_first_crossing=True)
  >>> result = zoo_attack(oracle, x, y, jax.random.key(1216), settings)
  >>> x_t = result.state.first_crossing.image.reshape(x.shape)
  >>> int(result.oracle_state.queries) == int(result.state.queries.sum())
  True

  Raises:
    ValueError: the oracle answers labels only.
    QueryBudgetExceeded: the oracle refused queries.
  """
  if oracle.output != "probabilities":
    raise ValueError("ZOO needs the oracle's probabilities; this oracle answers "
                     f"{oracle.output!r}.")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  total = len(labels)
  if total == 0:
    raise ValueError("zoo_attack needs at least one sample.")
  if targets is not None:
    targets = np.broadcast_to(np.asarray(targets, np.int32), (total,))
  active = (np.ones((total,), bool) if active is None
            else np.asarray(active, bool))
  oracle_state = oracle.init() if oracle_state is None else oracle_state
  per_sample = jnp.ndim(key) > 0
  if per_sample and key.shape != (total,):
    raise ValueError(f"{key.shape[0]} keys for {total} samples; pass one key or "
                     "one per sample.")
  mesh = devices_lib.sample_mesh() if mesh is None else mesh
  sharded = devices_lib.is_sharded(mesh)
  devices = devices_lib.device_count(mesh) if sharded else 1
  slots = -(-settings.sample_chunk_size // devices) * devices
  run = compiled_chunk(oracle, settings, mesh if sharded else None)
  # On the device once; each refill gathers its new samples' rows from them.
  arrays = (jnp.asarray(images), jnp.asarray(labels),
            None if targets is None else jnp.asarray(targets), key)

  finished = []  # (sample ids, host ZooState rows)
  idle = np.flatnonzero(np.logical_not(active))
  if len(idle):
    finished.append((idle, _to_host(_start(
        jnp.asarray(idle, jnp.int32), jnp.zeros(len(idle), bool), *arrays,
        settings))))
  waiting = list(np.flatnonzero(active))
  batch, rows = None, np.zeros((0,), np.int64)  # rows: sample id per row, -1 pad
  done_count = len(idle)
  while True:
    live = np.zeros((0,), bool)
    if batch is not None:
      done = np.asarray(batch.done)
      live = (rows >= 0) & np.logical_not(done)
      over = np.flatnonzero((rows >= 0) & done)
      if len(over):
        finished.append((rows[over], _host_rows(_to_host(batch), over)))
        done_count += len(over)
        rows = np.where(done, -1, rows)
    room = slots - int(live.sum())
    new, waiting = waiting[:room], waiting[room:]
    count = int(live.sum()) + len(new)
    if count == 0:
      break
    if waiting:
      size = slots
    elif batch is None:
      size = -(-count // devices) * devices
    else:  # Only ever shrink once nothing waits: no recompilation to grow.
      size = min(len(rows), batch_size_for(count, slots, devices))
    if batch is None:
      ids = np.concatenate([new, np.full(size - count, new[0])]).astype(np.int32)
      batch = _start(jnp.asarray(ids), jnp.asarray(np.arange(size) < count),
                     *arrays, settings)
      rows = np.concatenate([np.asarray(new, np.int64),
                             np.full(size - count, -1, np.int64)])
    elif new or size != len(rows):
      batch, rows = _next_batch(batch, rows, live, new, size, arrays, settings)
    if sharded:  # No copy when the layout is already right (every unchanged chunk).
      batch = devices_lib.shard_rows(batch, mesh)
      oracle_state = devices_lib.replicate(oracle_state, mesh)
    batch, oracle_state = run(batch, oracle_state)
    oracle_lib.check_budget(oracle, oracle_state)
    if on_chunk is not None:
      now_done = int(np.sum((rows >= 0) & np.asarray(batch.done)))
      on_chunk(ZooProgress(done_count + now_done, total,
                           int(np.max(np.where(rows >= 0, batch.iterations, 0))),
                           settings.max_iterations, len(rows),
                           int(oracle_state.queries)))
  ids = np.concatenate([i for i, _ in finished])
  merged = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs),
                                  *[s for _, s in finished])
  order = np.argsort(ids, kind="stable")
  return ZooResult(jax.tree_util.tree_map(lambda a: a[order], merged), oracle_state)
