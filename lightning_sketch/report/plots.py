"""Every figure the library draws: the callbacks' PNGs and the report's embedded pictures (layer 4).

Figures are :class:`matplotlib.figure.Figure` objects with their own Agg canvas
(:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`): no pyplot state, and the process-wide
backend is never switched (``matplotlib.use`` would change the user's own plots). Text taken from
files is drawn as plain text (:func:`plain`: no mathtext; ``text.usetex`` is off in the report).
PNGs reach disk only through :func:`lightning_sketch.io.safeio.atomic_write` (a fresh ``O_EXCL``
temporary file renamed over the target, never written through a planted symlink).

matplotlib is imported when the first figure is drawn (about a second), never by importing the
package or the callbacks.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.io.safeio import atomic_write

__all__ = [
    "attribution_figure",
    "figure",
    "intrinsic_figure",
    "metrics_figure",
    "plain",
    "plain_text",
    "plot_search",
    "png_bytes",
    "save_png",
    "spectrum_figure",
    "spectrum_history_figure",
]


#: eigenvalue trajectories named one by one in a legend; more share one "top k" entry.
_NAMED_EIGENVALUES = 10


def _eigenvalue_styles(k: int) -> list[dict[str, Any]]:
    """Line label and colour for each of ``k`` eigenvalue trajectories, largest first.

    Up to :data:`_NAMED_EIGENVALUES` lines get one legend entry each (``λ1`` ... ``λk``), so the
    legend names every line drawn. Beyond that the default colour cycle would repeat, so the lines
    are shaded along a colormap (darkest = λ1) and one entry says ``top k``.
    """
    if k <= _NAMED_EIGENVALUES:
        return [{"label": f"λ{i + 1}"} for i in range(k)]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [{"label": f"top {k} (dark: λ1)" if i == 0 else None, "color": cmap(0.9 * i / (k - 1))}
            for i in range(k)]


def figure(width: float, height: float) -> Any:
    """A new Figure (inches) attached to its own Agg canvas."""
    # matplotlib on first use: importing it costs about a second and only drawing needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int = 90, tight: bool = False) -> bytes:
    """The figure as PNG bytes (``tight``: crop to the drawn area)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def save_png(fig: Any, path: str | Path, dpi: int = 100, what: str = "plot") -> Path:
    """Write the figure as a PNG atomically (parent folders are created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, [png_bytes(fig, dpi)], what=what)
    return out


@contextlib.contextmanager
def plain_text() -> Iterator[None]:
    """A context in which matplotlib draws text without TeX (``text.usetex`` off), whatever the user set."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": False}):
        yield


def plain(text: Any) -> str:
    """Text from a file for a label: ``$`` escaped, so matplotlib never parses it as mathtext."""
    return str(text).replace("\\", "\\\\").replace("$", r"\$")


# ---------------------------------------------------------------------------- callbacks
def plot_search(
    history: Sequence[Mapping[str, Any]],
    target: float | None,
    path: str | Path,
    verify: Mapping[str, Any] | None = None,
) -> Path:
    """Save a two-panel PNG of an intrinsic-dimension search history (as in ``intrinsic_dimension.json``).

    Left: the monitored metric after each round against the optimizer step, coloured by the active
    size d. Right: the best metric reached at each d (log2 axis), with the target line and, if
    given, the verification run ``{"d": D*/2, "metric": ...}``.

    Args:
        history: dicts with ``step``, ``d`` and ``metric`` (a ``baseline`` entry without a step is skipped).
        target: the target metric (None: no line).
        path: output PNG path (parent folders are created; written atomically).
        verify: optional verification point.

    Returns:
        The path written.
    """
    from matplotlib.colors import LogNorm

    rounds = [h for h in history if h.get("step")]
    fig = figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    if rounds:
        steps, metrics = [h["step"] for h in rounds], [h["metric"] for h in rounds]
        ds = [h["d"] for h in rounds]
        ax1.plot(steps, metrics, color="grey", lw=0.8, zorder=0)
        norm = LogNorm(vmin=min(ds), vmax=max(ds) * 1.0001)
        sc = ax1.scatter(steps, metrics, c=ds, cmap="viridis", norm=norm)
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
    return save_png(fig, path, dpi=120, what="intrinsic-dimension plot")


def spectrum_history_figure(
    history: Sequence[Mapping[str, Any]], densities: Sequence[tuple[int, Any, Any]]
) -> Any:
    """Eigenvalue trajectories (left) and SLQ densities (right) of a HessianSpectrum run.

    Args:
        history: the callback's records, each with ``step`` and ``eigenvalues``.
        densities: ``(index in history, grid, density)`` for the snapshots that recorded one.
    """
    import matplotlib

    fig = figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [e["step"] for e in history]
    k = max(len(e["eigenvalues"]) for e in history)
    for i, style in enumerate(_eigenvalue_styles(k)):
        xs = [s for s, e in zip(steps, history) if len(e["eigenvalues"]) > i]
        ys = [e["eigenvalues"][i] for e in history if len(e["eigenvalues"]) > i]
        ax1.plot(xs, ys, marker="o", ms=3, lw=1, **style)
    ax1.set_xlabel("global step")
    ax1.set_ylabel("eigenvalue of Φ H Φᵀ")
    ax1.set_title("Top Hessian eigenvalues")
    ax1.legend(fontsize=7, ncol=2 if k > 5 else 1)
    cmap = matplotlib.colormaps["viridis"]
    for j, grid, dens in densities:
        color = cmap(j / max(1, len(history) - 1))
        ax2.plot(np.asarray(grid), np.asarray(dens), color=color, lw=1, label=f"step {history[j]['step']}")
    ax2.set_yscale("log")
    ax2.set_ylim(bottom=1e-5)
    ax2.set_xlabel("eigenvalue")
    ax2.set_title("SLQ spectral density" if densities else "SLQ spectral density (off)")
    if densities:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- report
