"""The docstrings' ``>>>`` examples run as tests (fast, deterministic).

Every module of ``ounl_jax`` and ``experiments`` is collected; modules whose
examples are still ``Example::`` prose would be listed in ``PENDING``.
"""

import doctest
import importlib
import pkgutil

import pytest

import experiments
import ounl_jax

# Modules whose examples may still be ``Example::`` prose (none left).
PENDING: set[str] = set()


def _modules():
  for package in (ounl_jax, experiments):
    yield package.__name__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
      yield info.name


MODULES = sorted(set(_modules()))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS
                                 | doctest.NORMALIZE_WHITESPACE)
  for test in finder.find(module, name):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_no_prose_examples_left_outside_pending():
  for name in MODULES:
    if name in PENDING:
      continue
    source = importlib.import_module(name).__doc__ or ""
    module = importlib.import_module(name)
    text = open(module.__file__).read()
    assert "Example::" not in text and "Example::" not in source, name
