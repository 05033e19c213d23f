"""glibc malloc settings for large CPU batches, applied by the process itself.

XLA:CPU allocates every large activation (a ZOO iteration's forward pass holds
``S * (2B + 1)`` images) with ``malloc``. glibc serves a block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so
every forward pass page-faults its activations in again, and the kernel zeroes
them: on 2 cores this can cost a third of the time (docs/protocol.md §19). The
``MALLOC_*`` environment variables of WORKSPACE.md ("Speed on a CPU") avoid it but
must be set before the process starts, and they keep up to 2.3-2.9x the memory.

``tune_malloc()`` makes the same kind of change from inside the process with
``mallopt(3)`` (through ctypes), before the first large allocation:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from fresh mappings, so
  their pages stay mapped and are reused by the next pass of the same size;
* ``M_TRIM_THRESHOLD``: free memory at the top of the heap is given back to the
  system only above this much (default 512 MiB here), a bounded cache, where the
  variables keep everything (64 GiB);
* ``M_ARENA_MAX``: threads share this many arenas (default 2).

It is a process-wide side effect: call it once at the start of an entry point
(experiments' ``main``, benchmarks), never from library code. It does nothing
(and says so) where glibc's ``mallopt`` is missing (macOS, musl) or on request.
``benchmarks/zoo_throughput.py --allocator`` measures it against the plain
allocator and the variables (queries/s and peak RSS). Measured on the 2-core CPU
(VGG-3 width 16, S = 16) it was not adopted: 1.57x the plain peak memory and 0.86x
the variables' queries/s (WORKSPACE.md, "Speed on a CPU"); glibc's peak RSS with
large heap blocks also varies from run to run (1.4 to 3.1 GiB for one setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import NamedTuple

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8

DEFAULT_TRIM_THRESHOLD = 512 * 2**20
DEFAULT_ARENA_MAX = 2
# Set to 0 to turn tune_malloc() into a no-op (e.g. to measure the plain allocator).
DISABLE_VARIABLE = "OUNL_TUNE_MALLOC"


class MallocTuning(NamedTuple):
  """What ``tune_malloc`` did: ``applied`` (name -> value accepted by mallopt) and
  ``reason`` when nothing was applied."""

  applied: dict
  reason: str = ""


def _libc():
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  return libc if hasattr(libc, "mallopt") else None


def tune_malloc(*, trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
                arena_max: int = DEFAULT_ARENA_MAX,
                mmap_max: int = 0) -> MallocTuning:
  """Applies the settings of the module doc with glibc's ``mallopt``.

  Args:
    trim_threshold: bytes of free heap top kept before trimming.
    arena_max: malloc arenas shared by all threads.
    mmap_max: at most this many blocks served by ``mmap`` (0: none).

  Returns:
    ``MallocTuning``: the parameters glibc accepted, or why none was set.
  """
  if os.environ.get(DISABLE_VARIABLE, "1") == "0":
    return MallocTuning({}, f"{DISABLE_VARIABLE}=0")
  libc = _libc()
  if libc is None:
    return MallocTuning({}, "no glibc mallopt in this C library")
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  applied = {}
  for name, parameter, value in (("M_ARENA_MAX", M_ARENA_MAX, arena_max),
                                 ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD,
                                  trim_threshold),
                                 ("M_MMAP_MAX", M_MMAP_MAX, mmap_max)):
    if libc.mallopt(parameter, int(value)) == 1:
      applied[name] = int(value)
  return MallocTuning(applied, "" if applied else "mallopt refused every setting")
