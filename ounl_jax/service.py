"""The MLaaS server of the threat model (paper Sec. II-B, App. A).

The server holds a trained model and a test set, but no training data. Users see
exactly two operations:

* ``predict(x)``: class probabilities (or labels only, a setting) in inference mode;
* ``unlearn(request) -> Receipt``: a request is images plus submitted labels; the
  server runs its pre-selected data-free method (``ounl_jax.unlearning``) on it.

Attack code receives only ``oracle()``, a counted black-box ``ounl_jax.oracle.Oracle``
over the model as it is when handed out. The operator measures the model on the
server's own test set with ``evaluate`` (PROTOCOL section 11).

``UnlearningService`` is the one stateful object: it owns the parameters (private,
changed only by ``unlearn``) and a request counter that derives each request's key.
All the maths lives in the pure functions of ``unlearning``, ``evaluation`` and the
validation functions below. A malformed request raises ``InvalidRequestError`` and
leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax import unlearning

PIXEL_MIN, PIXEL_MAX = -0.5, 0.5
# Float slack on the pixel range (tanh and blending round at the last bit).
PIXEL_TOLERANCE = 1e-6
PREDICT_BATCH_SIZE = 500


class InvalidRequestError(ValueError):
  """A prediction or unlearning request the server refuses; nothing changed."""


class UnlearningDiverged(RuntimeError):
  """The unlearning update produced non-finite parameters; the model is kept."""


class UnlearningRequest(NamedTuple):
  """What a user submits: images (N, H, W, C) in [-0.5, 0.5] and labels (N,)."""

  images: Any
  labels: Any


@dataclasses.dataclass(frozen=True)
class Receipt:
  """What the server reports back after fulfilling a request.

  Attributes:
    request_number: 0 for the first unlearning request, then 1, 2, ...
    method: the unlearning method's name.
    num_samples: how many samples were unlearned.
    seconds: wall time of the update (compilation included).
    settings: the method's settings.
  """

  request_number: int
  method: str
  num_samples: int
  seconds: float
  settings: dict


def validate_images(images, input_shape: tuple[int, ...]) -> np.ndarray:
  """Float32 images (N, *input_shape) in [-0.5, 0.5], or ``InvalidRequestError``."""
  images = np.asarray(images)
  if images.dtype == object or not (np.issubdtype(images.dtype, np.floating)
                                    or np.issubdtype(images.dtype, np.integer)):
    raise InvalidRequestError(f"Images must be a numeric array, got dtype "
                              f"{images.dtype}.")
  expected = tuple(input_shape)
  if images.ndim != len(expected) + 1 or images.shape[1:] != expected:
    raise InvalidRequestError(
        f"Images must have shape (N, {', '.join(map(str, expected))}); got "
        f"{images.shape}. Stack single images with x[None].")
  if images.shape[0] == 0:
    raise InvalidRequestError("Empty request: it holds no image.")
  images = images.astype(np.float32)
  if not np.isfinite(images).all():
    raise InvalidRequestError(
        f"{int(np.sum(~np.isfinite(images)))} pixel values are NaN or infinite.")
  low, high = float(images.min()), float(images.max())
  if low < PIXEL_MIN - PIXEL_TOLERANCE or high > PIXEL_MAX + PIXEL_TOLERANCE:
    hint = (" They look like uint8 pixels: send x / 255 - 0.5." if high > 1.5
            else " Map pixels as x / 255 - 0.5.")
    raise InvalidRequestError(
        f"Pixels must lie in [{PIXEL_MIN}, {PIXEL_MAX}]; got [{low:.4g}, "
        f"{high:.4g}].{hint}")
  return np.clip(images, PIXEL_MIN, PIXEL_MAX)


def validate_labels(labels, count: int, num_classes: int) -> np.ndarray:
  """Int32 labels (count,) in [0, num_classes), or ``InvalidRequestError``."""
  labels = np.asarray(labels)
  if labels.shape != (count,):
    raise InvalidRequestError(
        f"Expected {count} labels (one per image, shape ({count},)); got shape "
        f"{labels.shape}. Send integer class indices, not one-hot vectors.")
  if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
    raise InvalidRequestError(
        f"Labels must be integer class indices, got dtype {labels.dtype}.")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise InvalidRequestError(
        f"{int(bad.sum())} labels are outside 0..{num_classes - 1} (e.g. "
        f"{int(labels[bad][0])}).")
  return labels.astype(np.int32)


def validate_request(request, *, input_shape: tuple[int, ...],
                     num_classes: int) -> UnlearningRequest:
  """The request with checked, normalised images and labels.

  Raises:
    InvalidRequestError: not an (images, labels) pair, empty, wrong shape, NaN or
      out-of-range pixels, labels of the wrong shape, type or range.
  """
  try:
    images, labels = request
  except (TypeError, ValueError) as error:
    raise InvalidRequestError(
        "An unlearning request is a pair (images, labels), e.g. "
        "UnlearningRequest(images, labels).") from error
  images = validate_images(images, input_shape)
  return UnlearningRequest(images, validate_labels(labels, len(images),
                                                   num_classes))


@functools.lru_cache(maxsize=16)
def _probabilities_fn(model: models.Model):
  """Jitted inference-mode softmax of ``model`` (cached per model)."""
  return jax.jit(lambda variables, x: jax.nn.softmax(model.apply(variables, x)))


def predict_probabilities(model: models.Model, variables, images: np.ndarray, *,
                          batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
  """Softmax probabilities in fixed-size batches (the last one padded)."""
  fn = _probabilities_fn(model)
  count = len(images)
  size = min(batch_size, count)
  answers = []
  for start in range(0, count, size):
    chunk = images[start:start + size]
    pad = size - len(chunk)
    chunk = np.pad(chunk, ((0, pad),) + ((0, 0),) * (chunk.ndim - 1))
    answers.append(np.asarray(fn(variables, chunk))[:size - pad])
  return np.concatenate(answers)


def _all_finite(variables) -> bool:
  leaves = jax.tree_util.tree_leaves(variables)
  return bool(jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves])))


class ServiceEvaluation(NamedTuple):
  """The current model on the server's test set, against the clean model.

  ``histogram`` (only with a class A) counts the current predictions on the class-A
  test samples that the clean model (before any unlearning) got right.
  """

  report: evaluation.Report
  histogram: np.ndarray | None


class UnlearningService:
  """A prediction service that fulfils unlearning requests (threat model, Sec. II-B).

  Example::

    service = UnlearningService(model, variables, splits.test,
                                method="first_order", key=jax.random.key(88))
    receipt = service.unlearn(UnlearningRequest(x_u, y_u))
    oracle = service.oracle(budget=10_000)   # all an attacker gets
  """

  def __init__(self, model: models.Model, variables, test_set: data_lib.LabelledImages,
               *, key: jax.Array, method: str = "first_order",
               settings: Any = None, output: str = "probabilities"):
    """Builds the server.

    Args:
      model: the deployed model.
      variables: its trained ``{'params', 'batch_stats'}`` (kept private).
      test_set: the server's own labelled test set (for ``evaluate``).
      key: the server's randomness; request k uses ``fold_in(key, k)``.
      method: ``first_order`` (default), ``fine_tune`` or ``gradient_ascent``.
      settings: the method's settings; None takes the released code's defaults.
      output: ``probabilities`` (the paper's API) or ``labels``.
    """
    if output not in oracle_lib.OUTPUTS:
      raise ValueError(f"Unknown output {output!r}; choose one of "
                       f"{oracle_lib.OUTPUTS}.")
    self._method = unlearning.get_method(method)
    self._settings = (self._method.settings_class() if settings is None
                      else settings)
    if not isinstance(self._settings, self._method.settings_class):
      raise ValueError(f"Method {self._method.name!r} takes "
                       f"{self._method.settings_class.__name__}, got "
                       f"{type(self._settings).__name__}.")
    self._model = model
    self._variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self._test_set = test_set
    self._key = key
    self._output = output
    self._requests = 0
    self._clean_predictions = None

  @property
  def method(self) -> str:
    return self._method.name

  @property
  def settings(self) -> Any:
    return self._settings

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self._model.input_shape)

  @property
  def num_classes(self) -> int:
    return self._model.num_classes

  @property
  def requests_served(self) -> int:
    return self._requests

  def predict(self, images) -> np.ndarray:
    """Probabilities (N, K), or labels (N,) when built with ``output='labels'``.

    Raises:
      InvalidRequestError: empty, wrong shape, NaN or out-of-range pixels.
    """
    images = validate_images(images, self.input_shape)
    probabilities = predict_probabilities(self._model, self._variables, images)
    if self._output == "labels":
      return np.argmax(probabilities, -1).astype(np.int32)
    return probabilities

  def unlearn(self, request) -> Receipt:
    """Fulfils an unlearning request with the server's method.

    Args:
      request: ``UnlearningRequest(images, labels)`` (any (images, labels) pair).

    Returns:
      A ``Receipt``.

    Raises:
      InvalidRequestError: a malformed request (the model is unchanged).
      UnlearningDiverged: the update gave non-finite parameters (unchanged too).
    """
    request = validate_request(request, input_shape=self.input_shape,
                               num_classes=self.num_classes)
    self._clean_test_predictions()
    started = time.perf_counter()
    key = jax.random.fold_in(self._key, self._requests)
    new_variables = self._method.unlearn(
        self._model, self._variables, request.images, request.labels, key,
        settings=self._settings)
    new_variables = jax.block_until_ready(new_variables)
    seconds = time.perf_counter() - started
    if not _all_finite(new_variables):
      raise UnlearningDiverged(
          f"{self.method} produced NaN/inf parameters on {len(request.labels)} "
          f"samples with {self._settings}; the model was left unchanged. Lower "
          "tau / the learning rate or use reduction='mean'.")
    self._variables = new_variables
    receipt = Receipt(self._requests, self.method, len(request.labels), seconds,
                      dataclasses.asdict(self._settings))
    self._requests += 1
    return receipt

  def oracle(self, *, budget: int | None = None) -> oracle_lib.Oracle:
    """A counted black-box oracle over the current model (all an attacker gets).

    The oracle answers with the model as it is now; ask for a new one after an
    unlearning request to query the unlearned model.
    """
    probabilities = functools.partial(models.predict_probabilities, self._model,
                                      self._variables)
    return oracle_lib.make_oracle(probabilities, input_shape=self.input_shape,
                                  num_classes=self.num_classes,
                                  output=self._output, budget=budget)

  def evaluate(self, class_a: int | None = None) -> ServiceEvaluation:
    """The current model's metrics on the server's test set (PROTOCOL section 11).

    Args:
      class_a: the unlearned class, for its accuracy and prediction histogram.
    """
    clean = self._clean_test_predictions()
    labels = self._test_set.labels
    predictions = evaluation.predict_labels(self._model, self._variables,
                                            self._test_set.images)
    report = evaluation.report(predictions, labels, self.num_classes, class_a)
    histogram = (None if class_a is None else evaluation.prediction_histogram(
        clean, predictions, labels, class_a, self.num_classes))
    return ServiceEvaluation(report, histogram)

  def _clean_test_predictions(self) -> np.ndarray:
    """The test predictions of the model before any unlearning (computed once)."""
    if self._clean_predictions is None:
      self._clean_predictions = evaluation.predict_labels(
          self._model, self._variables, self._test_set.images)
    return self._clean_predictions
