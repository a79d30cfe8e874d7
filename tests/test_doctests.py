"""Every docstring example in the package runs (``# doctest: +SKIP`` marks the few that need data or a GPU)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dpvision

MODULES = sorted(m.name for m in pkgutil.walk_packages(dpvision.__path__, "dpvision.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
