"""Run every docstring example of the package (the Examples are part of the documentation)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_sketch

MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_sketch.__path__, "lightning_sketch."))


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
