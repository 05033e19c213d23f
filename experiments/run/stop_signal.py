"""SIGTERM stops a push cleanly: what `timeout`, a cluster's preemption or `kill`
send before they kill (docs/protocol.md §4, "A push that resumes").

``install()`` (``cli.run_main``, every experiment) replaces SIGTERM's default with
a handler that records the request. While a push runs (``listening()``), the push
reads it as its deadline (``deadline``) and stops at the end of the chunk it is
in, with its finished samples and those in flight saved; the run then exits 75 as
at ``--time_budget``, and the same command continues. Anywhere else (training,
unlearning, evaluation), and at a second SIGTERM, nothing would be saved by
waiting, so the handler exits at once, as SIGTERM's default would, but through
Python (``SystemExit(143)``), so the workdir's lock is released and atomic writes
leave no torn file.
"""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Callable, Iterator

_STATE = {"requested": False, "listening": 0}


def _handler(signum, frame) -> None:
  del frame
  if _STATE["requested"] or not _STATE["listening"]:
    raise SystemExit(128 + signum)  # Outside a push, or a second SIGTERM.
  _STATE["requested"] = True


def install() -> None:
  """SIGTERM handled as above; in the main thread only (Python's rule)."""
  signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
  return _STATE["requested"]


@contextlib.contextmanager
def listening() -> Iterator[None]:
  """A push runs inside: SIGTERM brings its deadline forward instead of exiting.
  A push that does not read deadlines (``label_only``) runs to its end, saved, and
  the process exits then."""
  _STATE["listening"] += 1
  try:
    yield
  finally:
    _STATE["listening"] -= 1
  if _STATE["requested"] and not _STATE["listening"]:
    raise SystemExit(128 + signal.SIGTERM)


def deadline(budget: float | None) -> Callable[[], float]:
  """``scheduler.Resume.deadline``: ``budget`` (a ``time.monotonic()`` value; None:
  none), or now once SIGTERM has arrived."""
  limit = math.inf if budget is None else budget
  return lambda: -math.inf if _STATE["requested"] else limit
