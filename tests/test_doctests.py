"""Run every docstring example of the package (the Examples are part of the documentation).

``DOCTEST_MODULES`` names exactly the modules whose source holds a ``>>>`` example, so that every
parametrised case runs at least one example and can fail; ``test_doctest_modules_are_listed``
keeps the list equal to that set (a new example module must be added, a module that lost its
examples must be removed). A prompt holding only a comment (``>>> # see ...``) is no example:
doctest skips it.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import lightning_sketch

PACKAGE_DIR = Path(lightning_sketch.__file__).parent

DOCTEST_MODULES = [
    "lightning_sketch._checks",
    "lightning_sketch.io.safeio",
    "lightning_sketch.io.paths",
    "lightning_sketch.io.torchload",
    "lightning_sketch.attribution._stored",
    "lightning_sketch.attribution.curvature",
    "lightning_sketch.attribution.damping",
    "lightning_sketch.attribution.meaning",
    "lightning_sketch.attribution.scores",
    "lightning_sketch.attribution.task",
    "lightning_sketch.callbacks.gradient_sketch",
    "lightning_sketch.cli",
    "lightning_sketch.cli.commands",
    "lightning_sketch.data",
    "lightning_sketch.demo",
    "lightning_sketch.evaluation.metrics",
    "lightning_sketch.evaluation.retraining",
    "lightning_sketch.gradients._capture_plan",
    "lightning_sketch.gradients.capture",
    "lightning_sketch.gradients.hvp",
    "lightning_sketch.gradients.loss",
    "lightning_sketch.gradients.per_example",
    "lightning_sketch.intrinsic.search",
    "lightning_sketch.intrinsic.subspace",
    "lightning_sketch.layout",
    "lightning_sketch.linalg.krylov",
    "lightning_sketch.linalg.operators",
    "lightning_sketch.linalg.trace",
    "lightning_sketch.report",
    "lightning_sketch.sketches",
    "lightning_sketch.sketches._common",
    "lightning_sketch.sketches._kron",
    "lightning_sketch.sketches.affd",
    "lightning_sketch.sketches.afjl",
    "lightning_sketch.sketches.base",
    "lightning_sketch.sketches.dense",
    "lightning_sketch.sketches.ffd",
    "lightning_sketch.sketches.fjl",
    "lightning_sketch.sketches.identity",
    "lightning_sketch.sketches.per_layer",
    "lightning_sketch.sketches.qk",
    "lightning_sketch.spectrum.budget",
    "lightning_sketch.spectrum.snapshot",
    "lightning_sketch.spectrum.stats",
    "lightning_sketch.store._io",
    "lightning_sketch.store._validate",
    "lightning_sketch.store.index",
    "lightning_sketch.store.inspect",
    "lightning_sketch.store.manifest",
    "lightning_sketch.store.provenance",
    "lightning_sketch.store.rows",
    "lightning_sketch.store.store",
    "lightning_sketch.store.views",
    "lightning_sketch.testing",
]


#: modules whose examples take more than 3 s (the gradient_sketch example trains a model)
SLOW_DOCTESTS = {"lightning_sketch.callbacks.gradient_sketch"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: a ``>>>`` prompt that starts a line and holds code (not only a comment, which doctest skips)
EXAMPLE_LINE = re.compile(r"^\s*>>>(?!\s*(#|$))", re.MULTILINE)


def modules_with_examples() -> set[str]:
    """The package's modules whose source contains a ``>>>`` example line."""
    paths = PACKAGE_DIR.rglob("*.py")
    return {_module_name(p) for p in paths if EXAMPLE_LINE.search(p.read_text(encoding="utf-8"))}


def test_doctest_modules_are_listed() -> None:
    assert len(DOCTEST_MODULES) == len(set(DOCTEST_MODULES)), "DOCTEST_MODULES lists a module twice"
    assert SLOW_DOCTESTS <= set(DOCTEST_MODULES)
    found = modules_with_examples()
    listed = set(DOCTEST_MODULES)
    assert not found - listed, f"modules with examples missing from DOCTEST_MODULES: {sorted(found - listed)}"
    assert not listed - found, f"listed modules without examples: {sorted(listed - found)}"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_DOCTESTS else n for n in DOCTEST_MODULES]
)
def test_module_doctests(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0, f"{name} holds `>>>` but doctest collected no example from it"
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
