"""One place for each job, checked on the package source with ``ast``.

- atomic writes: only :mod:`lightning_sketch.io.safeio` renames temporary files into place;
- plotting: only :mod:`lightning_sketch.report.plots` imports matplotlib, and nothing calls ``matplotlib.use``;
- progress bars: tqdm only (rich is not imported);
- per-example losses: only :mod:`lightning_sketch.gradients.loss` looks up ``per_example_loss`` on a
  module other than ``self``;
- eval mode: one guard (``gradients.loss.train_mode``); no module defines its own ``_eval_mode``;
- integer arguments: checked by ``_checks`` only (no hand-written ``isinstance(x, bool) or ...``);
- sketch kinds: no comparison with the string ``"per_layer"`` outside ``sketches/`` (capabilities
  such as ``Sketch.supports_factorized`` are used instead).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightning_sketch"


def _trees() -> dict[str, ast.AST]:
    return {p.relative_to(PKG).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in PKG.rglob("*.py")}


def _imported(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def _calls(tree: ast.AST, owner: str, attr: str) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
        and isinstance(n.func.value, ast.Name) and n.func.value.id == owner
        for n in ast.walk(tree)
    )


def test_atomic_renames_only_in_safeio():
    renames = (("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"))
    bad = [f for f, t in _trees().items() if f != "io/safeio.py" and any(_calls(t, *c) for c in renames)]
    assert not bad, f"atomic writes outside io/safeio.py: {bad}"


def test_plotting_in_one_module_and_backend_never_switched():
    trees = _trees()
    assert not [f for f, t in trees.items() if "matplotlib" in _imported(t) and f != "report/plots.py"]
    assert not [f for f, t in trees.items() if _calls(t, "matplotlib", "use")]


def test_one_progress_library():
    trees = _trees()
    assert not [f for f, t in trees.items() if "rich" in _imported(t)]
    assert [f for f, t in trees.items() if "tqdm" in _imported(t)]
    # tomllib is Python >= 3.11 and the package supports 3.10: read the [project] dependencies list by hand
    block = re.search(r"^dependencies = \[(.*?)^\]", (PKG.parent / "pyproject.toml").read_text(), re.S | re.M)
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)
    names = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"torch", "lightning", "jinja2"} <= names
    assert "tqdm" in names and "rich" not in names  # the declared dependencies tell the truth


def test_per_example_loss_is_looked_up_in_one_place():
    bad = []
    for f, t in _trees().items():
        if f == "gradients/loss.py":
            continue
        for n in ast.walk(t):
            if isinstance(n, ast.Attribute) and n.attr == "per_example_loss" and not (
                isinstance(n.value, ast.Name) and n.value.id == "self"
            ):
                bad.append(f"{f}:{n.lineno}")
            if isinstance(n, ast.Constant) and n.value == "per_example_loss":
                bad.append(f"{f}:{n.lineno}")
    assert not bad, f"per_example_loss resolved outside gradients.loss: {bad}"


def test_one_eval_mode_guard():
    bad = [f for f, t in _trees().items() for n in ast.walk(t)
           if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in ("_eval_mode", "eval_mode")
           and f != "gradients/loss.py"]
    assert not bad, bad


def test_no_sketch_kind_string_checks():
    bad = []
    for f, t in _trees().items():
        if f.startswith("sketches/"):
            continue
        for n in ast.walk(t):
            if isinstance(n, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value == "per_layer" for c in [n.left, *n.comparators]
            ):
                bad.append(f"{f}:{n.lineno}")
    assert not bad, f"kind string checks (use a Sketch capability): {bad}"


def test_integer_arguments_checked_by_the_shared_validators():
    """No hand-written ``isinstance(x, bool) or not isinstance(x, int)``: ``_checks`` has one rule."""
    pattern = re.compile(r"isinstance\((\w[\w.]*), bool\) or not isinstance\(\1, int\)")
    bad = [f"{p.relative_to(PKG).as_posix()}:{i}"
           for p in PKG.rglob("*.py") if p.name != "_checks.py"
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not bad, f"use lightning_sketch._checks (integer, positive_int, ...): {bad}"
