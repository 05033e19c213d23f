"""User errors: a problem the user can fix, printed as one line with exit status 2."""

from __future__ import annotations

import sys


class UserError(ValueError):
  """A problem the user can fix; ``cli.run_main`` prints its one line, exit 2."""


def user_errors() -> tuple[type, ...]:
  """Errors whose message is the whole story: printed as one line, exit 2."""
  # pylint: disable=g-import-not-at-top
  from ounl_jax import checkpoint
  from ounl_jax import data as data_lib
  from ounl_jax import evaluation
  from ounl_jax import service
  # A diverged update (e.g. --tau=1e30) and a model answering NaN are the flags'
  # doing: one line, and no result file claims an accuracy.
  return (UserError, data_lib.DataNotFoundError, data_lib.DataFormatError,
          data_lib.DataCorruptError, checkpoint.CheckpointError,
          service.UnlearningDiverged, evaluation.NonFiniteOutputs)


def warn(message: str) -> None:
  """One line on stderr (experiments only; the library never prints)."""
  print(f"warning: {message}", file=sys.stderr)
