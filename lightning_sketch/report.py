"""A self-contained HTML report of a run directory (``lightning-sketch report RUN_DIR``).

The report gathers what the callbacks and the CLI left under ``RUN_DIR`` and embeds every figure
as a base64 PNG (matplotlib, Agg backend, no global pyplot state), so the single HTML file can be
mailed or opened offline. Sections, each present only when its data exist (otherwise the report
says what it looked for):

- **Training metrics**: curves from Lightning's CSV logger (``metrics.csv``).
- **Sketch store**: :func:`~lightning_sketch.store.inspect_store` of every store found
  (rows, checkpoints, sketch, index kind, size on disk, health).
- **Attribution examples**: query results written by ``lightning-sketch query --format json``
  (pictures of the query and of its top proponents/opponents when inputs are images).
- **Hessian spectrum**: eigenvalue trajectories, the summary scalars per snapshot and the SLQ
  densities from the :class:`~lightning_sketch.callbacks.HessianSpectrum` snapshot directories
  (``index.json`` in the ``lightning_sketch.spectrum/v1`` format).
- **Intrinsic dimension**: the metric against the active dimension d and D* from
  ``intrinsic_dimension.json`` (:class:`~lightning_sketch.callbacks.IntrinsicDimension`).

Example:
    >>> import tempfile
    >>> out = write_report(tempfile.mkdtemp())
    >>> "No sketch store" in out.read_text()
    True
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.exceptions import LightningSketchError, StoreNotFoundError

__all__ = ["build_report", "write_report"]

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.absent{color:#888;font-style:italic}
.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}img{max-width:100%}
nav a{margin-right:1em}code{background:#f4f4f4;padding:0 3px}
"""

_MAX_QUERIES = 6


