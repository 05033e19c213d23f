"""The MLaaS server of the threat model (paper Sec. II-B, App. A).

The server holds a trained model and a test set, but no training data. Users see
exactly two operations:

* ``predict(x)``: class probabilities (or labels only, a setting) in inference mode;
* ``unlearn(request) -> Receipt``: a request is images plus submitted labels; the
  server runs its pre-selected data-free method (``ounl_jax.unlearning``) on it.

Attack code receives only ``oracle()``, a counted black-box ``ounl_jax.oracle.Oracle``
over the model as it is when handed out. The operator measures the model on the
server's own test set with ``evaluate`` (docs/protocol.md §11).

``UnlearningService`` is the one stateful object: it owns the parameters (private,
changed only by ``unlearn``) and a request counter that derives each request's key.
All the maths lives in the pure functions of ``unlearning``, ``evaluation`` and the
validation functions below. A malformed request raises ``InvalidRequestError`` and
leaves the model untouched: more images than ``RequestLimits.max_request_images``
(checked before any copy, so it bounds the memory a request can take), non-float
images (send float32 ``x / 255 - 0.5``), and, by default, an unlearning request that
holds the same image twice. Defences (``ounl_jax.defences``, paper Sec. VII) plug in
as ``screens`` run before the update and a utility ``guard`` run on the tentative
update; a refusal raises ``RequestRefused`` naming the screen and why.

Each sample can be unlearned once. The service keeps a ledger of what it has
unlearned (``ounl_jax.ledger.SampleLedger``) and refuses, with ``AlreadyUnlearned``,
an image within ``RequestLimits.duplicate_tolerance`` (L-infinity, half an 8-bit
grey level by default) of one it unlearned before or of another image of the
same request.

A server never ships a model that answers non-finite values: after every update
it runs the tentative model on a fixed probe batch (the first
``PROBE_IMAGES`` test images) and refuses the request with
``UnlearningDiverged``, keeping its parameters, if any logit is NaN or infinite
(or any parameter is).

Concurrency contract. One ``UnlearningService`` may be shared by several threads.
``unlearn`` validates the request in the calling thread, then takes the service's
lock and, holding it, checks the ledger, runs the screens, computes the update
from the current parameters, probes and guards it, commits it and issues the
receipt. Requests are therefore applied one at a time, each on top of the
previous one, in the order of their receipts' ``request_number`` (the order in
which they got the lock); a refused request changes nothing and gets no number.
A receipt is issued only once its update is in the parameters. ``predict``,
``oracle`` and ``evaluate`` read the parameters as they are at the call (an
atomic read of the reference), never a half-applied update.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ounl_jax import data as data_lib
from ounl_jax import evaluation
from ounl_jax import ledger as ledger_lib
from ounl_jax import models
from ounl_jax import oracle as oracle_lib
from ounl_jax import unlearning
from ounl_jax.defences import screening as screening_lib
from ounl_jax.defences import utility as utility_lib

PIXEL_MIN, PIXEL_MAX = -0.5, 0.5
# Float slack on the pixel range (tanh and blending round at the last bit).
PIXEL_TOLERANCE = 1e-6
PREDICT_BATCH_SIZE = 500
# Test images the server runs every tentative update on (non-finite answers).
PROBE_IMAGES = 64


class InvalidRequestError(ValueError):
  """A prediction or unlearning request the server refuses; nothing changed."""


class RequestRefused(InvalidRequestError):
  """A well-formed request that a defence refused; nothing changed.

  Attributes:
    screen: the name of the screen that refused (the first that flagged, in the
      order given to the service), or ``"utility_guard"``.
    flagged: indices (into the request) of the samples that screen flagged; empty
      for the utility guard, which judges the request as a whole.
    outcomes: every screen's ``ScreenOutcome`` on the request.
    verdict: the utility guard's ``GuardVerdict`` when it refused, else None.
  """

  def __init__(self, message: str, *, screen: str, flagged=(), outcomes=(),
               verdict=None):
    super().__init__(message)
    self.screen = screen
    self.flagged = tuple(flagged)
    self.outcomes = tuple(outcomes)
    self.verdict = verdict


class AlreadyUnlearned(InvalidRequestError):
  """Samples the server has unlearned before (or repeated in one request).

  Attributes:
    repeats: ``(index, 'ledger' | 'request', other)`` per repeated image: the
      request index and the ledger entry or earlier request index it matches.
  """

  def __init__(self, message: str, *, repeats=()):
    super().__init__(message)
    self.repeats = tuple(repeats)


class UnlearningDiverged(RuntimeError):
  """The update gave non-finite parameters or a model answering non-finite
  values on the server's probe batch; the request is refused, the model kept."""


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
    screening: one summary per screen (name, threshold, flagged count/indices).
    dropped: request indices left out because a screen flagged them (only with
      ``on_flagged='drop'``).
    guard: the utility guard's summary when the service has one.
  """

  request_number: int
  method: str
  num_samples: int
  seconds: float
  settings: dict
  screening: tuple = ()
  dropped: tuple = ()
  guard: dict | None = None


DEFAULT_MAX_REQUEST_IMAGES = 10_000


@dataclasses.dataclass(frozen=True)
class RequestLimits:
  """What the server accepts in one request (checked before any array is copied).

  Attributes:
    max_request_images: most images in one ``predict`` or ``unlearn`` call. It
      bounds the server's memory per request: the validated float32 copy takes
      ``max_request_images * H * W * C * 4`` bytes, 123 MB at the default 10,000
      CIFAR images (32 x 32 x 3), plus the same again for the method's batch.
      The oracle (``UnlearningService.oracle``) enforces the same cap on every
      eager query.
    allow_duplicates: accept an unlearning request holding the same image twice,
      and a sample unlearned before. Off by default: the data-free methods (paper
      Eq. 13's sum over the request) weight every copy, so 50 copies of one image
      move the model 50 times as far as the image once, and one training sample
      cannot be unlearned twice (the service's ledger, ``ounl_jax.ledger``).
    duplicate_tolerance: two images within this L-infinity distance are the same
      sample to the ledger (default half an 8-bit grey level, 0.5 / 255; 0 checks
      exact repeats only and keeps digests, not pixels).
  """

  max_request_images: int = DEFAULT_MAX_REQUEST_IMAGES
  allow_duplicates: bool = False
  duplicate_tolerance: float = ledger_lib.DEFAULT_TOLERANCE

  def __post_init__(self):
    if self.max_request_images < 1:
      raise ValueError(f"max_request_images must be >= 1, got "
                       f"{self.max_request_images}.")
    if not (self.duplicate_tolerance >= 0
            and np.isfinite(self.duplicate_tolerance)):
      raise ValueError(f"duplicate_tolerance must be a finite number >= 0, got "
                       f"{self.duplicate_tolerance}.")


def _count(images) -> int:
  """The number of images, read without converting (copying) the array."""
  try:
    return oracle_lib.row_count(images)
  except ValueError as error:
    raise InvalidRequestError(
        f"Images must be an array (N, H, W, C), got {type(images).__name__}."
    ) from error


def check_request_size(images, limits: RequestLimits) -> None:
  """Refuses more than ``limits.max_request_images`` images, before any copy."""
  count = _count(images)
  if count > limits.max_request_images:
    raise InvalidRequestError(
        f"Request of {count} images exceeds this server's limit of "
        f"{limits.max_request_images} images per request; split it into several "
        "requests.")


def validate_images(images, input_shape: tuple[int, ...],
                    limits: RequestLimits = RequestLimits()) -> np.ndarray:
  """Float32 images (N, *input_shape) in [-0.5, 0.5], or ``InvalidRequestError``.

  The size is checked first (``limits``), then the dtype: only floating-point
  images are accepted, since integer pixels (uint8 0..255) are ambiguous (an
  all-zero uint8 image would otherwise pass as mid-grey).
  """
  check_request_size(images, limits)
  dtype = getattr(images, "dtype", None)
  if dtype is None:  # A list or tuple: count checked, so the copy is bounded.
    images = np.asarray(images)
    dtype = images.dtype
  dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
  if dtype == object or not (np.issubdtype(dtype, np.floating)
                             or np.issubdtype(dtype, np.integer)
                             or dtype == bool):
    raise InvalidRequestError(f"Images must be a numeric array, got dtype "
                              f"{dtype}.")
  if not np.issubdtype(dtype, np.floating):
    raise InvalidRequestError(
        f"Images must be floating point in [{PIXEL_MIN}, {PIXEL_MAX}], got dtype "
        f"{dtype}. Send float32 pixels mapped as x / 255 - 0.5 (uint8 x).")
  images = np.asarray(images)
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
  # + 0.0 turns -0.0 into 0.0, so equal images have equal bytes (duplicates).
  return np.clip(images, PIXEL_MIN, PIXEL_MAX) + np.float32(0.0)


def duplicate_groups(images: np.ndarray) -> list[list[int]]:
  """Indices of bit-identical images, one list per image that occurs twice or more.

  Compares the float32 bytes (via a sha256 per image, so memory stays O(N)).
  """
  seen: dict[bytes, list[int]] = {}
  for index, image in enumerate(np.ascontiguousarray(images, np.float32)):
    seen.setdefault(hashlib.sha256(image.tobytes()).digest(), []).append(index)
  return [group for group in seen.values() if len(group) > 1]


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


def validate_request(request, *, input_shape: tuple[int, ...], num_classes: int,
                     limits: RequestLimits = RequestLimits()) -> UnlearningRequest:
  """The request with checked, normalised images and labels.

  Raises:
    InvalidRequestError: not an (images, labels) pair, more images than
      ``limits.max_request_images``, non-float images, empty, wrong shape, NaN or
      out-of-range pixels, duplicate images (unless ``limits.allow_duplicates``),
      labels of the wrong shape, type or range.
  """
  try:
    images, labels = request
  except (TypeError, ValueError) as error:
    raise InvalidRequestError(
        "An unlearning request is a pair (images, labels), e.g. "
        "UnlearningRequest(images, labels).") from error
  images = validate_images(images, input_shape, limits)
  labels = validate_labels(labels, len(images), num_classes)
  if not limits.allow_duplicates:
    groups = duplicate_groups(images)
    if groups:
      extra = sum(len(g) - 1 for g in groups)
      raise InvalidRequestError(
          f"The request holds {extra} duplicate images ({len(groups)} images "
          f"sent more than once, e.g. indices {groups[0][:5]}). Each sample can "
          "be unlearned once: send every image once. (A server that must accept "
          "repeats sets RequestLimits(allow_duplicates=True).)")
  return UnlearningRequest(images, labels)


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


def fingerprint(variables) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes: equal = bit-identical."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|"
                  .encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _all_finite(variables) -> bool:
  leaves = jax.tree_util.tree_leaves(variables)
  return bool(jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves])))


@functools.lru_cache(maxsize=16)
def _non_finite_rows_fn(model: models.Model):
  """Jitted count of probe images whose logits hold a NaN or an infinity."""
  def count(variables, x):
    logits = model.apply(variables, x)
    bad = ~jnp.all(jnp.isfinite(logits.reshape(logits.shape[0], -1)), axis=-1)
    return jnp.sum(bad)
  return jax.jit(count)


def non_finite_answers(model: models.Model, variables, probe: np.ndarray) -> int:
  """How many images of ``probe`` the model answers with a non-finite logit."""
  return int(_non_finite_rows_fn(model)(variables, probe))


class ServiceEvaluation(NamedTuple):
  """The current model on the server's test set, against the clean model.

  ``histogram`` (only with a class A) counts the current predictions on the class-A
  test samples that the clean model (before any unlearning) got right.
  """

  report: evaluation.Report
  histogram: np.ndarray | None


class UnlearningService:
  """A prediction service that fulfils unlearning requests (threat model, Sec. II-B).

  Example (a tiny model and test set):

  >>> import jax, numpy as np
  >>> from ounl_jax import data as data_lib, models
  >>> model = models.get_model("vgg3", num_classes=4, input_shape=(8, 8, 3),
  ...                          width=2)
  >>> variables = model.init(jax.random.key(0))
  >>> x = np.linspace(-0.5, 0.5, 4 * 8 * 8 * 3, dtype=np.float32).reshape(
  ...     4, 8, 8, 3)
  >>> test = data_lib.LabelledImages(x, np.arange(4, dtype=np.int32), np.arange(4))
  >>> service = UnlearningService(model, variables, test,
  ...                             method="first_order", key=jax.random.key(88))
  >>> receipt = service.unlearn(UnlearningRequest(x[:2], np.array([0, 1])))
  >>> receipt.num_samples, service.requests_served
  (2, 1)
  >>> oracle = service.oracle(budget=10_000)   # all an attacker gets
  >>> answers, state = oracle.query(oracle.init(), x)
  >>> answers.shape, int(state.queries)
  ((4, 4), 4)
  """

  def __init__(self, model: models.Model, variables, test_set: data_lib.LabelledImages,
               *, key: jax.Array,
               method: str | unlearning.Method = "first_order",
               settings: Any = None, output: str = "probabilities",
               limits: RequestLimits = RequestLimits(),
               screens: Sequence[screening_lib.Screen] = (),
               on_flagged: str = "refuse",
               guard: utility_lib.UtilityGuard | None = None):
    """Builds the server.

    Args:
      model: the deployed model.
      variables: its trained ``{'params', 'batch_stats'}`` (kept private).
      test_set: the server's own labelled test set (for ``evaluate``).
      key: the server's randomness; request k uses ``fold_in(key, k)``.
      method: ``first_order`` (default), ``fine_tune`` or ``gradient_ascent``,
        or any ``unlearning.Method`` (a method of the caller's own).
      settings: the method's settings; None takes the released code's defaults.
      output: ``probabilities`` (the paper's API) or ``labels``.
      limits: request size and duplicate policy (``RequestLimits``).
      screens: defences run on every unlearning request before any update
        (``ounl_jax.defences``, paper Sec. VII), in order.
      on_flagged: what a request with some flagged samples gets: ``refuse``
        (default) refuses the whole request, since an attacker can pad a malicious
        request with honest samples and the user can resubmit the rest once told
        which were flagged; ``drop`` unlearns the unflagged samples only and lists
        the dropped ones in the receipt (a request with every sample flagged is
        refused).
      guard: a fitted ``defences.utility.UtilityGuard``: the update is made
        tentatively and kept only if held-out accuracy stays within its bounds.
    """
    if on_flagged not in screening_lib.PARTIAL_POLICIES:
      raise ValueError(f"Unknown on_flagged {on_flagged!r}; choose one of "
                       f"{screening_lib.PARTIAL_POLICIES}.")
    if output not in oracle_lib.OUTPUTS:
      raise ValueError(f"Unknown output {output!r}; choose one of "
                       f"{oracle_lib.OUTPUTS}.")
    self._method = (method if isinstance(method, unlearning.Method)
                    else unlearning.get_method(method))
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
    self._limits = limits
    self._screens = tuple(screens)
    self._on_flagged = on_flagged
    self._guard = guard
    self._requests = 0
    self._clean_predictions = None
    self._lock = threading.Lock()
    self._ledger = ledger_lib.SampleLedger(limits.duplicate_tolerance)
    probe = np.asarray(test_set.images[:PROBE_IMAGES], np.float32)
    self._probe = probe if len(probe) else np.zeros(
        (1,) + self.input_shape, np.float32)

  @property
  def method(self) -> str:
    return self._method.name

  @property
  def settings(self) -> Any:
    return self._settings

  @property
  def limits(self) -> RequestLimits:
    return self._limits

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self._model.input_shape)

  @property
  def num_classes(self) -> int:
    return self._model.num_classes

  @property
  def requests_served(self) -> int:
    return self._requests

  @property
  def samples_unlearned(self) -> int:
    """How many samples the ledger holds (every sample of every receipt)."""
    return len(self._ledger)

  def model_fingerprint(self) -> str:
    """``fingerprint`` of the current parameters (the operator's audit: a refused
    request leaves it unchanged; the parameters themselves stay private)."""
    return fingerprint(self._variables)

  def predict(self, images) -> np.ndarray:
    """Probabilities (N, K), or labels (N,) when built with ``output='labels'``.

    Raises:
      InvalidRequestError: too many images, non-float, empty, wrong shape, NaN or
        out-of-range pixels.
    """
    images = validate_images(images, self.input_shape, self._limits)
    variables = self._variables  # One read: never a half-applied update.
    probabilities = predict_probabilities(self._model, variables, images)
    if self._output == "labels":
      return np.argmax(probabilities, -1).astype(np.int32)
    return probabilities

  def unlearn(self, request) -> Receipt:
    """Fulfils an unlearning request with the server's method.

    Thread-safe: requests are applied one at a time, in receipt order (see the
    module docstring's concurrency contract).

    Args:
      request: ``UnlearningRequest(images, labels)`` (any (images, labels) pair).

    Returns:
      A ``Receipt``.

    Raises:
      InvalidRequestError: a malformed request (the model is unchanged).
      AlreadyUnlearned: a sample unlearned before, or repeated in the request
        within ``limits.duplicate_tolerance`` (the model is unchanged).
      RequestRefused: a screen flagged samples (policy ``on_flagged``) or the
        utility guard saw accuracy fall too far (the model is unchanged).
      UnlearningDiverged: the update gave non-finite parameters or answers
        non-finite values on the probe batch (the model is unchanged too).
    """
    request = validate_request(request, input_shape=self.input_shape,
                               num_classes=self.num_classes, limits=self._limits)
    with self._lock:
      return self._unlearn_locked(request)

  def _unlearn_locked(self, request: UnlearningRequest) -> Receipt:
    """``unlearn`` after validation, holding ``self._lock``."""
    if not self._limits.allow_duplicates:
      self._check_ledger(request.images)
    outcomes = screening_lib.apply_screens(self._screens, request.images,
                                           request.labels)
    dropped = self._apply_flagged_policy(outcomes, len(request.labels))
    if dropped:
      keep = np.setdiff1d(np.arange(len(request.labels)), dropped)
      request = UnlearningRequest(request.images[keep], request.labels[keep])
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
    bad = non_finite_answers(self._model, new_variables, self._probe)
    if bad:
      raise UnlearningDiverged(
          f"{self.method} gave a model that answers NaN/inf on {bad} of the "
          f"{len(self._probe)} probe images ({len(request.labels)} samples, "
          f"{self._settings}); the request was refused and the model left "
          "unchanged. Lower tau / the learning rate or use reduction='mean'.")
    guard = None
    if self._guard is not None:
      verdict = utility_lib.check(self._guard, new_variables)
      guard = verdict.summary()
      if not verdict.ok:
        raise RequestRefused(
            f"Request refused by the utility guard: {verdict.reason}. The "
            "unlearning was rolled back; the model is unchanged.",
            screen="utility_guard", outcomes=outcomes, verdict=verdict)
    self._variables = new_variables
    if not self._limits.allow_duplicates:
      self._ledger.add(request.images)
    receipt = Receipt(self._requests, self.method, len(request.labels), seconds,
                      dataclasses.asdict(self._settings),
                      tuple(o.summary() for o in outcomes), tuple(dropped), guard)
    self._requests += 1
    return receipt

  def _check_ledger(self, images: np.ndarray) -> None:
    """``AlreadyUnlearned`` if an image repeats an unlearned or earlier one."""
    repeats = self._ledger.matches(images)
    if not repeats:
      return
    earlier = [r for r in repeats if r[1] == "ledger"]
    within = [r for r in repeats if r[1] == "request"]
    parts = []
    if earlier:
      parts.append(f"{len(earlier)} were unlearned by an earlier request (request "
                   f"indices {[r[0] for r in earlier[:5]]})")
    if within:
      parts.append(f"{len(within)} repeat an earlier image of this request "
                   f"(e.g. index {within[0][0]} repeats {within[0][2]})")
    raise AlreadyUnlearned(
        f"Each sample can be unlearned once: of {len(images)} images, "
        f"{' and '.join(parts)}, within L-infinity "
        f"{self._limits.duplicate_tolerance:.3g} (RequestLimits."
        "duplicate_tolerance). Nothing was unlearned; send only new samples.",
        repeats=repeats)

  def _apply_flagged_policy(self, outcomes, count: int) -> tuple[int, ...]:
    """The indices to drop (``on_flagged='drop'``), or ``RequestRefused``."""
    hits = [o for o in outcomes if o.flagged]
    if not hits:
      return ()
    keep = screening_lib.keep_mask(outcomes, count)
    if self._on_flagged == "drop" and keep.any():
      return tuple(int(i) for i in np.flatnonzero(~keep))
    first = hits[0]
    shown = ", ".join(map(str, first.flagged[:10])) + (
        ", ..." if len(first.flagged) > 10 else "")
    others = "".join(f"; screen {o.name!r} flagged {len(o.flagged)}"
                     for o in hits[1:])
    what = ("every sample was flagged" if self._on_flagged == "drop"
            else "a request with any flagged sample is refused whole")
    raise RequestRefused(
        f"Request refused by screen {first.name!r}: {len(first.flagged)} of "
        f"{count} samples {first.reason} (indices [{shown}]; score above "
        f"{first.threshold:.4g}){others}. The model is unchanged ({what}).",
        screen=first.name, flagged=first.flagged, outcomes=outcomes)

  def oracle(self, *, budget: int | None = None) -> oracle_lib.Oracle:
    """A counted black-box oracle over the current model (all an attacker gets).

    The oracle answers with the model as it is now; ask for a new one after an
    unlearning request to query the unlearned model.
    """
    # The parameters travel as jit arguments (an opaque handle in the oracle's
    # state): oracles of one model share their compiled attack code.
    return oracle_lib.make_oracle(oracle_lib.Softmax(self._model.apply),
                                  self._variables, input_shape=self.input_shape,
                                  num_classes=self.num_classes,
                                  output=self._output, budget=budget,
                                  max_query_images=self._limits.max_request_images)

  def evaluate(self, class_a: int | None = None) -> ServiceEvaluation:
    """The current model's metrics on the server's test set (docs/protocol.md §11).

    Args:
      class_a: the unlearned class, for its accuracy and prediction histogram.
    """
    with self._lock:  # The clean predictions once; the current parameters.
      clean = self._clean_test_predictions()
      variables = self._variables
    labels = self._test_set.labels
    predictions = evaluation.predict_labels(self._model, variables,
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
