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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import numpy as np

from ounl_jax import oracle as oracle_lib
from ounl_jax.attacks import labels as labels_lib
from ounl_jax.attacks import zoo

PUSHING_I = ("last", "largest_l2")
PUSHING_II = ("first_crossing", "smallest_l2")
# Why a sample is not a success (``Pushed.status``).
STATUSES = ("ok", "misclassified", "is_target", "no_crossing", "crossed_at_start",
            "l2_bound", "verification", "margin")


@dataclasses.dataclass(frozen=True)
class PushSettings:
  """How to push (defaults: untargeted, the paper's selections, released labels).

  Attributes:
    zoo: ZOO settings. ``push`` sets its ``targeted`` (from ``target_class``) and
      ``stop_at_first_crossing`` (``pushing_ii == 'first_crossing'``).
    target_class: class B for targeted pushing (Tables V-VI), None for untargeted.
    pushing_i: ``last`` (the paper's x^(t-1)) or ``largest_l2`` (released code).
    pushing_ii: ``first_crossing`` (the paper's x^(t)) or ``smallest_l2``
      (released code; runs ZOO to the end).
    max_l2: the L2 bound on ``||x' - x||_2`` in [-0.5, 0.5] units (20).
    label_mode: submitted label: ``original`` (released default), ``prediction``
      (the oracle's class for the pushed image) or ``target`` (class B).
    verify: query the chosen images once more and require the expected class.
    evaluation_batch_size: images per evaluation query.
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
  target_class: int | None = None
  pushing_i: str = "last"
  pushing_ii: str = "first_crossing"
  max_l2: float = 20.0
  label_mode: str = "original"
  verify: bool = True
  evaluation_batch_size: int = 256
  stop_margin: float = 0.0

  def __post_init__(self):
    if self.pushing_i not in PUSHING_I:
      raise ValueError(f"Unknown Pushing-I selection {self.pushing_i!r}; choose one "
                       f"of {PUSHING_I}.")
    if self.pushing_ii not in PUSHING_II:
      raise ValueError(f"Unknown Pushing-II selection {self.pushing_ii!r}; choose "
                       f"one of {PUSHING_II}.")
    labels_lib.check_label_mode(self.label_mode,
                                has_target=self.target_class is not None)
    if not (math.isfinite(self.max_l2) and self.max_l2 > 0):
      raise ValueError(f"max_l2 must be a positive finite number, got "
                       f"{self.max_l2}.")
    if self.stop_margin > 0 and (self.pushing_i, self.pushing_ii) != (
        "last", "first_crossing"):
      raise ValueError("stop_margin > 0 needs pushing_i='last' and "
                       "pushing_ii='first_crossing'.")

  @property
  def targeted(self) -> bool:
    return self.target_class is not None

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


def _chosen(state: zoo.ZooState, selection: str, stop_margin: float) -> zoo.Iterate:
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


def _verify(oracle, oracle_state, iterate: zoo.Iterate, image_shape, settings):
  """Re-queries the found iterates; returns their classes (-1 if none)."""
  found = np.flatnonzero(iterate.iteration >= 0)
  predicted = np.full(iterate.iteration.shape, -1, np.int32)
  if not settings.verify:
    predicted[found] = iterate.predicted[found]
    return predicted, oracle_state, np.zeros(predicted.shape, np.int32)
  images = iterate.image[found].reshape((-1,) + tuple(image_shape))
  predicted[found], oracle_state = labels_lib.oracle_predictions(
      oracle, oracle_state, images, batch_size=settings.evaluation_batch_size)
  queries = np.zeros(predicted.shape, np.int32)
  queries[found] = 1
  return predicted, oracle_state, queries


def _status(start_status, crossed, iterate: zoo.Iterate, verified_ok, max_l2,
            *, within: bool, margin: bool = False) -> np.ndarray:
  status = start_status.copy()
  pending = status == "ok"
  found = iterate.iteration >= 0
  missing = ("crossed_at_start" if within else "margin" if margin
             else "no_crossing")
  rules = [(np.logical_not(crossed), "no_crossing"),
           (np.logical_not(found), missing),
           (np.logical_not(iterate.l2 <= max_l2), "l2_bound"),
           (np.logical_not(verified_ok), "verification")]
  for failed, reason in rules:
    status[pending & failed] = reason
    pending &= np.logical_not(failed)
  return status


def _pushed(iterate: zoo.Iterate, status, predicted, original, settings,
            image_shape) -> Pushed:
  success = status == "ok"
  images = np.where(success[:, None], iterate.image, np.nan).astype(np.float32)
  labels = labels_lib.submitted_labels(settings.label_mode, original=original,
                                       target=settings.target_class,
                                       predicted=predicted)
  found = iterate.iteration >= 0
  return Pushed(images=images.reshape((-1,) + tuple(image_shape)),
                labels=np.where(success, labels, -1).astype(np.int32),
                l2=np.where(found, iterate.l2, np.nan).astype(np.float32),
                predicted=predicted, iteration=iterate.iteration.astype(np.int32),
                success=success, status=status)


def push(oracle: oracle_lib.Oracle, images, labels, key: jax.Array,
         settings: PushSettings, *,
         oracle_state: oracle_lib.OracleState | None = None,
         on_chunk: Callable[[zoo.ZooProgress], None] | None = None) -> PushResult:
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
    on_chunk: progress callback, called with a ``zoo.ZooProgress``.

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
  image_shape = images.shape[1:]
  oracle_state = oracle.init() if oracle_state is None else oracle_state
  first_query = int(oracle_state.queries)
  predicted_before, oracle_state = labels_lib.oracle_predictions(
      oracle, oracle_state, images, batch_size=settings.evaluation_batch_size)
  start_status = np.full(labels.shape, "ok", dtype="<U16")
  start_status[predicted_before != labels] = "misclassified"
  if settings.targeted:
    is_target = (start_status == "ok") & (labels == settings.target_class)
    start_status[is_target] = "is_target"
  attacked = start_status == "ok"

  result = zoo.zoo_attack(oracle, images, labels, key, settings.zoo_settings(),
                          targets=settings.target_class, active=attacked,
                          oracle_state=oracle_state, on_chunk=on_chunk)
  state, oracle_state = result.state, result.oracle_state
  evaluation_queries = np.ones(labels.shape, np.int32)
  pushed = []
  for selection, within in ((settings.pushing_i, True),
                            (settings.pushing_ii, False)):
    iterate = _chosen(state, selection, settings.stop_margin)
    predicted, oracle_state, verify_queries = _verify(
        oracle, oracle_state, iterate, image_shape, settings)
    evaluation_queries += verify_queries
    if within:
      verified_ok = predicted == labels
    elif settings.targeted:
      verified_ok = predicted == settings.target_class
    else:
      verified_ok = (predicted != labels) & (predicted >= 0)
    status = _status(start_status, state.crossed, iterate, verified_ok,
                     settings.max_l2, within=within,
                     margin=settings.stop_margin > 0)
    pushed.append(_pushed(iterate, status, predicted, labels, settings, image_shape))

  attack_queries = state.queries.astype(np.int32)
  return PushResult(
      pushing_i=pushed[0], pushing_ii=pushed[1], original_labels=labels,
      predicted_before=predicted_before, attacked=attacked,
      crossed=state.crossed & attacked, iterations=state.iterations,
      attack_queries=attack_queries, evaluation_queries=evaluation_queries,
      queries=attack_queries + evaluation_queries,
      oracle_queries=int(oracle_state.queries) - first_query,
      oracle_state=oracle_state)
