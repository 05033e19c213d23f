"""Pushing-I and Pushing-II: move the user's samples to the decision boundary
(Sec. III-C; docs/protocol.md §8.2 and §16).

ZOO (``zoo.py``) produces a trajectory x^(0), x^(1), ... for every sample. With
x^(t) the first iterate that crosses (leaves the original class A; targeted: reaches
class B) and x^(t-1) the iterate before it:

* **Pushing-I** keeps a sample just inside: ``pushing_i='last'`` (default) is the
  paper's x^(t-1), the last iterate still predicted as A before the first crossing;
  ``'largest_l2'`` is the released code's choice, the largest-L2 iterate predicted as
  A before the first crossing (the two coincide unless the trajectory moves back).
  Targeted, iterates predicted as a third class are neither kept nor a crossing.
* **Pushing-II** takes a sample just across: ``pushing_ii='first_crossing'``
  (default) is the paper's x^(t) (ZOO stops each sample there, so one run gives
  both); ``'smallest_l2'`` is the released code's choice, the smallest-L2 crossing
  iterate of a full ZOO run (up to ``max_iterations`` or early abort).

Unlike the released code, a sample is a success only if it was pushed: the model
classified it correctly at the start, the trajectory crossed, its L2 distance to the
original is at most ``max_l2`` (20, [P] and docs/protocol.md §8.1, for both
methods; the released code filtered only Pushing-II), and, with ``verify``, a fresh
query of the chosen image confirms its class (A for Pushing-I; not A, or B, for
Pushing-II). A failed sample's image is NaN and its label -1: it cannot be submitted
by mistake (the released code saved an arctanh-space image as a Pushing-I sample;
docs/protocol.md §8.2).

Every pusher shares the two ends of a push: ``clean_query`` (one counted query per
original, the start status) and ``finish_push`` (verification queries, the status
rules, the ``PushResult``); ZOO here and HopSkipJump in ``label_only.py`` supply
only the chosen iterates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import numpy as np

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import scheduler
from ounl_jax.attacks import trajectory
from ounl_jax.attacks import zoo
from ounl_jax.attacks import zoo_state

PUSHING_I = ("last", "largest_l2")
PUSHING_II = ("first_crossing", "smallest_l2")
# Why a sample is not a success (``Pushed.status``).
STATUSES = ("ok", "misclassified", "is_target", "no_crossing", "crossed_at_start",
            "l2_bound", "verification", "margin")


@dataclasses.dataclass(frozen=True)
class FinishSettings:
  """How every push is finished (``clean_query``, ``finish_push``).

  Attributes:
    target_class: class B for targeted pushing (Tables V-VI), None for untargeted.
    max_l2: the L2 bound on ``||x' - x||_2`` in [-0.5, 0.5] units (20;
      docs/protocol.md §8.1).
    label_mode: submitted label: ``original`` (released default), ``prediction``
      (the oracle's class for the pushed image) or ``target`` (class B;
      docs/protocol.md §9).
    verify: query the chosen images once more and require the expected class
      (without it the attack's own answers vouch for them).
    evaluation_batch_size: images per clean / verification query.
  """

  target_class: int | None = None
  max_l2: float = 20.0
  label_mode: str = "original"
  verify: bool = True
  evaluation_batch_size: int = 256

  def __post_init__(self):
    labels_lib.check_label_mode(self.label_mode,
                                has_target=self.target_class is not None)
    if not (math.isfinite(self.max_l2) and self.max_l2 > 0):
      raise ValueError(f"max_l2 must be a positive finite number, got "
                       f"{self.max_l2}.")

  @property
  def targeted(self) -> bool:
    return self.target_class is not None


@dataclasses.dataclass(frozen=True)
class PushSettings(FinishSettings):
  """How to push (defaults: untargeted, the paper's selections, released labels).

  Attributes (and ``FinishSettings``'):
    zoo: ZOO settings. ``push`` sets its ``targeted`` (from ``target_class``) and
      ``stop_at_first_crossing`` (``pushing_ii == 'first_crossing'``).
    pushing_i: ``last`` (the paper's x^(t-1)) or ``largest_l2`` (released code).
    pushing_ii: ``first_crossing`` (the paper's x^(t)) or ``smallest_l2``
      (released code; runs ZOO to the end).
    stop_margin: kappa of the adaptive stop against a boundary-margin detector
      (not in the paper; needs the default selections). With kappa > 0,
      Pushing-I is the first iterate inside A whose oracle probability margin
      (top-1 minus top-2) falls below kappa (x^(t-1) if the trajectory crossed
      first), and Pushing-II the first crossing iterate whose margin is at least
      kappa (ZOO runs on past the first crossing until it finds one; raise
      ``zoo.kappa``, Eq. 5's confidence, so that it keeps pushing; status
      ``margin`` if none is found). 0 (default) is the paper's x^(t-1) / x^(t).
  """

  zoo: zoo.ZooSettings = dataclasses.field(default_factory=zoo.ZooSettings)
  pushing_i: str = "last"
  pushing_ii: str = "first_crossing"
  stop_margin: float = 0.0

  def __post_init__(self):
    if self.pushing_i not in PUSHING_I:
      raise ValueError(f"Unknown Pushing-I selection {self.pushing_i!r}; choose one "
                       f"of {PUSHING_I}.")
    if self.pushing_ii not in PUSHING_II:
      raise ValueError(f"Unknown Pushing-II selection {self.pushing_ii!r}; choose "
                       f"one of {PUSHING_II}.")
    super().__post_init__()
    if self.stop_margin > 0 and (self.pushing_i, self.pushing_ii) != (
        "last", "first_crossing"):
      raise ValueError("stop_margin > 0 needs pushing_i='last' and "
                       "pushing_ii='first_crossing'.")

  def zoo_settings(self) -> zoo.ZooSettings:
    """The ZOO settings a push runs with."""
    return dataclasses.replace(
        self.zoo, targeted=self.targeted,
        stop_at_first_crossing=self.pushing_ii == "first_crossing",
        stop_margin=self.stop_margin)


class Pushed(NamedTuple):
  """The samples of one pushing method (N of them; failures are NaN / -1).

  Attributes:
    images: (N, H, W, C) pushed images; NaN where ``success`` is False.
    labels: (N,) submitted labels (``label_mode``); -1 where not a success.
    l2: (N,) ``||x' - x||_2`` of the chosen iterate (NaN if none was found).
    predicted: (N,) the oracle's class for the chosen iterate (the verification
      query with ``verify``, else the trajectory's), -1 if none.
    iteration: (N,) the ZOO iteration of the chosen iterate, -1 if none.
    success: (N,) bool.
    status: (N,) str, ``ok`` or why not (``STATUSES``).
  """

  images: np.ndarray
  labels: np.ndarray
  l2: np.ndarray
  predicted: np.ndarray
  iteration: np.ndarray
  success: np.ndarray
  status: np.ndarray

  def successful(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, indices)`` of the successful samples only."""
    index = np.flatnonzero(self.success)
    return self.images[index], self.labels[index], index


class PushResult(NamedTuple):
  """Pushing-I and Pushing-II samples of one ZOO run, with the query accounting.

  Attributes:
    pushing_i, pushing_ii: ``Pushed``.
    original_labels: (N,) class A.
    predicted_before: (N,) the oracle's class for the clean images.
    attacked: (N,) bool, samples ZOO ran on (correctly classified, not already B).
    crossed: (N,) bool, the trajectory crossed.
    iterations: (N,) ZOO iterations run.
    attack_queries: (N,) ZOO queries (iterations x (2B + 1)).
    evaluation_queries: (N,) clean and verification queries.
    queries: (N,) all queries spent on the sample.
    oracle_queries: images the oracle answered in this push; equal to
      ``queries.sum()`` (finished and padding rows are masked out, ``zoo``
      module doc).
    oracle_state: the oracle state after the push.
    statistics: the host scheduler's ``scheduler.Statistics`` (slot occupancy).
  """

  pushing_i: Pushed
  pushing_ii: Pushed
  original_labels: np.ndarray
  predicted_before: np.ndarray
  attacked: np.ndarray
  crossed: np.ndarray
  iterations: np.ndarray
  attack_queries: np.ndarray
  evaluation_queries: np.ndarray
  queries: np.ndarray
  oracle_queries: int
  oracle_state: oracle_lib.OracleState
  statistics: scheduler.Statistics


def _chosen(state: zoo_state.ZooState, selection: str,
            stop_margin: float) -> trajectory.Iterate:
  if stop_margin > 0 and selection == "last":
    found = state.near_within.iteration >= 0
    return jax.tree_util.tree_map(
        lambda near, last: np.where(
            found.reshape(found.shape + (1,) * (near.ndim - 1)), near, last),
        state.near_within, state.last_within)
  if stop_margin > 0 and selection == "first_crossing":
    return state.far_across
  return {"last": state.last_within, "largest_l2": state.farthest_within,
          "first_crossing": state.first_crossing,
          "smallest_l2": state.closest_crossing}[selection]


class Clean(NamedTuple):
  """The clean query of the user's originals, before any pushing.

  Attributes:
    predicted_before: (N,) the oracle's class for the clean images.
    start_status: (N,) ``ok``, ``misclassified`` or (targeted) ``is_target``.
    attacked: (N,) bool, ``start_status == 'ok'``: the samples to push.
    first_query: the oracle's count before the push.
  """

  predicted_before: np.ndarray
  start_status: np.ndarray
  attacked: np.ndarray
  first_query: int


def clean_query(oracle: oracle_lib.Oracle, oracle_state, images, labels, *,
                target_class: int | None, batch_size: int):
  """One counted query per original; samples the model misclassifies (or already
  predicts as B) are not pushed, as in the released code (docs/protocol.md §8.1).

  Returns:
    ``(Clean, oracle_state)``.
  """
  first_query = int(oracle_state.queries)
  predicted_before, oracle_state = labels_lib.oracle_predictions(
      oracle, oracle_state, images, batch_size=batch_size)
  start_status = np.full(labels.shape, "ok", dtype="<U16")
  start_status[predicted_before != labels] = "misclassified"
  if target_class is not None:
    start_status[(start_status == "ok") & (labels == target_class)] = "is_target"
  return Clean(predicted_before, start_status, start_status == "ok",
               first_query), oracle_state


def finish_push(oracle: oracle_lib.Oracle, oracle_state, images, labels,
                clean: Clean, chosen: tuple[trajectory.Iterate, trajectory.Iterate],
                settings: FinishSettings, *, crossed, iterations, attack_queries,
                statistics: scheduler.Statistics,
                missing_ii: str = "no_crossing") -> PushResult:
  """Verification, status rules and the ``PushResult`` of any pusher (module doc).

  Args:
    oracle, oracle_state: the service and the count after the attack.
    images: (N, H, W, C) the originals; labels: (N,) class A.
    clean: ``clean_query``'s answer.
    chosen: the Pushing-I and Pushing-II ``trajectory.Iterate`` (numpy; a found
      one has ``iteration >= 0``; ``predicted`` is the attack's own class for it,
      -1 where it saw none).
    settings: ``FinishSettings`` (``PushSettings``, ``LabelOnlySettings``).
    crossed: (N,) bool, the attack crossed; iterations, attack_queries: (N,).
    statistics: the scheduler's.
    missing_ii: the status of a crossed sample without a Pushing-II iterate.

  With ``verify`` each found image is queried once more (counted) and must be
  predicted as A (Pushing-I), or not A / B (Pushing-II); without it the attack's
  own answers vouch for it. A success also needs a crossing and ``l2 <= max_l2``.
  """
  image_shape = tuple(images.shape[1:])
  evaluation_queries = np.ones(labels.shape, np.int32)
  pushed = []
  for iterate, within in zip(chosen, (True, False)):
    found = np.flatnonzero(iterate.iteration >= 0)
    predicted = np.full(labels.shape, -1, np.int32)
    verified = np.ones(labels.shape, bool)
    if settings.verify and len(found):
      predicted[found], oracle_state = labels_lib.oracle_predictions(
          oracle, oracle_state, iterate.image[found].reshape((-1,) + image_shape),
          batch_size=settings.evaluation_batch_size)
      evaluation_queries[found] += 1
    elif not settings.verify:
      predicted[found] = iterate.predicted[found]
    if settings.verify and within:
      verified = predicted == labels
    elif settings.verify and settings.target_class is not None:
      verified = predicted == settings.target_class
    elif settings.verify:
      verified = (predicted != labels) & (predicted >= 0)
    status = clean.start_status.copy()
    pending = status == "ok"
    has = iterate.iteration >= 0
    rules = [(np.logical_not(crossed), "no_crossing"),
             (np.logical_not(has), "crossed_at_start" if within else missing_ii),
             (np.logical_not(iterate.l2 <= settings.max_l2), "l2_bound"),
             (np.logical_not(verified), "verification")]
    for failed, reason in rules:
      status[pending & failed] = reason
      pending &= np.logical_not(failed)
    success = status == "ok"
    submitted = labels_lib.submitted_labels(
        settings.label_mode, original=labels, target=settings.target_class,
        predicted=predicted)
    pushed.append(Pushed(
        images=np.where(success[:, None], iterate.image, np.nan).astype(
            np.float32).reshape((-1,) + image_shape),
        labels=np.where(success, submitted, -1).astype(np.int32),
        l2=np.where(has, iterate.l2, np.nan).astype(np.float32),
        predicted=predicted, iteration=iterate.iteration.astype(np.int32),
        success=success, status=status))
  attack_queries = np.asarray(attack_queries, np.int32)
  return PushResult(
      pushing_i=pushed[0], pushing_ii=pushed[1], original_labels=labels,
      predicted_before=clean.predicted_before, attacked=clean.attacked,
      crossed=crossed & clean.attacked, iterations=iterations,
      attack_queries=attack_queries, evaluation_queries=evaluation_queries,
      queries=attack_queries + evaluation_queries,
      oracle_queries=int(oracle_state.queries) - clean.first_query,
      oracle_state=oracle_state, statistics=statistics)


def push(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
         settings: PushSettings, *,
         oracle_state: oracle_lib.OracleState | None = None,
         on_chunk: Callable[[scheduler.Progress], None] | None = None,
         resume: scheduler.Resume | None = None) -> PushResult:
  """Pushes the user's samples to the boundary with black-box ZOO (Sec. III-C).

  Queries: one clean query per sample (samples the model misclassifies, or already
  predicts as B, are not attacked, as in the released code), ``2B + 1`` per ZOO
  iteration, and one verification query per found Pushing-I/II iterate.

  Args:
    oracle: the black-box service (probabilities); never the model's parameters.
    images: (N, H, W, C) the user's samples in [-0.5, 0.5]; labels: (N,) class A.
    key: typed PRNG key (the ZOO coordinate draws), or (N,) keys, one per sample
      (``zoo.zoo_attack``).
    settings: ``PushSettings``.
    oracle_state: the user's query count so far (default ``oracle.init()``).
    on_chunk: progress callback, called with a ``scheduler.Progress``.
    resume: ``scheduler.Resume`` of the ZOO schedule: samples finished by an
      earlier run (their final ZOO states, not run again; the clean and
      verification queries are asked again), ``on_finished``, a deadline
      (``scheduler.DeadlineReached``). ``oracle_queries`` then counts this run's
      images only; ``queries`` still holds every sample's.

  Returns:
    ``PushResult``.

  Example (a tiny model, two ZOO iterations):

  >>> import jax, numpy as np
  >>> from ounl_jax import models, oracle as oracle_lib
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> oracle = oracle_lib.make_oracle(oracle_lib.Softmax(model.apply), variables,
  ...                                 input_shape=(8, 8, 3), num_classes=4)
  >>> x_u, y_u = np.zeros((2, 8, 8, 3), np.float32), np.array([0, 0])
  >>> settings = PushSettings(zoo=zoo.ZooSettings(max_iterations=2,
  ...                                             iterations_per_chunk=2),
  ...                         target_class=3, label_mode="prediction")
  >>> result = push(oracle, x_u, y_u, jax.random.key(1216), settings)
  >>> images, labels, index = result.pushing_ii.successful()
  >>> len(images) == len(labels) == len(index) <= 2
  True

  A server then unlearns them: ``service.unlearn(UnlearningRequest(images,
  labels))`` (``ounl_jax.service``).
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  oracle_state = oracle.init() if oracle_state is None else oracle_state
  clean, oracle_state = clean_query(oracle, oracle_state, images, labels,
                                    target_class=settings.target_class,
                                    batch_size=settings.evaluation_batch_size)
  result = zoo.zoo_attack(oracle, images, labels, key, settings.zoo_settings(),
                          targets=settings.target_class, active=clean.attacked,
                          oracle_state=oracle_state, on_chunk=on_chunk,
                          resume=resume)
  state = result.state
  chosen = (_chosen(state, settings.pushing_i, settings.stop_margin),
            _chosen(state, settings.pushing_ii, settings.stop_margin))
  return finish_push(oracle, result.oracle_state, images, labels, clean, chosen,
                     settings, crossed=state.crossed, iterations=state.iterations,
                     attack_queries=state.queries, statistics=result.statistics,
                     missing_ii="margin" if settings.stop_margin > 0
                     else "no_crossing")
