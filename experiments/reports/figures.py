"""Figures are written to files: matplotlib's file backend, chosen when plotting.

Selecting the backend when a figure is made (not on import) keeps importing any
experiment module free of side effects.
"""

from __future__ import annotations


def pyplot():
  """``matplotlib.pyplot`` on the Agg (file) backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt
