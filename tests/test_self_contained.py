"""The repository stands on its own: it cites no file that is not in it.

Scans every text file of the checkout (package, tests, benchmarks, configs, examples, docs, CI
scripts) for (1) the team's private notes, which never ship with the repository, (2) relative paths
that leave the repository (into the team's shared folder), and (3) repository paths such as ``docs/design.md`` or
``lightning_sketch/store/index.py`` and relative Markdown link targets, which must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "build", "dist", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".json", ".html", ".j2", ""}

# Spelled in pieces so that this file does not match its own scan.
PRIVATE_NOTES = ["paper" + ".md", "anchors" + ".md", "machine-notes" + ".md", "style" + ".md"]
OUTSIDE = [".." + "/shared", "shared" + "/reference"]
TOP_DIRS = ("lightning_sketch", "tests", "benchmarks", "configs", "examples", "docs", ".ci")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|md|yaml|yml|json|toml|txt))" % "|".join(re.escape(d) for d in TOP_DIRS))
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _text_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts):
            continue
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "run") and p.stat().st_size < 2_000_000:
            out.append(p)
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def test_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in _text_files()}
    assert {"README.md", "docs/design.md", "lightning_sketch/sketches/affd.py", "tests/test_self_contained.py"} <= files


def test_no_reference_to_private_notes_or_outside_paths():
    hits = []
    for p in _text_files():
        text = _read(p)
        for name in PRIVATE_NOTES + OUTSIDE:
            for m in re.finditer(re.escape(name), text):
                # A longer file name that merely ends like a private note (``my_<note>``) is not it.
                if name in PRIVATE_NOTES and m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "_-"):
                    continue
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{p.relative_to(ROOT)}:{line}: {name}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_repository_paths_and_markdown_links_exist():
    missing = []
    for p in _text_files():
        text = _read(p)
        for m in REPO_PATH.finditer(text):
            target = m.group(1).rstrip(".")
            if "/." in target:  # generated, git-ignored outputs (e.g. benchmarks/.cache/) are not shipped
                continue
            if not (ROOT / target).exists():
                missing.append(f"{p.relative_to(ROOT)}: {target}")
        if p.suffix == ".md":
            for m in MD_LINK.finditer(text):
                target = m.group(1)
                if "://" in target or target.startswith(("mailto:", "#")):
                    continue
                if not (p.parent / target).exists():
                    missing.append(f"{p.relative_to(ROOT)}: link {target}")
    assert not missing, "paths that do not exist in the repository:\n" + "\n".join(sorted(set(missing)))


def test_the_check_catches_a_dangling_reference():
    """The patterns do match what they should (guards against a scan that can never fail)."""
    absent = "docs/" + "nowhere_at_all.md"
    text = f"see {absent} and [x](missing.md) and {PRIVATE_NOTES[0]} and {OUTSIDE[0]}"
    assert [m.group(1) for m in REPO_PATH.finditer(text)] == [absent]
    assert not (ROOT / absent).exists()
    assert [m.group(1) for m in MD_LINK.finditer(text)] == ["missing.md"]
    assert all(name in text for name in (PRIVATE_NOTES[0], OUTSIDE[0]))
