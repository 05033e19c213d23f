"""Labels the malicious user submits with a modified sample (docs/protocol.md §9).

The released code's ``--label_mode``: 0 submits the **original** class A (its default,
used for Pushing), 1 the **target** class, 2 the clean model's **prediction** on the
submitted image (the paper's blending: "modifying y to the predicted label of the
server's model", Sec. III-B).
"""

from __future__ import annotations

import jax
import numpy as np

from ounl_jax import oracle as oracle_lib

LABEL_MODES = ("original", "target", "prediction")


def check_label_mode(label_mode: str, *, has_target: bool = True) -> None:
  """Raises ``ValueError`` for an unknown mode, or ``target`` without a target."""
  if label_mode not in LABEL_MODES:
    raise ValueError(f"Unknown label mode {label_mode!r}; choose one of "
                     f"{', '.join(LABEL_MODES)} (docs/protocol.md §9).")
  if label_mode == "target" and not has_target:
    raise ValueError("label_mode='target' needs a target class (targeted pushing "
                     "or a blending class B); use 'original' or 'prediction'.")


def submitted_labels(label_mode: str, *, original: np.ndarray,
                     target: np.ndarray | int | None = None,
                     predicted: np.ndarray | None = None) -> np.ndarray:
  """The labels submitted with the modified samples (docs/protocol.md §9).

  Args:
    label_mode: ``original`` (class A), ``target`` (class B) or ``prediction``
      (the oracle's prediction on the submitted image).
    original: (N,) original classes.
    target: the target class, per sample or one for all (``target`` mode).
    predicted: (N,) the oracle's predictions on the submitted images
      (``prediction`` mode).

  Returns:
    (N,) int32 labels.
  """
  check_label_mode(label_mode, has_target=target is not None)
  original = np.asarray(original, np.int32)
  if label_mode == "original":
    return original.copy()
  if label_mode == "target":
    return np.broadcast_to(np.asarray(target, np.int32), original.shape).copy()
  if predicted is None:
    raise ValueError("label_mode='prediction' needs the oracle's predictions.")
  return np.asarray(predicted, np.int32).copy()


def _query(oracle: oracle_lib.Oracle, oracle_state, images):
  return oracle.query(oracle_state, images)


# One jitted query for every oracle over the same model (the parameters travel in
# the OracleState; ``Oracle.static()`` holds none).
_jitted_query = jax.jit(_query, static_argnums=0)


def oracle_answers(oracle: oracle_lib.Oracle, oracle_state: oracle_lib.OracleState,
                   images, *, batch_size: int = 256):
  """The oracle's answers for ``images`` (probabilities, or labels for a
  labels-only oracle), queried in batches (counted).

  Returns:
    ``(answers (N, K) float32 or (N,) int32, oracle_state)``.

  Raises:
    QueryBudgetExceeded: the oracle refused queries.
  """
  images = np.asarray(images, np.float32)
  static = oracle.static()
  answers = []
  for start in range(0, len(images), batch_size):
    batch, oracle_state = _jitted_query(static, oracle_state,
                                        images[start:start + batch_size])
    oracle_lib.check_budget(oracle, oracle_state)
    answers.append(np.asarray(batch))
  if not answers:
    if oracle.output == "labels":
      return np.zeros((0,), np.int32), oracle_state
    return np.zeros((0, oracle.num_classes), np.float32), oracle_state
  return np.concatenate(answers), oracle_state


def oracle_predictions(oracle: oracle_lib.Oracle,
                       oracle_state: oracle_lib.OracleState, images, *,
                       batch_size: int = 256):
  """The oracle's predicted classes for ``images``, queried in batches (counted).

  Works with a probabilities or a labels-only oracle.

  Returns:
    ``(predicted (N,) int32, oracle_state)``.

  Raises:
    QueryBudgetExceeded: the oracle refused queries.
  """
  answers, oracle_state = oracle_answers(oracle, oracle_state, images,
                                         batch_size=batch_size)
  return answered_classes(oracle, answers), oracle_state


def answered_classes(oracle: oracle_lib.Oracle, answers) -> np.ndarray:
  """(N,) int32 classes of ``oracle_answers``: the labels, or the top probability."""
  answers = np.asarray(answers)
  return (answers if oracle.output == "labels" else answers.argmax(-1)).astype(
      np.int32)
