"""plot_search draws on its own Agg canvas and leaves the process-wide matplotlib backend alone."""

from __future__ import annotations

import matplotlib
import pytest

from lightning_sketch.report.plots import plot_search


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


def _legend_of_left_axes(fig):
    ax = fig.axes[0]
    return ax, [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("k", [3, 10])
def test_eigenvalue_legends_name_every_line_drawn(k):
    import torch

    from lightning_sketch.report.plots import spectrum_figure, spectrum_history_figure

    vals = [torch.linspace(k, 1, k) * (1 + st) for st in range(3)]
    fig = spectrum_figure([(st, {"eigenvalues": v}) for st, v in enumerate(vals)])
    ax, texts = _legend_of_left_axes(fig)
    assert len(ax.get_lines()) == k and texts == [f"λ{i + 1}" for i in range(k)]
    fig = spectrum_history_figure([{"step": st, "eigenvalues": v.tolist()} for st, v in enumerate(vals)], [])
    ax, texts = _legend_of_left_axes(fig)
    assert len(ax.get_lines()) == k and texts == [f"λ{i + 1}" for i in range(k)]


def test_eigenvalue_legend_says_top_k_once_beyond_ten_lines():
    import torch

    from lightning_sketch.report.plots import spectrum_figure

    fig = spectrum_figure([(st, {"eigenvalues": torch.linspace(20, 1, 20)}) for st in range(3)])
    ax, texts = _legend_of_left_axes(fig)
    assert len(ax.get_lines()) == 20 and texts == ["top 20 (dark: λ1)"]