def metrics_figure(series: Mapping[str, Sequence[tuple[float, float]]], keys: Sequence[str]) -> Any:
    """Training curves: losses left, accuracies right (other scalars are left to the report's table)."""
    fig = figure(9, 3.2)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for k in keys:
        if "loss" not in k and "acc" not in k:
            continue
        ax = axes[1] if "acc" in k else axes[0]
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=plain(k))
    for ax, title in zip(axes, ("losses", "accuracies")):
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def _image(img: Any) -> np.ndarray | None:
    if img is None:
        return None
    arr = np.asarray(img, dtype=float)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.moveaxis(arr, 0, -1).squeeze()
    if arr.ndim not in (2, 3) or arr.size > 1 << 20 or not np.isfinite(arr).all():
        raise ValueError(f"image of shape {arr.shape} is not a picture")
    return arr


def _picture_row(fig: Any, rows: int, r: int, rec: Mapping[str, Any], cols: int) -> None:
    head = f"query {rec['query']}\nlabel {rec['label']} pred {rec.get('prediction')}"
    if rec.get("view") is not None:  # one of several rankings of the query: name its method
        head = f"{rec['view']}: {head}"
    cells = [("query", rec.get("image"), head)]
    for sign, kind in (("+", "proponents"), ("-", "opponents")):
        cells += [(sign, e.get("image"), f"{sign} id {e['id']} y={e['label']}\n{e['score']:.3g}")
                  for e in rec[kind]]
    for c, (kind, img, title) in enumerate(cells[:cols]):
        ax = fig.add_subplot(rows, cols, r * cols + c + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        arr = _image(img)
        if arr is not None:
            ax.imshow(arr, cmap="gray_r")
        color = {"query": "black", "+": "tab:green", "-": "tab:red"}[kind]
        ax.set_title(title, fontsize=7, color=color, parse_math=False)
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2)


def attribution_figure(recs: Sequence[Mapping[str, Any]]) -> Any:
    """One row per query: its picture, then its proponents (green) and opponents (red).

    A record with a ``"view"`` (a method name) is one of several rankings of its query; the name
    heads its row.

    Raises:
        ValueError: an ``image`` that is not a finite 2-D/3-D picture of at most 2^20 values.
    """
    cols = 1 + max(len(r["proponents"]) + len(r["opponents"]) for r in recs)
    fig = figure(1.25 * cols, 1.6 * len(recs))
    for r, rec in enumerate(recs):
        _picture_row(fig, len(recs), r, rec, cols)
    fig.subplots_adjust(hspace=0.9)
    return fig


def spectrum_figure(snaps: Sequence[tuple[int, Mapping[str, Any]]]) -> Any:
    """Top eigenvalues over training (left) and up to four SLQ densities (right) from snapshots."""
    k = max(len(s["eigenvalues"]) for _, s in snaps)
    fig = figure(10, 3.4)
    ax = fig.add_subplot(1, 2, 1)
    steps = [st for st, _ in snaps]
    for i, style in enumerate(_eigenvalue_styles(k)):
        vals = [float(s["eigenvalues"][i]) if i < len(s["eigenvalues"]) else np.nan for _, s in snaps]
        ax.plot(steps, vals, marker="o", ms=3, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title("top eigenvalues over training")
    ax.legend(fontsize=7, ncol=2 if k > 5 else 1)
    ax2 = fig.add_subplot(1, 2, 2)
    with_density = [(st, s) for st, s in snaps if "density" in s and "density_grid" in s]
    chosen = with_density
    if len(with_density) > 4:
        chosen = [with_density[i] for i in np.linspace(0, len(with_density) - 1, 4).astype(int)]
    for st, s in chosen:
        ax2.plot(s["density_grid"].numpy(), s["density"].numpy(), label=f"step {st}")
    ax2.set_title("spectral density (SLQ)" if chosen else "no density recorded")
    ax2.set_xlabel("eigenvalue")
    if chosen:
        top = max(float(s["density"].max()) for _, s in chosen)
        if np.isfinite(top) and top > 0:
            ax2.set_yscale("log")
            ax2.set_ylim(top * 1e-6, top * 2)  # six decades: Gaussian tails below are noise
        ax2.legend(fontsize=7)
    return fig


def intrinsic_figure(pts: Sequence[Mapping[str, Any]], target: float | None, d_star: Any) -> Any:
    """The metric against the active dimension d (left) and, when all points have a step, d over time."""

    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    fig = figure(9, 3.2)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([h["d"] for h in pts], [h["metric"] for h in pts], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active dimension d")
    ax.set_ylabel("monitored metric")
    if num(target):
        ax.axhline(target, color="tab:red", ls="--", label="target")
    if num(d_star):
        ax.axvline(d_star, color="tab:green", ls=":", label=plain(f"D* = {d_star}"))
    ax.legend(fontsize=7)
    ax.set_title("metric against d")
    steps = [h.get("step") for h in pts]
    if all(num(s) for s in steps):
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.step(steps, [h["d"] for h in pts], where="post")
        ax2.set_yscale("log", base=2)
        ax2.set_xlabel("step")
        ax2.set_ylabel("d")
        ax2.set_title("d over the single run")
    return fig
