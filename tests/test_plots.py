"""plot_search draws on its own Agg canvas and leaves the process-wide matplotlib backend alone."""

from __future__ import annotations

import matplotlib
import pytest

from lightning_sketch.plots import plot_search


def test_plot_search_writes_a_png_without_switching_the_backend(tmp_path, monkeypatch):
    def no_backend_switch(*args, **kwargs):
        raise AssertionError("plot_search must not call matplotlib.use (it changes the user's backend)")

    monkeypatch.setattr(matplotlib, "use", no_backend_switch)
    backend = matplotlib.rcParams["backend"]
    history = [
        {"step": 0, "d": 4, "metric": 0.1, "action": "baseline"},
        {"step": 10, "d": 4, "metric": 0.4, "action": "continue"},
        {"step": 20, "d": 4, "metric": 0.41, "action": "double"},
        {"step": 30, "d": 8, "metric": 0.95, "action": "done"},
    ]
    out = plot_search(history, 0.9, tmp_path / "sub" / "search.png", verify={"d": 4, "metric": 0.5})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.rcParams["backend"] == backend


@pytest.mark.parametrize("target", [None, 0.5])
def test_plot_search_with_an_empty_history(tmp_path, target):
    assert plot_search([], target, tmp_path / "empty.png").exists()
