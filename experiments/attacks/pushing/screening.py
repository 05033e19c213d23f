"""The released rule's queue: the candidates screened with one (counted) query
each, the correctly classified ones in order, and how hard each is to push
(docs/protocol.md §4)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ounl_jax.attacks import labels as labels_lib


def screening_margin(answers: np.ndarray) -> np.ndarray:
  """log p_top1 - log p_top2 of each screening answer (zeros for labels).

  How far the clean model puts a sample from its boundary: it ranks the ZOO
  iterations a sample needs (Spearman 0.88 on the cpu-scale model's 768 first
  candidates).

  >>> screening_margin(np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]])).round(2)
  array([1.25, 0.22])
  """
  if answers.ndim == 1:
    return np.zeros(answers.shape, np.float32)
  top = np.sort(np.log(np.maximum(answers, 1e-30)), axis=-1)
  return top[:, -1] - top[:, -2]


class Queue(NamedTuple):
  """The screened candidates: pushable ones in order, and how hard each is."""

  order: np.ndarray          # Candidate indices of the pushable ones.
  pushable: np.ndarray       # Per candidate.
  hardness: np.ndarray       # Per candidate: ``screening_margin``.
  screening_queries: int


def screen(oracle, candidates, target_class) -> Queue:
  """One counted query per candidate: the correctly classified ones queue up."""
  answers, state = labels_lib.oracle_answers(oracle, oracle.init(),
                                             candidates.images)
  predicted = labels_lib.answered_classes(oracle, answers)
  pushable = predicted == candidates.labels
  if target_class is not None:
    pushable &= predicted != target_class
  return Queue(np.flatnonzero(pushable), pushable, screening_margin(answers),
                int(state.queries))
