"""User errors: a problem the user can fix, printed as one line with exit status 2;
and a run stopped at its ``--time_budget``: one line, exit status 75."""

from __future__ import annotations

import sys


class UserError(ValueError):
  """A problem the user can fix; ``cli.run_main`` prints its one line, exit 2."""


# Exit status of a run stopped at its --time_budget (sysexits' EX_TEMPFAIL: a
# temporary stop, retry): what it finished is saved, the same command continues.
TIME_BUDGET_STATUS = 75


class TimeBudgetReached(Exception):
  """A run stopped cleanly at ``--time_budget``, its finished work saved;
  ``cli.run_main`` prints its one line and exits ``TIME_BUDGET_STATUS``."""


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
