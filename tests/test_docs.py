"""The API reference covers every public symbol, and the docstring examples run as doctests.

The site itself is built by ``.ci/run`` (``python -m sphinx -W --keep-going -b html docs
docs/_build/html``); these checks need no Sphinx.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import kl_precond as kp
from kl_precond import parity

API = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.rst"
MODULES = sorted(m.name for m in pkgutil.iter_modules(kp.__path__, "kl_precond."))


def _documented(text: str) -> set[str]:
  """The names of the ``.. autofunction::`` / ``autoclass`` / ``autodata`` directives."""
  return set(re.findall(r"^\.\. auto(?:function|class|data):: ([\w.]+)", text, re.M))


def test_api_page_documents_every_public_symbol():
  documented = _documented(API.read_text())
  missing = [name for name in kp.__all__ if name not in documented]
  assert not missing, f"add these public symbols of kl_precond to docs/api.rst: {missing}"


def test_api_page_documents_the_public_modules():
  text = API.read_text()
  for module in ("kl_precond.sharding", "kl_precond.diagnostics", "kl_precond.parity"):
    assert re.search(rf"^\.\. automodule:: {re.escape(module)}$", text, re.M), module
  # parity's automodule documents exactly its __all__; make sure there is one.
  assert parity.__all__


def test_modules_with_examples_exist():
  """Guards the doctest below against finding nothing (e.g. a renamed package)."""
  finder = doctest.DocTestFinder()
  examples = sum(
    len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name))
  )
  assert examples >= 10


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), report=True, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
