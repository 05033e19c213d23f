"""The black-box oracle handed to a (malicious) user (threat model, paper Sec. II-B).

The user sees only what an MLaaS prediction API answers: class probabilities (the
released model ends in a softmax; docs/protocol.md §8.1) or labels only. The oracle
follows optax's shape: ``init() -> OracleState`` and
``query(state, images, mask=None) -> (answers, state)``, both pure and jittable, with
the number of answered images in the state so that counting survives ``jit``,
``vmap`` and ``lax.scan``.

Parameters as jit arguments. ``make_oracle(apply, parameters, ...)`` keeps the
server's parameters in the ``OracleState`` as an opaque ``ServerHandle`` (a pytree
leaf group the attack code never reads: it stands for the connection to the server).
A compiled attack therefore receives the parameters as an argument, and
``Oracle.static()`` (the oracle without its handle) is hashable and equal for two
oracles over the same ``apply``: they share one compilation, and no compiled
executable or jit cache pins a parameter set. The legacy form
``make_oracle(predict_probabilities, ...)`` (one argument, a closure over the
parameters) still works: there the parameters are compile-time constants, so every
such oracle compiles its own attack and JAX's jit caches keep its closure alive
(``jax.clear_caches()`` frees them). Note that XLA constant-folds parts of a model
with constant parameters (e.g. BatchNorm's ``rsqrt(var + eps)``), so the two forms
can differ in the last float32 bit, which a ZOO trajectory amplifies
(docs/protocol.md §19).

Input validation. The service takes float images (N, H, W, C) in [-0.5, 0.5]
(``x / 255 - 0.5``). A non-float dtype is refused always (it is static). Called
eagerly, a query with a non-finite pixel or a pixel outside [-0.5, 0.5] (tolerance
``PIXEL_TOLERANCE``) raises ``ValueError`` and nothing is counted. Inside ``jit``
(where no exception can be raised) such an image is answered NaN (probabilities) or
-1 (labels) and not counted. An empty query returns an empty answer and counts 0.

Mask. ``query(state, images, mask)`` answers and counts only the images whose
``mask`` is True; the others are answered NaN / -1, are not counted and are not
validated (padding rows may hold anything). The server still evaluates the whole
fixed-shape batch, so a masked row costs compute but no query.

Size cap: when ``max_query_images`` is set (the service passes its
``RequestLimits.max_request_images``), an eager query of more images raises
``QueryTooLarge`` before anything is copied or converted. The size, the dtype,
the shape and the budget are all checked before the batch is converted to a
float32 host array, so a refused query costs no memory. Inside ``jit`` a batch is
the compiled attack's own fixed-shape batch (many API calls fused into one
program, e.g. ZOO's 257 probes per sample and iteration), so the cap does not
apply there; every image still counts against the budget.

Budget: when ``budget`` is set, a query that would exceed it raises
``QueryBudgetExceeded`` when called eagerly. Inside ``jit`` the over-budget answers
are NaN (probabilities) or -1 (labels), nothing more is counted, and
``state.exceeded`` is set; callers check it with ``check_budget`` at the host
boundary, which raises the same error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OUTPUTS = ("probabilities", "labels")
# Pixels may exceed [-0.5, 0.5] by this much (float32 rounding of x / 255 - 0.5).
PIXEL_TOLERANCE = 1e-6


class QueryBudgetExceeded(RuntimeError):
  """The user asked for more predictions than the service allows."""


class QueryTooLarge(ValueError):
  """One eager query holds more images than the server answers at once."""


def row_count(images) -> int:
  """The number of images, read without converting (copying) anything."""
  shape = getattr(images, "shape", None)
  if shape is not None:
    return int(shape[0]) if len(shape) else 0
  try:
    return len(images)
  except TypeError as error:
    raise ValueError(f"The oracle takes an array of images (N, H, W, C), got "
                     f"{type(images).__name__}.") from error


class ServerHandle:
  """The server's side of an oracle state: opaque to the attack code.

  A pytree node whose leaves are the server's parameters, so that compiled code
  receives them as arguments. Attack code passes it along and never reads it.
  """

  __slots__ = ("_parameters",)

  def __init__(self, parameters):
    self._parameters = parameters

  def __repr__(self) -> str:
    return "ServerHandle(<opaque>)"


def _flatten_server(handle: ServerHandle):
  return (handle._parameters,), None  # pylint: disable=protected-access


jax.tree_util.register_pytree_node(ServerHandle, _flatten_server,
                                   lambda _, children: ServerHandle(children[0]))


class OracleState(NamedTuple):
  """``queries``: images answered so far (int32); ``exceeded``: a refused query;
  ``server``: the opaque ``ServerHandle`` (None for a legacy closure oracle)."""

  queries: jax.Array
  exceeded: jax.Array
  server: ServerHandle | None = None


@dataclasses.dataclass(frozen=True)
class Softmax:
  """``apply(parameters, images) = softmax(logits(parameters, images))``.

  Hashable by ``logits``: pass the same function (e.g. one model's ``apply``) and
  oracles over different parameter values share their compilations.
  """

  logits: Callable[[Any, jax.Array], jax.Array]

  def __call__(self, parameters, images):
    return jax.nn.softmax(self.logits(parameters, images))


@dataclasses.dataclass(frozen=True)
class _Closure:
  """The legacy form: ``predict_probabilities(images)`` closes over the parameters."""

  predict_probabilities: Callable[[jax.Array], jax.Array]

  def __call__(self, parameters, images):
    del parameters  # Compile-time constants inside the closure.
    return self.predict_probabilities(images)


def _is_traced(*trees) -> bool:
  return any(isinstance(leaf, jax.core.Tracer)
             for leaf in jax.tree_util.tree_leaves(trees))


def valid_images(images: jax.Array) -> jax.Array:
  """(N,) True where every pixel is finite and in [-0.5, 0.5] (+- tolerance)."""
  bound = 0.5 + PIXEL_TOLERANCE
  ok = jnp.isfinite(images) & (jnp.abs(images) <= bound)
  return jnp.all(ok.reshape(images.shape[0], -1), axis=-1)


def _check_pixels_eagerly(images: np.ndarray, mask: np.ndarray) -> None:
  """Raises ``ValueError`` naming the fix for non-finite or out-of-range pixels."""
  sent = images[mask]
  if sent.size == 0:
    return
  if not np.isfinite(sent).all():
    bad = np.flatnonzero(mask)[np.flatnonzero(
        ~np.isfinite(sent.reshape(len(sent), -1)).all(-1))]
    raise ValueError(f"The oracle refuses non-finite pixels (NaN or inf) in images "
                     f"{bad[:5].tolist()}; send finite images in [-0.5, 0.5]. "
                     "Nothing was counted.")
  low, high = float(sent.min()), float(sent.max())
  if low < -0.5 - PIXEL_TOLERANCE or high > 0.5 + PIXEL_TOLERANCE:
    raise ValueError(f"The oracle takes pixels in [-0.5, 0.5]; got values in "
                     f"[{low:g}, {high:g}]. Send x / 255 - 0.5 for 0..255 images. "
                     "Nothing was counted.")


def _refused(output: str, answered, probabilities):
  if output == "labels":
    return jnp.where(answered, jnp.argmax(probabilities, -1), -1).astype(jnp.int32)
  return jnp.where(answered[:, None], probabilities, jnp.nan)


@dataclasses.dataclass(frozen=True)
class Query:
  """``query(state, images, mask=None) -> (answers, new_state)``; see module doc.

  Holds no parameter: hashable, and equal for two oracles over the same ``apply``.
  """

  apply: Callable[[Any, jax.Array], jax.Array]
  output: str
  budget: int | None
  input_shape: tuple[int, ...]
  num_classes: int
  max_query_images: int | None = None

  def _check_size(self, images) -> None:
    """``QueryTooLarge`` above the cap, read from the shape (no copy)."""
    count = row_count(images)
    if self.max_query_images is not None and count > self.max_query_images:
      raise QueryTooLarge(
          f"Query of {count} images exceeds this server's limit of "
          f"{self.max_query_images} images per query; split it into several "
          "queries. Nothing was counted.")

  def _images(self, images):
    if not hasattr(images, "dtype"):  # A list: size checked, the copy is bounded.
      images = np.asarray(images)
    dtype = images.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"The oracle takes float images in [-0.5, 0.5]; got dtype "
                       f"{dtype}. Send x.astype(np.float32) / 255 - 0.5.")
    if len(np.shape(images)) != 4 or tuple(np.shape(images)[1:]) != self.input_shape:
      raise ValueError(f"The oracle takes images of shape (N, {self.input_shape}); "
                       f"got {tuple(np.shape(images))}.")
    return images

  def __call__(self, state: OracleState, images, mask=None):
    traced = _is_traced(state, images, mask)
    if not traced:  # Size first, before anything is converted or copied.
      self._check_size(images)
    images = self._images(images)
    count = images.shape[0]
    if count == 0:  # Nothing sent, nothing answered, nothing counted.
      empty = (jnp.zeros((0,), jnp.int32) if self.output == "labels"
               else jnp.zeros((0, self.num_classes), jnp.float32))
      return empty, state
    if traced:
      return self.answer(state, jnp.asarray(images, jnp.float32), mask)
    sent = (np.ones((count,), bool) if mask is None
            else np.broadcast_to(np.asarray(mask, bool), (count,)))
    if self.budget is not None:  # Before the batch is converted.
      requested = int(sent.sum())
      if bool(state.exceeded) or int(state.queries) + requested > self.budget:
        raise QueryBudgetExceeded(
            f"Query budget of {self.budget} images exceeded: {int(state.queries)} "
            f"answered, {requested} more requested.")
    host = np.asarray(images, np.float32)
    _check_pixels_eagerly(host, sent)
    return _answer_compiled(self, state, host, sent)

  def answer(self, state: OracleState, images: jax.Array, mask=None):
    """The jittable query (no exception): invalid and masked rows not answered."""
    count = images.shape[0]
    sent = (jnp.ones((count,), bool) if mask is None
            else jnp.broadcast_to(jnp.asarray(mask, bool), (count,)))
    answered = sent & valid_images(images)
    new_total = state.queries + jnp.sum(answered, dtype=jnp.int32)
    allowed = (jnp.bool_(True) if self.budget is None
               else jnp.logical_and(new_total <= self.budget,
                                    jnp.logical_not(state.exceeded)))
    parameters = (None if state.server is None
                  else state.server._parameters)  # pylint: disable=protected-access
    probabilities = self.apply(parameters, images)
    answers = _refused(self.output, answered & allowed, probabilities)
    new_state = state._replace(
        queries=jnp.where(allowed, new_total, state.queries),
        exceeded=jnp.logical_or(state.exceeded, jnp.logical_not(allowed)))
    return answers, new_state


# One jitted eager path for every oracle: the query (no parameter) is static.
_answer_compiled = jax.jit(Query.answer, static_argnums=0)


class _Init:
  """``init() -> OracleState`` with zero queries and the server's handle."""

  __slots__ = ("_parameters",)

  def __init__(self, parameters):
    self._parameters = parameters

  def __call__(self) -> OracleState:
    server = None if self._parameters is None else ServerHandle(self._parameters)
    return OracleState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_), server)

  def __repr__(self) -> str:
    return "init"


