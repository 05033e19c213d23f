"""Black-box Carlini-Wagner attack by zeroth-order optimisation (ZOO; Sec. III-C).

The user only sees the oracle's class probabilities (docs/protocol.md §8.1). In the
tanh box ``x' = tanh(w + arctanh(1.999999 x)) / 2`` ZOO minimises Eq. 4 with the
log-probability margin of Eq. 6 (``margins.py``). Each iteration estimates the
gradient from ``2B + 1`` queries and updates w (``estimators.py``: B coordinates
drawn per sample and iteration with coordinate-wise ADAM, as released, docs/protocol.md
§8.1 and §12; the paper's Eq. 7-8 with ``difference='forward', solver='descent'``;
or q random directions with ``estimator='directions'``).

Structure (optax's shape, STYLE.md): ``zoo_state.zoo_init`` builds a ``ZooState``;
``zoo_step`` is one iteration of all S samples with ONE flat oracle call of
``S * (2B + 1)`` images; ``zoo_run_chunk`` runs up to ``iterations_per_chunk`` of
them and stops early when every sample is done; ``zoo_attack`` runs them on the
shared host scheduler (``scheduler.py``: bounded batch, refilled slots, devices,
progress).
Finished samples (first crossing, early abort, maximum iterations) are masked: their
state no longer changes and the oracle neither answers nor counts their rows, so
``ZooState.queries`` is exact per sample and ``oracle_state.queries`` grows by
exactly ``sum(queries)``. On a multi-device mesh (``ounl_jax/devices.py``) the
state and probe images are split by sample; only the query total and the "all
done?" test cross devices (bit-identical per sample on forced host devices as long
as the server's answers do not depend on the per-device batch;
``tests/ounl_jax/test_sharding.py``).

Determinism: the same key gives bit-identical results. A sample's draws depend only
on the key, its index and its iteration; the server's float32 answers can differ
between batch sizes (docs/protocol.md §19), so different ``sample_chunk_size``
values can give slightly different trajectories.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import devices as devices_lib
from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import estimators
from ounl_jax.attacks import scheduler
from ounl_jax.attacks import trajectory
from ounl_jax.attacks import zoo_state

SOLVERS = ("adam", "descent")
DIFFERENCES = ("symmetric", "forward")
# ``coordinates``: the released ZOO; ``directions``: random-direction estimate.
ESTIMATORS = ("coordinates", "directions")


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
    max_iterations: ZOO iterations at most, per sample (the paper: 20,000).
    abort_early: stop a sample whose loss did not fall below 0.9999 x its value
      ``early_abort_every`` iterations before.
    early_abort_every: 100.
    early_abort_tolerance: 0.9999.
    stop_at_first_crossing: stop a sample at its first crossing (Pushing-I and the
      paper's Pushing-II); False runs plain ZOO (the released Pushing-II).
    iterations_per_chunk: iterations per compiled call; between calls the host
      refills finished samples' slots (shorter: less masked compute, more host
      round trips).
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
    for name, choices in (("solver", SOLVERS), ("difference", DIFFERENCES),
                          ("estimator", ESTIMATORS),
                          ("direction_distribution", estimators.DISTRIBUTIONS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"Unknown ZooSettings.{name} {getattr(self, name)!r}; "
                         f"choose one of {choices}.")
    for name in ("coordinates_per_iteration", "max_iterations", "early_abort_every",
                 "iterations_per_chunk", "sample_chunk_size",
                 "directions_per_iteration", "direction_resolution"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"ZooSettings.{name} must be >= 1, got {getattr(self, name)}.")
    if self.h <= 0 or self.direction_h <= 0:
      raise ValueError(f"ZooSettings.h and direction_h must be > 0, got {self.h} "
                       f"and {self.direction_h}.")
    if not 0.0 <= self.stop_margin < 1.0:
      raise ValueError(f"ZooSettings.stop_margin must be in [0, 1), got "
                       f"{self.stop_margin}.")

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


# ---------------------------------------------------------------------------------
# All samples: one iteration, a chunk of iterations, the host loop.
# ---------------------------------------------------------------------------------


def zoo_step(state: zoo_state.ZooState,
             oracle_state: oracle_lib.OracleState, *, oracle: oracle_lib.Oracle,
             settings: ZooSettings, mesh=None):
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
  partial = functools.partial
  if settings.estimator == "directions":
    directions = jax.vmap(partial(
        estimators.draw_directions, count=settings.directions_per_iteration,
        input_shape=oracle.input_shape, resolution=settings.direction_resolution,
        distribution=settings.direction_distribution))(keys)
    probes = jax.vmap(partial(estimators.direction_probes, settings=settings))(
        state.modifier, state.anchor, directions)
    coordinates = jnp.broadcast_to(jnp.arange(dim), (count, dim))
  else:
    coordinates = jax.vmap(partial(estimators.draw_coordinates, dim=dim,
                                   count=settings.coordinates_per_iteration))(keys)
    probes, probe_values = jax.vmap(partial(
        estimators.coordinate_probes, settings=settings))(
            state.modifier, state.anchor, coordinates)
  per_sample = settings.queries_per_iteration
  flat = devices_lib.constrain_rows(
      probes.reshape((count * per_sample,) + oracle.input_shape), mesh)
  # Only active samples' probes are answered and counted (docs/protocol.md §19).
  answers, oracle_state = oracle.query(oracle_state, flat,
                                       jnp.repeat(active, per_sample))
  answers = answers.reshape(count, per_sample, -1)
  if settings.estimator == "directions":
    probe = jax.vmap(partial(estimators.direction_gradient, settings=settings))(
        answers, probes, state.anchor, directions, state.target_class)
  else:
    probe = jax.vmap(partial(estimators.coordinate_gradient, settings=settings))(
        answers, state.modifier, state.anchor, coordinates, probe_values,
        state.target_class)

  update = (estimators.coordinate_adam if settings.solver == "adam"
            else estimators.coordinate_descent)
  modifier, adam = jax.vmap(partial(update, settings=settings))(
      state.modifier, state.adam, coordinates, probe.gradient)
  first_success = (active & jnp.logical_not(state.succeeded)
                   & (probe.margin <= -settings.kappa))
  select = scheduler.select_rows
  if settings.reset_adam_on_success:
    adam = select(first_success, jax.tree_util.tree_map(jnp.zeros_like, adam), adam)
  state = state._replace(modifier=select(active, modifier, state.modifier),
                         adam=select(active, adam, state.adam),
                         succeeded=state.succeeded | first_success)

  state = trajectory.track(state, active, probes[:, 0], probe.predicted, settings,
                           answers[:, 0])
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


def zoo_run_chunk(state: zoo_state.ZooState,
                  oracle_state: oracle_lib.OracleState, *, oracle: oracle_lib.Oracle,
             settings: ZooSettings, mesh=None):
  """Up to ``iterations_per_chunk`` steps; stops as soon as every sample is done.

  ``mesh``: a multi-device ``devices.sample_mesh`` keeps the state's rows split
  over it (the batch must be a multiple of its size); None on one device.
  """
  step = functools.partial(zoo_step, oracle=oracle, settings=settings, mesh=mesh)
  return scheduler.run_steps(step, state, oracle_state,
                             iterations=settings.iterations_per_chunk, mesh=mesh)


# One jitted chunk for every oracle: the oracle is static without its server (its
# parameters travel in the OracleState), so oracles over the same model share it.
_run_chunk = jax.jit(zoo_run_chunk, static_argnames=("oracle", "settings", "mesh"))


def compiled_chunk(oracle: oracle_lib.Oracle, settings: ZooSettings, mesh=None):
  """``run(state, oracle_state)``: ``zoo_run_chunk`` jitted for these settings.

  Oracles over the same ``apply`` share one compilation per batch shape (the
  parameters are jit arguments). ``mesh``: a multi-device ``devices.sample_mesh``
  whose layout the chunk keeps (``devices.shard_rows`` the state,
  ``devices.replicate`` the oracle state); None is the single-device program.
  """
  if not devices_lib.is_sharded(mesh):
    mesh = None
  return functools.partial(_run_chunk, oracle=oracle.static(), settings=settings,
                           mesh=mesh)


@functools.partial(jax.jit, static_argnames=("settings",))
def _start(ids, live, images, labels, targets, key, *, settings: ZooSettings):
  """``zoo_state.zoo_init`` of the attack's samples ``ids`` (rows of its arrays)."""
  return zoo_state.zoo_init(
      images[ids], labels[ids], key[ids] if jnp.ndim(key) else key, settings,
      targets=None if targets is None else targets[ids], active=live,
      sample_ids=ids)


