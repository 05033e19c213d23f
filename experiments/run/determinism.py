"""Deterministic GPU runs: XLA's deterministic kernels, switched on before JAX starts
(``--deterministic``, every experiment; WORKSPACE.md "Running on a GPU")."""

from __future__ import annotations

import os


# XLA's switch for deterministic GPU kernels (scatter-adds, reductions, cuDNN
# algorithm choice); read when the backend starts, so it is set before any JAX work.
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"
HELP = (f"Deterministic GPU ops (XLA_FLAGS {DETERMINISTIC_GPU_FLAG}): the same seed "
        "gives bit-identical parameters on a GPU; --nodeterministic trades that "
        "for speed (WORKSPACE.md 'Running on a GPU'). No effect on a CPU, which "
        "is deterministic anyway.")


def deterministic_gpu_ops(enabled: bool) -> None:
  """Adds (or leaves out) ``DETERMINISTIC_GPU_FLAG`` in ``XLA_FLAGS``; before JAX
  starts its backend (refused after: the flag would silently not apply)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  current = os.environ.get("XLA_FLAGS", "")
  if not enabled or "xla_gpu_deterministic_ops" in current:
    return
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("deterministic_gpu_ops must run before any JAX work.")
  os.environ["XLA_FLAGS"] = f"{current} {DETERMINISTIC_GPU_FLAG}".strip()
