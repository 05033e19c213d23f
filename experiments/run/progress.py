"""What the user watches: progress bars, and quiet library logs."""

from __future__ import annotations


def quiet_logs() -> None:
  """Keeps absl/orbax/TFDS INFO chatter off the terminal (warnings still show)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


def progress(iterable=None, *, total=None, desc=None, enabled=True, **kwargs):
  """A tqdm progress bar on stderr (silent when disabled)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, disable=not enabled,
              dynamic_ncols=True, leave=False, **kwargs)


def stages(names, *, desc, enabled=True):
  """A bar over a run's named stages: ``next(bar)`` as each one starts (its name
  shows beside the bar), ``next(bar, None)`` once the last has ended."""
  bar = progress(total=len(names), desc=desc, enabled=enabled, unit="stage")
  for number, name in enumerate(names):
    if number:
      bar.update()
    bar.set_postfix_str(name)
    yield name
  bar.update()
  bar.close()