def _static_init() -> OracleState:
  raise RuntimeError("Oracle.static() is the oracle without its server, for "
                     "compiled attack code; call init() on the oracle itself.")


class Oracle(NamedTuple):
  """A black-box prediction service.

  Attributes:
    init: ``init() -> OracleState`` with zero queries (and the server's handle).
    query: ``query(state, images, mask=None) -> (answers, new_state)`` for a batch
      of images (N, H, W, C) in [-0.5, 0.5]; answers are (N, K) probabilities or
      (N,) labels. A hashable ``Query``.
    output: ``'probabilities'`` or ``'labels'``.
    budget: maximum number of images answered, or None.
    input_shape: (H, W, C) the service accepts.
    num_classes: K.
  """

  init: Callable[[], OracleState]
  query: Callable[..., tuple[jax.Array, OracleState]]
  output: str
  budget: int | None
  input_shape: tuple[int, ...]
  num_classes: int

  def static(self) -> "Oracle":
    """This oracle without its server: hashable, parameter-free, and equal for
    two oracles over the same ``apply``; a static argument for compiled attacks
    (their ``OracleState`` carries the parameters)."""
    return self._replace(init=_static_init)


def make_oracle(apply: Callable, parameters: Any = None, *,
                input_shape: tuple[int, ...], num_classes: int,
                output: str = "probabilities",
                budget: int | None = None,
                max_query_images: int | None = None) -> Oracle:
  """Wraps a prediction function as a counted oracle.

  Args:
    apply: ``apply(parameters, images) -> probabilities`` (pure; e.g.
      ``Softmax(model.apply)``), or, when ``parameters`` is None, the legacy
      ``predict_probabilities(images)`` closing over the parameters.
    parameters: the server's parameters (a pytree of arrays), carried in the
      ``OracleState`` as an opaque ``ServerHandle``; None for the legacy form.
    input_shape: (H, W, C) of one image.
    num_classes: number of classes K.
    output: ``'probabilities'`` (default, the paper's setting) or ``'labels'``.
    budget: optional maximum number of images answered in total.
    max_query_images: optional maximum number of images in one eager query
      (``QueryTooLarge`` above it, checked before any copy); not applied inside
      ``jit`` (see the module docstring).

  Example (a tiny model):

  >>> import jax, numpy as np
  >>> from ounl_jax import models
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> oracle = make_oracle(Softmax(model.apply), variables,
  ...                      input_shape=model.input_shape, num_classes=4)
  >>> answers, state = oracle.query(oracle.init(),
  ...                               np.zeros((3, 8, 8, 3), np.float32))
  >>> answers.shape, int(state.queries)
  ((3, 4), 3)
  """
  if output not in OUTPUTS:
    raise ValueError(f"Unknown oracle output {output!r}; choose one of {OUTPUTS}.")
  if budget is not None and budget < 0:
    raise ValueError(f"Query budget must be >= 0, got {budget}.")
  if max_query_images is not None and max_query_images < 1:
    raise ValueError(f"max_query_images must be >= 1, got {max_query_images}.")
  if parameters is None:
    apply = _Closure(apply)
  query = Query(apply, output, budget, tuple(input_shape), num_classes,
                max_query_images)
  return Oracle(_Init(parameters), query, output, budget, tuple(input_shape),
                num_classes)


def check_budget(oracle: Oracle, state: OracleState) -> None:
  """Raises ``QueryBudgetExceeded`` if a query inside jit was refused."""
  if bool(state.exceeded):
    raise QueryBudgetExceeded(
        f"Query budget of {oracle.budget} images exceeded inside a compiled "
        f"attack after {int(state.queries)} answered queries; the refused answers "
        "were NaN and must not be used. Raise the budget or attack fewer samples.")
