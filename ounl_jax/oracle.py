"""The black-box oracle handed to a (malicious) user (threat model, paper Sec. II-B).

The user sees only what an MLaaS prediction API answers: class probabilities (the
released model ends in a softmax; PROTOCOL section 8.1) or labels only. The oracle
follows optax's shape: ``init() -> OracleState`` and
``query(state, images) -> (answers, state)``, both pure and jittable, with the number
of queried images in the state so that counting survives ``jit``, ``vmap`` and
``lax.scan``. An ``Oracle`` holds functions only: the model's parameters live in a
closure the attack code never receives.

Budget: when ``budget`` is set, a query that would exceed it raises
``QueryBudgetExceeded`` when called eagerly. Inside ``jit`` (where no exception can
be raised) the over-budget answers are NaN (probabilities) or -1 (labels), nothing
more is counted, and ``state.exceeded`` is set; callers check it with
``check_budget`` at the host boundary, which raises the same error.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

OUTPUTS = ("probabilities", "labels")


class QueryBudgetExceeded(RuntimeError):
  """The user asked for more predictions than the service allows."""


class OracleState(NamedTuple):
  """``queries``: images answered so far (int32); ``exceeded``: a refused query."""

  queries: jax.Array
  exceeded: jax.Array


class Oracle(NamedTuple):
  """A black-box prediction service.

  Attributes:
    init: ``init() -> OracleState`` with zero queries.
    query: ``query(state, images) -> (answers, new_state)`` for a batch of images
      (N, H, W, C) in [-0.5, 0.5]; answers are (N, K) probabilities or (N,) labels.
    output: ``'probabilities'`` or ``'labels'``.
    budget: maximum number of images answered, or None.
    input_shape: (H, W, C) the service accepts.
    num_classes: K.
  """

  init: Callable[[], OracleState]
  query: Callable[[OracleState, jax.Array], tuple[jax.Array, OracleState]]
  output: str
  budget: int | None
  input_shape: tuple[int, ...]
  num_classes: int


def make_oracle(predict_probabilities: Callable[[jax.Array], jax.Array], *,
                input_shape: tuple[int, ...], num_classes: int,
                output: str = "probabilities",
                budget: int | None = None) -> Oracle:
  """Wraps a prediction function (images -> probabilities) as a counted oracle.

  Args:
    predict_probabilities: pure function of a batch of images; it closes over the
      server's parameters, which the returned ``Oracle`` never exposes.
    input_shape: (H, W, C) of one image.
    num_classes: number of classes K.
    output: ``'probabilities'`` (default, the paper's setting) or ``'labels'``.
    budget: optional maximum number of images answered in total.
  """
  if output not in OUTPUTS:
    raise ValueError(f"Unknown oracle output {output!r}; choose one of {OUTPUTS}.")
  if budget is not None and budget < 0:
    raise ValueError(f"Query budget must be >= 0, got {budget}.")

  def init() -> OracleState:
    return OracleState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_))

  def query(state: OracleState, images: jax.Array):
    images = jnp.asarray(images, jnp.float32)
    if images.shape[1:] != tuple(input_shape):
      raise ValueError(f"The oracle takes images of shape (N, {input_shape}); "
                       f"got {images.shape}.")
    count = images.shape[0]
    new_total = state.queries + count
    allowed = (jnp.bool_(True) if budget is None
               else jnp.logical_and(new_total <= budget,
                                    jnp.logical_not(state.exceeded)))
    if budget is not None and not isinstance(allowed, jax.core.Tracer):
      if not bool(allowed):
        raise QueryBudgetExceeded(
            f"Query budget of {budget} images exceeded: {int(state.queries)} "
            f"answered, {count} more requested.")
    probabilities = predict_probabilities(images)
    if output == "labels":
      answers = jnp.where(allowed, jnp.argmax(probabilities, -1), -1)
    else:
      answers = jnp.where(allowed, probabilities, jnp.nan)
    new_state = OracleState(jnp.where(allowed, new_total, state.queries),
                            jnp.logical_or(state.exceeded,
                                           jnp.logical_not(allowed)))
    return answers, new_state

  return Oracle(init, query, output, budget, tuple(input_shape), num_classes)


def check_budget(oracle: Oracle, state: OracleState) -> None:
  """Raises ``QueryBudgetExceeded`` if a query inside jit was refused."""
  if bool(state.exceeded):
    raise QueryBudgetExceeded(
        f"Query budget of {oracle.budget} images exceeded inside a compiled "
        f"attack after {int(state.queries)} answered queries; the refused answers "
        "were NaN and must not be used. Raise the budget or attack fewer samples.")
