"""What a config dataclass's field says about its flag: its help text (the
``Attributes:`` section of the docstring) and its type (from the annotation).
"""

from __future__ import annotations

import inspect
import re
import types
import typing

from experiments.setup import configs  # pylint: disable=unused-import (doctest)


def attribute_docs(cls) -> dict[str, str]:
  """Each field's text in the ``Attributes:`` section of ``cls``'s docstring.

  >>> attribute_docs(configs.TrainConfig)["patience"]
  'epochs without a better validation loss before training stops.'
  """
  doc = inspect.getdoc(cls) or ""
  found = re.search(r"^Attributes:\n((?:[ \t]+\S.*\n?|\n)*)", doc, re.M)
  docs, names = {}, []
  for line in (found.group(1) if found else "").splitlines():
    entry = re.match(r"^  (\w+(?:, \w+)*): (.*)$", line)
    if entry:
      names = entry.group(1).split(", ")
      for name in names:
        docs[name] = entry.group(2)
    elif line.strip():
      for name in names:
        docs[name] += " " + line.strip()
  return docs


def kind(owner: type, field: str) -> type:
  """The field's type, ``X | None`` read as X."""
  hint = typing.get_type_hints(owner)[field]
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
  return hint


def tuple_of(hint) -> type | None:
  """X of ``tuple[X, ...]``, else None."""
  if typing.get_origin(hint) is tuple:
    return typing.get_args(hint)[0]
  return None
