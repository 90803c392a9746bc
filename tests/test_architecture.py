"""The package's import graph: layers that hold, and no cycle (checked with ``ast``, nothing imported).

Layer order (lower layers never import higher ones; the table in docs/design.md, "Layers", which
``test_design_table_agrees`` keeps equal to ``LAYERS``):

0. base: ``exceptions``, ``_checks`` (argument checks), ``_version``, ``io`` (confined file I/O:
   atomic writes, paths, the lock, the pickle-free torch loader), ``layout`` (``ParamLayout``),
   ``linalg`` (``LinearOperator`` and the Krylov and trace solvers)
1. sketches: the random maps Φ
2. numerics: ``gradients``, ``store``, ``data``, ``testing``
3. analyses: ``spectrum``, ``intrinsic``, ``attribution``, ``evaluation``
4. adapters and reporting: ``callbacks``, ``cli``, ``demo``, ``report`` (with its plots)
5. the package root ``lightning_sketch/__init__.py`` (re-exports only)

``LAYERS`` is explicit: a key is a top-level module, a subpackage (covering the modules inside it)
or the package root (covering ``lightning_sketch/__init__.py`` only). A module that none covers has
no layer, so a new module or subpackage fails ``test_every_module_has_a_layer`` until it is placed.

Layers 0-3 are pure PyTorch: they never import Lightning. Every import counts, including those
inside functions (an upward import is upward wherever it is written).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lightning_sketch"
DESIGN = ROOT / "docs" / "design.md"

PACKAGE = "lightning_sketch"

LAYERS = {
    "lightning_sketch.exceptions": 0,
    "lightning_sketch._checks": 0,
    "lightning_sketch._version": 0,
    "lightning_sketch.io": 0,
    "lightning_sketch.layout": 0,
    "lightning_sketch.linalg": 0,
    "lightning_sketch.sketches": 1,
    "lightning_sketch.gradients": 2,
    "lightning_sketch.store": 2,
    "lightning_sketch.data": 2,
    "lightning_sketch.testing": 2,
    "lightning_sketch.spectrum": 3,
    "lightning_sketch.intrinsic": 3,
    "lightning_sketch.attribution": 3,
    "lightning_sketch.evaluation": 3,
    "lightning_sketch.callbacks": 4,
    "lightning_sketch.cli": 4,
    "lightning_sketch.demo": 4,
    "lightning_sketch.report": 4,
    PACKAGE: 5,
}
ADAPTER_ONLY = ("lightning", "pytorch_lightning")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _subpackage(module: str) -> str | None:
    """``lightning_sketch.<sub>`` for a module inside a subpackage, else None."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else None


def layer(module: str) -> int:
    """The layer of ``module``: its own entry in LAYERS, else its subpackage's (never the root's)."""
    if module in LAYERS:
        return LAYERS[module]
    sub = _subpackage(module)
    if sub is not None and sub in LAYERS:
        return LAYERS[sub]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py")


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; ``from pkg import sub`` resolves to the submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in modules else mod, node.lineno))
    return out


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edges = []
    for name, path in modules.items():
        for target, line in _imports(path, name, modules):
            edges.append((name, target, line))
            if target in modules and target != name:
                graph[name].add(target)
    return graph, edges


def test_every_module_has_a_layer():
    missing = []
    for name in _modules():
        try:
            layer(name)
        except AssertionError:
            missing.append(name)
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"


def test_every_layers_entry_is_a_module_or_subpackage():
    modules = _modules()
    stale = [key for key in LAYERS if key not in modules]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    nested = [key for key in LAYERS if key.count(".") > 1]
    assert not nested, f"LAYERS keys are top-level modules or subpackages, got {nested}"


def design_layers() -> dict[str, int]:
    """``{module or subpackage: layer}`` from the Layers table of docs/design.md.

    A row reads ``| N. title | `name`, `sub/*`, ... | may import |``; in the modules column a
    backticked lower-case name is a top-level module, ``name/*`` a subpackage and ``lightning_sketch``
    the package root; CamelCase names (classes, in parentheses) are skipped.
    """
    out: dict[str, int] = {}
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\.[^|]*\|([^|]*)\|", line)
        if not m:
            continue
        for token in re.findall(r"`([^`]+)`", m.group(2)):
            if token == PACKAGE:
                name = PACKAGE
            elif re.fullmatch(r"[a-z_][a-z0-9_]*(/\*)?", token):
                name = f"{PACKAGE}.{token.removesuffix('/*')}"
            else:
                continue
            assert name not in out, f"{name} appears twice in the design table"
            out[name] = int(m.group(1))
    return out


def test_design_table_agrees():
    assert design_layers() == LAYERS


def test_no_upward_import():
    _, edges = _graph()
    bad = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)}) at line {line}"
        for src, dst, line in edges
        if dst.split(".")[0] == "lightning_sketch" and layer(dst) > layer(src)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_core_layers_do_not_import_lightning():
    _, edges = _graph()
    bad = [f"{src} imports {dst} at line {line}" for src, dst, line in edges
           if layer(src) <= 3 and dst.split(".")[0] in ADAPTER_ONLY]
    assert not bad, "Lightning imported outside the adapter layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert not _cycles(graph), _cycles(graph)


def test_the_checks_can_fail():
    """A synthetic cycle is found, and an upward edge is classified as such."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer("lightning_sketch.sketches.affd") < layer("lightning_sketch.gradients.hvp")
    assert layer("lightning_sketch.callbacks.gradient_sketch") > layer("lightning_sketch.attribution.query")
    for unplaced in ("lightning_sketch.newmodule", "lightning_sketch.newpkg.mod", "lightning_sketch.newpkg"):
        with pytest.raises(AssertionError, match="has no layer"):
            layer(unplaced)