def zoo_attack(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
               settings: ZooSettings, *, targets=None, active=None,
               oracle_state: oracle_lib.OracleState | None = None,
               on_chunk: Callable[[scheduler.Progress], None] | None = None,
               mesh=None, resume: scheduler.Resume | None = None
               ) -> scheduler.Schedule:
  """Runs ZOO on all samples on the host scheduler (``scheduler.schedule``).

  At most ``sample_chunk_size`` samples are in flight (on n devices rounded up to a
  multiple of n); finished slots are refilled, and once none wait the batch shrinks
  to a power of two (padding rows are done, never counted).

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
    on_chunk: called with a ``scheduler.Progress`` after every compiled chunk.
    mesh: the devices the samples are split over (default
      ``devices.sample_mesh()``; one device runs the single-device program).
    resume: ``scheduler.Resume``: samples finished before (not run again),
      ``on_finished``, a deadline.

  Returns:
    ``scheduler.Schedule(state, oracle_state, statistics)``: the final
    ``zoo_state.ZooState`` of all N samples as numpy in input order (``keys``
    None).

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
    scheduler.DeadlineReached: ``resume.deadline`` passed.
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
  if jnp.ndim(key) > 0 and key.shape != (total,):
    raise ValueError(f"{key.shape[0]} keys for {total} samples; pass one key or "
                     "one per sample.")
  mesh = devices_lib.sample_mesh() if mesh is None else mesh
  # On the device once; each refill gathers its new samples' rows from them.
  arrays = (jnp.asarray(images), jnp.asarray(labels),
            None if targets is None else jnp.asarray(targets), key)

  def init(ids, live, oracle_state):
    return _start(jnp.asarray(ids, jnp.int32), jnp.asarray(live), *arrays,
                  settings=settings), oracle_state

  pusher = scheduler.Pusher(init, compiled_chunk(oracle, settings, mesh),
                            settings.max_iterations, refill=True)
  return scheduler.schedule(
      pusher, total, oracle=oracle,
      oracle_state=oracle.init() if oracle_state is None else oracle_state,
      slots=settings.sample_chunk_size, active=active, mesh=mesh, on_chunk=on_chunk,
      resume=resume)
