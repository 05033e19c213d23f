"""Seconds this process spent compiling, from JAX's own monitoring events.

A rate compared with a warmed-up baseline (``devices.forward_images_per_second``
compiles before it times) leaves these seconds out too. The listener is
registered by the first ``compile_seconds()`` call, not on import: a difference
of two calls times the compiling between them.
"""

from __future__ import annotations

import jax

# JAX's events for the three steps of a compilation (trace, lower, XLA compile).
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
_compiling = []


def _count_compiling(event: str, seconds: float, **unused) -> None:
  if event in COMPILE_EVENTS:
    _compiling[0] += seconds


def compile_seconds() -> float:
  """Seconds spent compiling since the first call (differences time a step)."""
  if not _compiling:
    _compiling.append(0.0)
    jax.monitoring.register_event_duration_secs_listener(_count_compiling)
  return _compiling[0]