# ---------------------------------------------------------------------------- helpers
def _png(fig: Any) -> str:
    """An <img> tag with the figure as an embedded base64 PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, v: Any, j: int) -> str:
        cls = ' class="l"' if j < left else ""
        text = f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", h, j) for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", v, j) for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _absent(text: str) -> str:
    return f'<p class="absent">{html.escape(text)}</p>'


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _find(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name) if "shards" not in p.relative_to(root).parts)


# ---------------------------------------------------------------------------- sections
def _metrics_section(root: Path) -> str:
    files = _find(root, "metrics.csv")
    if not files:
        return _absent("No Lightning CSV logger output (metrics.csv) in this run.")
    parts = []
    for f in files[-2:]:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            step = r.get("step")
            for k, v in r.items():
                if k in ("step", "epoch") or not v or step in (None, ""):
                    continue
                try:
                    series.setdefault(k, []).append((float(step), float(v)))
                except ValueError:
                    continue
        keys = [k for k in sorted(series) if not k.startswith("hessian/")][:8]
        if not keys:
            continue
        fig = _figure(9, 3.2)
        axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
        for k in keys:  # losses left, accuracies right; other scalars (e.g. intrinsic/d) only in the table
            if "loss" not in k and "acc" not in k:
                continue
            ax = axes[1] if "acc" in k else axes[0]
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
        for ax, title in zip(axes, ("losses", "accuracies")):
            ax.set_xlabel("step")
            ax.set_title(title)
            if ax.lines:
                ax.legend(fontsize=7)
        last = [[k, series[k][-1][0], series[k][-1][1]] for k in keys]
        parts.append(f"<p>From <code>{html.escape(_rel(f, root))}</code>.</p>" + _png(fig)
                     + _table(["metric", "last step", "last value"], last))
    return "".join(parts) or _absent("metrics.csv files hold no numeric metrics.")


def _store_section(root: Path) -> str:
    from lightning_sketch.store import inspect_store

    stores = [p.parent for p in _find(root, "manifest.json")]
    if not stores:
        return _absent("No sketch store (no manifest.json) in this run: the GradientSketch callback was not used.")
    parts = []
    for s in stores:
        try:
            info = inspect_store(s)
        except LightningSketchError as err:
            parts.append(f'<p class="bad">{html.escape(_rel(s, root))}: {html.escape(str(err))}</p>')
            continue
        spec = info.get("spec") or {}
        ok = info["health"]["ok"]
        status = '<span class="ok">OK</span>' if ok else f'<span class="bad">INCONSISTENT: {html.escape(str(info["health"]["error"]))}</span>'
        summary = [
            ["path", _rel(s, root)], ["health", None], ["rows", info["rows"]],
            ["sketch kind", spec.get("kind")], ["N (parameters)", spec.get("dim")], ["D (sketch_dim)", info["sketch_dim"]],
            ["seed", spec.get("seed")], ["dtype", info["dtype"]], ["size on disk (bytes)", info["size_bytes"]],
            ["bytes per row", info.get("bytes_per_row")],
            ["indexes", ", ".join(f"{e['kind']}({e['view']})" for e in info["indexes"]) or "none (flat search)"],
        ]
        table = _table(["field", "value"], summary, left=2).replace("<td class=\"l\"></td>", f"<td class=\"l\">{status}</td>", 1)
        ckpts = _table(["checkpoint", "step", "lr", "rows"],
                       [[c["name"], c.get("step"), c.get("lr"), c.get("rows")] for c in info["checkpoints"]])
        parts.append(f"<h3>{html.escape(_rel(s, root))}</h3>{table}<p>Checkpoint slices:</p>{ckpts}")
    return "".join(parts)


def _load_queries(root: Path, queries: str | Path | None) -> list[tuple[Path, dict[str, Any]]]:
    files = [Path(queries)] if queries is not None else sorted(root.rglob("*.json"))
    out = []
    for f in files:
        if queries is None and f.stat().st_size > 20_000_000:
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            if queries is not None:
                raise StoreNotFoundError(f"`queries` file {str(f)!r} is not readable JSON ({err}).") from None
            continue
        if isinstance(data, dict) and data.get("format") == "lightning_sketch.query/v1":
            out.append((f, data))
    return out


def _picture_row(fig: Any, rows: int, r: int, rec: dict[str, Any], cols: int) -> None:
    cells = [("query", rec.get("image"), f"query {rec['query']}\nlabel {rec['label']} pred {rec.get('prediction')}")]
    cells += [("+", e.get("image"), f"+ id {e['id']} y={e['label']}\n{e['score']:.3g}") for e in rec["proponents"]]
    cells += [("-", e.get("image"), f"- id {e['id']} y={e['label']}\n{e['score']:.3g}") for e in rec["opponents"]]
    for c, (kind, img, title) in enumerate(cells[:cols]):
        ax = fig.add_subplot(rows, cols, r * cols + c + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if img is not None:
            arr = np.asarray(img, dtype=float)
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = np.moveaxis(arr, 0, -1).squeeze()
            ax.imshow(arr, cmap="gray_r")
        color = {"query": "black", "+": "tab:green", "-": "tab:red"}[kind]
        ax.set_title(title, fontsize=7, color=color)
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2)


def _attribution_section(root: Path, queries: str | Path | None) -> str:
    found = _load_queries(root, queries)
    if not found:
        return _absent("No attribution query results in this run (write them with "
                       "`lightning-sketch query ... --format json --output RUN_DIR/query.json`).")
    parts = ["<p>Score sign: <b>positive</b> = training on the example lowers the query's loss "
             "(proponent, green); <b>negative</b> = it raises it (opponent, red).</p>"]
    for f, data in found:
        recs = data["queries"][:_MAX_QUERIES]
        parts.append(f"<h3>{html.escape(_rel(f, root))}: method <code>{html.escape(str(data.get('method')))}</code>, "
                     f"{len(data['queries'])} queries, k={data.get('k')}</h3>")
        if any(r.get("image") is not None for r in recs):
            k = max(len(r["proponents"]) + len(r["opponents"]) for r in recs)
            cols = 1 + k
            fig = _figure(1.25 * cols, 1.6 * len(recs))
            for r, rec in enumerate(recs):
                _picture_row(fig, len(recs), r, rec, cols)
            fig.subplots_adjust(hspace=0.9)
            parts.append(_png(fig))
        rows = []
        for rec in recs:
            for kind in ("proponents", "opponents"):
                for rank, e in enumerate(rec[kind], 1):
                    rows.append([rec["query"], rec["label"], kind[:-1], rank, e["id"], e["label"], float(e["score"])])
        parts.append(_table(["query", "label", "kind", "rank", "train id", "train label", "score"], rows, left=0))
    return "".join(parts)


def _spectrum_section(root: Path) -> str:
    from lightning_sketch.spectrum.snapshot import FORMAT, load_index, load_snapshot

    dirs = []
    for idx in _find(root, "index.json"):
        try:
            if json.loads(idx.read_text()).get("format") == FORMAT:
                dirs.append(idx.parent)
        except (OSError, ValueError, AttributeError):
            continue
    if not dirs:
        return _absent("No Hessian spectrum snapshots (index.json in the lightning_sketch.spectrum/v1 format) "
                       "in this run: the HessianSpectrum callback was not used.")
    parts = []
    for d in dirs:
        entries = load_index(d)
        snaps = [(e["step"], load_snapshot(d / e["file"])) for e in entries]
        if not snaps:
            parts.append(_absent(f"{_rel(d, root)}: index without snapshots."))
            continue
        k = max(len(s["eigenvalues"]) for _, s in snaps)
        fig = _figure(10, 3.4)
        ax = fig.add_subplot(1, 2, 1)
        steps = [st for st, _ in snaps]
        for i in range(k):
            vals = [float(s["eigenvalues"][i]) if i < len(s["eigenvalues"]) else np.nan for _, s in snaps]
            ax.plot(steps, vals, marker="o", ms=3, label=f"λ{i + 1}" if i < 5 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue")
        ax.set_title("top eigenvalues over training")
        ax.legend(fontsize=7)
        ax2 = fig.add_subplot(1, 2, 2)
        with_density = [(st, s) for st, s in snaps if "density" in s and "density_grid" in s]
        chosen = with_density if len(with_density) <= 4 else [with_density[i] for i in
                                                               np.linspace(0, len(with_density) - 1, 4).astype(int)]
        for st, s in chosen:
            ax2.plot(s["density_grid"].numpy(), s["density"].numpy(), label=f"step {st}")
        ax2.set_title("spectral density (SLQ)" if chosen else "no density recorded")
        ax2.set_xlabel("eigenvalue")
        if chosen:
            top = max(float(s["density"].max()) for _, s in chosen)
            ax2.set_yscale("log")
            ax2.set_ylim(top * 1e-6, top * 2)  # six decades: Gaussian tails below are noise
            ax2.legend(fontsize=7)
        parts.append(f"<h3>{html.escape(_rel(d, root))}: {len(snaps)} snapshots</h3>" + _png(fig))
        names = sorted({n for e in entries for n, v in (e.get("scalars") or {}).items() if isinstance(v, (int, float))})
        names = names[:9]
        rows = [[e["step"], *[(e.get("scalars") or {}).get(n) for n in names]] for e in entries]
        conv = [[st, int(s["converged"].sum()) if "converged" in s else None, len(s["eigenvalues"]),
                 float(s["residuals"].max()) if "residuals" in s and len(s["residuals"]) else None] for st, s in snaps]
        parts.append(_table(["step", *names], rows, left=0)
                     + _table(["step", "converged", "k", "max residual"], conv, left=0))
    return "".join(parts)


def _intrinsic_section(root: Path) -> str:
    files = _find(root, "intrinsic_dimension.json")
    if not files:
        return _absent("No intrinsic_dimension.json in this run: the IntrinsicDimension callback was not used.")
    parts = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            parts.append(f'<p class="bad">{html.escape(_rel(f, root))} is unreadable: {html.escape(str(err))}</p>')
            continue
        hist = data.get("history") or (data.get("search") or {}).get("history") or []
        pts = [h for h in hist if isinstance(h, dict) and h.get("metric") is not None and h.get("d") is not None]
        d_star = data.get("d_star", (data.get("search") or {}).get("d_star"))
        facts = [[k, v] for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None][:16]
        parts.append(f"<h3>{html.escape(_rel(f, root))}: D* = {html.escape(str(d_star))}</h3>")
        if pts:
            fig = _figure(9, 3.2)
            ax = fig.add_subplot(1, 2, 1)
            ax.plot([h["d"] for h in pts], [h["metric"] for h in pts], "o-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("active dimension d")
            ax.set_ylabel("monitored metric")
            target = data.get("target", (data.get("search") or {}).get("target"))
            if isinstance(target, (int, float)):
                ax.axhline(target, color="tab:red", ls="--", label="target")
            if isinstance(d_star, (int, float)):
                ax.axvline(d_star, color="tab:green", ls=":", label=f"D* = {d_star}")
            ax.legend(fontsize=7)
            ax.set_title("metric against d")
            steps = [h.get("step") for h in pts]
            if all(isinstance(s, (int, float)) for s in steps):
                ax2 = fig.add_subplot(1, 2, 2)
                ax2.step(steps, [h["d"] for h in pts], where="post")
                ax2.set_yscale("log", base=2)
                ax2.set_xlabel("step")
                ax2.set_ylabel("d")
                ax2.set_title("d over the single run")
            parts.append(_png(fig))
            parts.append(_table(["round", "step", "d", "metric", "action"],
                                [[h.get("round"), h.get("step"), h["d"], h["metric"], h.get("action")] for h in pts], left=0))
        else:
            parts.append(_absent("The file holds no (d, metric) history."))
        parts.append(_table(["field", "value"], facts, left=2))
    return "".join(parts)


# ---------------------------------------------------------------------------- entry points
def build_report(run_dir: str | Path, queries: str | Path | None = None) -> str:
    """The report of ``run_dir`` as one HTML string (figures embedded as base64 PNG).

    Raises:
        StoreNotFoundError: if ``run_dir`` is not a directory, or ``queries`` is not readable JSON.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise StoreNotFoundError(f"Run directory {str(root)!r} does not exist; pass the run's trainer.default_root_dir.")
    sections = [
        ("metrics", "Training metrics", _metrics_section(root)),
        ("store", "Sketch store", _store_section(root)),
        ("attribution", "Attribution examples", _attribution_section(root, queries)),
        ("spectrum", "Hessian spectrum", _spectrum_section(root)),
        ("intrinsic", "Intrinsic dimension", _intrinsic_section(root)),
    ]
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>' for sid, title, content in sections)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from lightning_sketch import __version__

    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>lightning_sketch report: {html.escape(root.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>lightning_sketch report: <code>{html.escape(str(root))}</code></h1>"
        f"<p>Generated {when} by lightning_sketch {__version__}.</p><nav>{nav}</nav>{body}</body></html>\n"
    )


def write_report(run_dir: str | Path, output: str | Path | None = None, queries: str | Path | None = None) -> Path:
    """Write :func:`build_report` to ``output`` (default ``run_dir/report.html``); returns the path."""
    text = build_report(run_dir, queries)
    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
