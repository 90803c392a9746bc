"""Picture of an intrinsic-dimension search: the metric against steps (coloured by d) and against d.

Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas: no pyplot state, and the
process-wide backend is left alone (calling ``matplotlib.use`` would switch the user's own plots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_search"]


def plot_search(
    history: Sequence[Mapping[str, Any]],
    target: float | None,
    path: str | Path,
    verify: Mapping[str, Any] | None = None,
) -> Path:
    """Save a two-panel PNG of a search history (as in ``intrinsic_dimension.json``).

    Left: the monitored metric after each round against the optimizer step, coloured by the active
    size d. Right: the best metric reached at each d (log2 axis), with the target line and, if
    given, the verification run ``{"d": D*/2, "metric": ...}``.

    Args:
        history: dicts with ``step``, ``d`` and ``metric`` (a ``baseline`` entry without a step is skipped).
        target: the target metric (None: no line).
        path: output PNG path (parent folders are created).
        verify: optional verification point.

    Returns:
        The path written.
    """
    # matplotlib is imported on use: it costs about a second and only this function needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    rounds = [h for h in history if h.get("step")]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    if rounds:
        steps, metrics, ds = (
            [h["step"] for h in rounds],
            [h["metric"] for h in rounds],
            [h["d"] for h in rounds],
        )
        ax1.plot(steps, metrics, color="grey", lw=0.8, zorder=0)
        sc = ax1.scatter(
            steps, metrics, c=ds, cmap="viridis", norm=LogNorm(vmin=min(ds), vmax=max(ds) * 1.0001)
        )
        fig.colorbar(sc, ax=ax1, label="active size d")
        best: dict[int, float] = {}
        for h in rounds:
            best[h["d"]] = max(best.get(h["d"], float("-inf")), h["metric"])
        keys = sorted(best)
        ax2.semilogx(keys, [best[d] for d in keys], "o-", base=2, label="best metric at d (search)")
    if verify is not None:
        ax2.semilogx(
            [verify["d"]], [verify["metric"]], "s", color="orange", base=2, label="verification run at D*/2"
        )
    if target is not None:
        for ax in (ax1, ax2):
            ax.axhline(target, color="red", ls="--", label=f"target {target:.3g}")
    ax1.set(xlabel="optimizer step", ylabel="metric", title="single-run doubling search")
    ax2.set(xlabel="d (log2)", ylabel="metric", title="metric against d")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
