"""What the server measures on its own test set (docs/protocol.md §11).

* overall accuracy, per-class accuracy, accuracy on class A (the Over-unlearning-I
  metric, Fig. 5) and on the other classes;
* the prediction histogram of class A (Fig. 6-7, Tables V-VI): among the test samples
  of A that the **clean** model classifies correctly, how many the unlearned model
  assigns to each class. Entry A counts those still correct; a row sums to the clean
  model's correct count (878 airplanes in the paper).

The metric functions are pure numpy over label arrays; ``predict_labels`` is the one
host loop, over the jitted evaluation step of ``ounl_jax.train``. A model whose
logits are NaN or infinite has no predictions (the argmax of NaN is class 0, which
would read as accuracy on class 0): ``predict_labels`` raises ``NonFiniteOutputs``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ounl_jax import models
from ounl_jax import train as train_lib


class NonFiniteOutputs(ValueError):
  """The model answers NaN or infinite logits: it has no predictions."""


def predict_labels(model: models.Model, variables, images: np.ndarray, *,
                   batch_size: int = 500) -> np.ndarray:
  """Inference-mode predicted labels, in fixed-size batches.

  Raises:
    NonFiniteOutputs: some logits are NaN or infinite (read from the batch loss,
      so it costs nothing more).
  """
  images = np.asarray(images, np.float32)
  labels = np.zeros(len(images), np.int32)
  result = train_lib.evaluate(_eval_step(model), variables, images, labels,
                              batch_size=batch_size)
  if not np.isfinite(result.loss):
    raise NonFiniteOutputs(
        f"The model answers NaN or infinite logits on some of {len(images)} "
        "images; it has no predictions to measure (the unlearning diverged: "
        "lower tau or the learning rate).")
  return result.predictions


@functools.lru_cache(maxsize=16)
def _eval_step(model: models.Model):
  """One jitted evaluation step per model (no recompilation between calls)."""
  return train_lib.make_eval_step(model)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of ``predictions`` equal to ``labels`` (NaN when empty)."""
  labels = np.asarray(labels)
  if labels.size == 0:
    return float("nan")
  return float(np.mean(np.asarray(predictions) == labels))


def class_accuracy(predictions: np.ndarray, labels: np.ndarray,
                   class_a: int) -> float:
  """Accuracy on the samples of class A (Over-unlearning-I, Fig. 5)."""
  members = np.asarray(labels) == class_a
  return accuracy(np.asarray(predictions)[members], np.asarray(labels)[members])


def accuracy_without_class(predictions: np.ndarray, labels: np.ndarray,
                           class_a: int) -> float:
  """Accuracy on the samples of every class but A."""
  others = np.asarray(labels) != class_a
  return accuracy(np.asarray(predictions)[others], np.asarray(labels)[others])


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """Accuracy of each class (NaN for a class without samples)."""
  return train_lib.per_class_accuracy(np.asarray(predictions),
                                      np.asarray(labels), num_classes)


def prediction_histogram(clean_predictions: np.ndarray, predictions: np.ndarray,
                         labels: np.ndarray, class_a: int,
                         num_classes: int) -> np.ndarray:
  """Predictions on the class-A samples the clean model got right (Table V).

  Args:
    clean_predictions: the clean model's predictions on the test set.
    predictions: the (unlearned) model's predictions on the same samples.
    labels: true test labels.
    class_a: the unlearned class.
    num_classes: K.

  Returns:
    (K,) int counts; entry ``class_a`` is the number still correct, and the sum is
    the clean model's number of correct class-A predictions.
  """
  labels = np.asarray(labels)
  clean_correct = (labels == class_a) & (np.asarray(clean_predictions) == class_a)
  return np.bincount(np.asarray(predictions)[clean_correct],
                     minlength=num_classes).astype(np.int64)


class Report(NamedTuple):
  """A model's test-set metrics (accuracies in [0, 1])."""

  accuracy: float
  per_class_accuracy: np.ndarray
  class_a_accuracy: float | None
  other_classes_accuracy: float | None
  predictions: np.ndarray

  def to_dict(self, class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """JSON-friendly metrics, per-class accuracy keyed by class name."""
    names = class_names or tuple(str(k) for k in range(len(self.per_class_accuracy)))
    return {"accuracy": self.accuracy,
            "per_class_accuracy": dict(zip(names, self.per_class_accuracy.tolist())),
            "class_a_accuracy": self.class_a_accuracy,
            "other_classes_accuracy": self.other_classes_accuracy}


def report(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
           class_a: int | None = None) -> Report:
  """All test-set metrics of one model from its predictions."""
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  in_a = None if class_a is None else class_accuracy(predictions, labels, class_a)
  others = (None if class_a is None
            else accuracy_without_class(predictions, labels, class_a))
  return Report(accuracy(predictions, labels),
                per_class_accuracy(predictions, labels, num_classes), in_a, others,
                predictions)


def histogram_dict(histogram: np.ndarray,
                   class_names: tuple[str, ...]) -> dict[str, int]:
  """The histogram keyed by class name (the columns of Table V)."""
  return {name: int(count) for name, count in zip(class_names, histogram)}
