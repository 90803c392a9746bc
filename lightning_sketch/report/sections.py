"""The sections of the HTML run report (:mod:`lightning_sketch.report`) and their building blocks.

Each ``_*_section(root)`` returns the blocks of one section (paragraphs, tables, embedded PNGs) that
the report's Jinja2 template renders with autoescaping. Files are read through
:mod:`lightning_sketch.io.safeio` (confined to the run directory, regular files only, capped, checksums
verified); a damaged file is reported in its section.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import (
    LightningSketchError,
    RunMismatchError,
    StoreCorruptError,
    StoreNotFoundError,
)
from lightning_sketch.io import safeio as sio
from lightning_sketch.report import plots
from lightning_sketch.spectrum.snapshot import FORMAT, load_index, load_snapshot
from lightning_sketch.store import inspect_store
from lightning_sketch.store.manifest import load_manifest

#: at most this many query records are drawn.
_MAX_QUERIES = 6
#: at most this many training examples (proponents and opponents together) are drawn per query, whatever
#: k the query was run with; the table lists them all.
_MAX_PICTURES = 10
#: read caps (bytes): larger files are refused, never read to the end.
_CSV_CAP = 256 << 20
_QUERY_CAP = 64 << 20


# ---------------------------------------------------------------------------- blocks
def _p(text: str, cls: str | None = None, code: str | None = None, suffix: str = "") -> dict[str, Any]:
    return {"kind": "p", "text": text, "cls": cls, "code": code, "suffix": suffix}


def _absent(text: str) -> dict[str, Any]:
    return _p(text, "absent")


def _bad(text: str) -> dict[str, Any]:
    return _p(text, "bad")


def _h3(text: str, code: str | None = None, suffix: str = "") -> dict[str, Any]:
    return {"kind": "h3", "text": text, "code": code, "suffix": suffix}


class _Styled:
    """A table cell drawn with a CSS class; only section code makes these (a dict from a file is text)."""

    def __init__(self, cls: str, text: str) -> None:
        self.cls, self.text = cls, text


def _fmt(v: Any) -> Any:
    """A table cell: ``{"cls", "text"}`` for a :class:`_Styled` cell, else the value as text (a float to
    4 significant digits, ``None`` as empty); values read from files, dicts included, always become text."""
    if isinstance(v, _Styled):
        return {"cls": v.cls, "text": v.text}
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> dict[str, Any]:
    return {"kind": "table", "header": header, "rows": [[_fmt(v) for v in r] for r in rows], "left": left}


def _png(fig: Any) -> dict[str, Any]:
    """The figure as an embedded base64 PNG block."""
    return {"kind": "img", "data": base64.b64encode(plots.png_bytes(fig, dpi=90, tight=True)).decode("ascii")}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _find(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under ``root`` (no shard folders, symlinked folders not followed)."""
    import fnmatch

    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        if "shards" in rel.parts:
            dirnames[:] = []
            continue
        dirnames.sort()
        out += [Path(dirpath) / f for f in filenames if fnmatch.fnmatch(f, pattern)]
    return sorted(out)


def _read(root: Path, path: Path, cap: int, what: str) -> bytes:
    """Bytes of a run file: confined to ``root``, a regular file, at most ``cap`` bytes read."""
    real = sio.confined(root, path.relative_to(root).as_posix(), what=what)
    return sio.read_capped(real, cap, what=what)


# ---------------------------------------------------------------------------- sections
def _metrics_section(root: Path) -> list[dict[str, Any]]:
    files = _find(root, "metrics.csv")
    if not files:
        return [_absent("No Lightning CSV logger output (metrics.csv) in this run.")]
    parts: list[dict[str, Any]] = []
    for f in files[-2:]:
        try:
            text = _read(root, f, _CSV_CAP, "metrics file").decode("utf-8", errors="replace")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except (LightningSketchError, csv.Error) as err:
            parts.append(_bad(f"{_rel(f, root)} is unreadable: {err}"))
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            step = r.get("step")
            for k, v in r.items():
                if not isinstance(k, str) or k in ("step", "epoch") or not v or step in (None, ""):
                    continue
                try:
                    x, y = float(step), float(v)
                except (TypeError, ValueError):
                    continue
                series.setdefault(k, []).append((x, y))
        keys = [k for k in sorted(series) if not k.startswith("hessian/")][:8]
        if not keys:
            continue
        fig = plots.metrics_figure(series, keys)
        last = [[k, series[k][-1][0], series[k][-1][1]] for k in keys]
        parts += [_p("From ", code=_rel(f, root), suffix="."), _png(fig),
                  _table(["metric", "last step", "last value"], last)]
    return parts or [_absent("metrics.csv files hold no numeric metrics.")]


def _store_section(root: Path) -> list[dict[str, Any]]:
    stores = [p.parent for p in _find(root, "manifest.json")]
    if not stores:
        return [_absent("No sketch store (no manifest.json) in this run: the GradientSketch callback was not "
                        "used.")]
    parts: list[dict[str, Any]] = []
    for s in stores:
        try:
            info = inspect_store(s)
        except LightningSketchError as err:
            parts.append(_damaged(s / "manifest.json", root, err))
            continue
        spec = info.get("spec") or {}
        ok = info["health"]["ok"]
        bad = _Styled("bad", f"INCONSISTENT: {info['health']['error']}")
        status = _Styled("ok", "OK") if ok else bad
        summary: list[list[Any]] = [
            ["path", _rel(s, root)], ["health", status], ["rows", info["rows"]],
            ["sketch kind", spec.get("kind")], ["N (parameters)", spec.get("dim")],
            ["D (sketch_dim)", info["sketch_dim"]], ["seed", spec.get("seed")], ["dtype", info["dtype"]],
            ["size on disk (bytes)", info["size_bytes"]],
            ["bytes per row", info.get("bytes_per_row")],
            ["indexes",
             ", ".join(f"{e['kind']}({e['view']})" for e in info["indexes"]) or "none (flat search)"],
        ]
        ckpts = _table(["checkpoint", "step", "lr", "rows"],
                       [[c["name"], c.get("step"), c.get("lr"), c.get("rows")] for c in info["checkpoints"]])
        parts += [_h3(_rel(s, root)), _table(["field", "value"], summary, left=2), _p("Checkpoint slices:"),
                  ckpts]
    return parts


_QUERY_FORMAT = "lightning_sketch.query/v1"


def _load_query_file(root: Path, f: Path, explicit: bool) -> dict[str, Any] | None:
    """A query-result document, verified; None if ``f`` is another kind of JSON (directory scan)."""
    what = "`queries` file" if explicit else "query result"
    raw = sio.read_capped(f, _QUERY_CAP, what=what) if explicit else _read(root, f, _QUERY_CAP, what)
    # A damaged query result must be reported, not skipped as "some other JSON": a file is one when it
    # says so anywhere (one flipped byte cannot erase both markers) or is named like one.
    meant = (explicit or f.name.startswith("quer") or b"lightning_sketch.query/" in raw
             or b'"proponents"' in raw)
    try:
        data = sio.read_json_bytes(raw, path=f, what=what)
    except StoreCorruptError as err:
        if explicit:
            raise StoreNotFoundError(f"`queries` file {str(f)!r} is not readable JSON ({err}).") from None
        if meant:
            raise
        return None
    if not isinstance(data, dict) or data.get("format") != _QUERY_FORMAT:
        if meant:
            raise StoreCorruptError(f"{what} {str(f)!r} is not a {_QUERY_FORMAT} document (it was damaged or "
                                    "edited); write it with `lightning-sketch query --format json --output "
                                    "FILE`.")
        return None
    return sio.verify_checked(data, path=f, what=what)


def _check_queries(data: dict[str, Any]) -> None:
    """Structure of a verified query document (it may still come from a hostile writer)."""
    def num(v: Any, none: bool = True) -> bool:
        return (v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool))

    recs = data.get("queries")
    ok = isinstance(recs, list)
    for rec in recs if isinstance(recs, list) else []:
        ok = ok and isinstance(rec, dict) and num(rec.get("query"), False) and num(rec.get("label")) \
            and num(rec.get("prediction"))
        for kind in ("proponents", "opponents"):
            es = rec.get(kind) if isinstance(rec, dict) else None
            ok = ok and isinstance(es, list) and all(
                isinstance(e, dict) and num(e.get("id"), False) and num(e.get("score"), False)
                and num(e.get("label")) for e in es)
        if not ok:
            break
    if not ok:
        raise StoreCorruptError("its records lack the query/label/proponents/opponents fields of the format")


def _attribution_section(root: Path, queries: str | Path | None) -> list[dict[str, Any]]:
    files = [Path(queries)] if queries is not None else _find(root, "*.json")
    found: list[tuple[Path, dict[str, Any] | Exception]] = []
    for f in files:
        try:
            data = _load_query_file(root, f, explicit=queries is not None)
        except StoreCorruptError as err:
            if queries is not None:
                raise
            found.append((f, err))
            continue
        except LightningSketchError as err:  # a link out of the run, a FIFO, a device: refused, reported
            if queries is not None:
                raise
            if f.name.startswith(("query", "queries")):
                found.append((f, err))
            continue
        if data is not None:
            found.append((f, data))
    if not found:
        return [_absent("No attribution query results in this run (write them with "
                        "`lightning-sketch query ... --format json --output RUN_DIR/query.json`).")]
    parts: list[dict[str, Any]] = [{"kind": "sign"}]
    for f, doc in found:
        if isinstance(doc, Exception):
            parts.append(_bad(f"{_rel(f, root)} is refused: {doc}"))
            continue
        try:
            parts += _attribution_file(root, f, doc)
        except RunMismatchError as err:
            parts.append(_bad(f"{_rel(f, root)} is refused: {err}"))
        except (StoreCorruptError, KeyError, TypeError, ValueError, IndexError) as err:
            parts.append(_bad(f"{_rel(f, root)} is not a valid query result ({err}); re-run lightning-sketch "
                              "query."))
    return parts


def _finite_number(v: Any) -> float | None:
    """``v`` as a finite float, or None (bools, strings, NaN, ±inf and integers beyond float's range)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _damping_line(d: Any) -> dict[str, Any] | None:
    """One paragraph on the damping of a query result (``Attributor.damping_info``), or None.

    The document is untrusted: only finite numbers and short known strings are shown."""
    if not isinstance(d, dict) or d.get("rule") is None:
        return None

    def num(key: str, src: Any = d) -> float | None:
        return _finite_number(src.get(key) if isinstance(src, dict) else None)

    kernel = d.get("kernel") if d.get("kernel") in ("margin", "gauss-newton", "fisher", "empirical",
                                                    "gradients") else "?"
    raw = [num("lambda", x) for x in d.get("slices", []) if isinstance(x, dict)] if isinstance(
        d.get("slices"), list) else []
    lams = [v for v in raw if v is not None]
    text = f"Damping on the {kernel} kernel: "
    ratio, frac = num("ratio"), num("d_eff_fraction")
    unit = "tr(K)/T divided by its RMS residual 1 − p" if kernel == "margin" else "tr(K)/T"
    text += f"ratio {ratio:.3g} of each slice's {unit}" if ratio is not None else "an absolute λ"
    raw_taus = d.get("training_time")
    taus = ([t for t in map(_finite_number, raw_taus[:1000]) if t is not None]
            if isinstance(raw_taus, list) else [])
    if ratio is not None and taus:
        text += (f", floored by the damping a training time τ = {min(taus):.3g}–{max(taus):.3g} leaves "
                 f"(T/τ at the default ratio)")
    if lams:
        text += f", λ from {min(lams):.3g} to {max(lams):.3g} over {len(lams)} slices"
    if frac is not None:
        text += f"; the damped inverse resolves {100 * frac:.0f}% of each kernel's directions (median)"
    ov = d.get("top_k_overlap")
    lo, hi = num("lambda/sqrt10", ov), num("lambda*sqrt10", ov)
    if lo is not None and hi is not None:
        text += (f". Top-k proponents kept when λ is divided / multiplied by √10: {100 * lo:.0f}% / "
                 f"{100 * hi:.0f}%" + (" (the ranking depends on the damping; tune it with a ground truth "
                                       "if you have one)" if min(lo, hi) < 0.7 else ""))
    return _p(text + ".")


def _check_view(data: dict[str, Any]) -> dict[str, Any] | None:
    """The document's ``second_view`` block after a structure check (``None`` when absent).

    Raises:
        StoreCorruptError: the block is not a method with one record per query, in the same order.
    """
    view = data.get("second_view")
    if view is None:
        return None
    bad = StoreCorruptError("its second_view is not a method with one record of proponents/opponents per "
                            "query, in the order of the queries")
    if not isinstance(view, dict) or not isinstance(view.get("queries"), list):
        raise bad
    recs: list[Any] = view["queries"]
    ok = isinstance(view.get("method"), str) and len(recs) == len(data["queries"])
    if ok:
        try:
            _check_queries({"queries": [{"label": None, "prediction": None, **r} if isinstance(r, dict) else r
                                        for r in recs]})
        except StoreCorruptError:
            ok = False
    if not ok or [r["query"] for r in recs] != [r["query"] for r in data["queries"]]:
        raise bad
    return view


def _meaning_block(block: dict[str, Any], kernel: Any, second: bool) -> dict[str, Any]:
    """What the ranking of ``block`` (the document or its second view) means, from the library's
    table (never from the file's text): its ``method`` and the ``query_function`` it measured."""
    from lightning_sketch.attribution.meaning import MEASURES, METHOD_MEANINGS, meaning

    role = "Second view" if second else "What this ranking means"
    method, measure = block.get("method"), block.get("query_function")
    if not isinstance(method, str) or method not in METHOD_MEANINGS:
        return _p(f"{role}: no meaning is recorded for method ", code=str(method), suffix=".")
    if not isinstance(measure, str) or measure not in MEASURES:  # documents without the field
        measure = "margin" if kernel == "margin" and method in ("trak", "fisher_if") else "loss"
    m = meaning(method, measure)
    return _p(f"{role} ({m['family']}): score = {m['score']}. Proponent: {m['proponent']}. "
              f"Opponent: {m['opponent']}. Method ", code=method, suffix=".")


def _summary_block(method: Any, recs: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """Label agreement and hubs of one ranking, recomputed from the records (not read from the file)."""
    from lightning_sketch.attribution.meaning import proponent_summary

    qs = data["queries"]
    preds = [r.get("prediction") for r in qs]
    classes = all(isinstance(p, int) for p in preds)  # the CLI records predictions of classifiers only
    s = proponent_summary([[int(e["id"]) for e in r["proponents"]] for r in recs],
                          [[e["label"] for e in r["proponents"]] for r in recs] if classes else None,
                          [r.get("label") for r in qs] if classes else None, preds if classes else None)
    text = f"{method}: "
    if s["label_agreement"] is not None:
        text += (f"{100 * s['label_agreement']:.1f}% of the top proponents share the query's label "
                 f"({s['label_agreement_queries']} labelled queries")
        if s["label_agreement_correct"] is not None:
            text += (f"; {100 * s['label_agreement_correct']:.1f}% over the {s['correct_queries']} correctly "
                     "classified")
        text += "). "
    hubs = ", ".join(f"id {h['id']} in {h['queries']} queries" for h in s["hubs"])
    text += (f"Proponents of several queries (hubs): {hubs or 'none'}; {s['distinct']} distinct ids in "
             f"{s['pairs']} proponent places.")
    return _p(text)


def _check_query_runs(root: Path, data: dict[str, Any]) -> None:
    """Refuse a query result that was not answered from the store of this run as it is now.

    The result records each store's ``run_id`` and ``generation`` (field ``stores``); a store of the
    run directory whose manifest reads (a damaged one is the store section's to report) must be one
    of them, at the same generation.

    Raises:
        RunMismatchError: the result was answered from another run's store, or from an older or newer
            generation of this one (a stale result, or an older copy of the store put back).
    """
    stores = [p.parent for p in _find(root, "manifest.json")]
    manifests = []
    for s in stores:
        try:
            manifests.append((s, load_manifest(s)))
        except LightningSketchError:
            continue
    if not manifests:
        return
    recorded = data.get("stores")
    if not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded):
        raise RunMismatchError(
            "it records no run id and generation of the store it was answered from (field 'stores'), so it "
            "cannot be matched with this run's store; re-run `lightning-sketch query --format json`."
        )
    for s, m in manifests:
        same = [r for r in recorded if r.get("run_id") == m.get("run_id")]
        if not same:
            raise RunMismatchError(
                f"it was answered from the store of another run ({[r.get('run_id') for r in recorded]}), not "
                f"from {_rel(s, root)} (run {m.get('run_id')!r}); re-run `lightning-sketch query` "
                "on this run."
            )
        if all(r.get("generation") != m["generation"] for r in same):
            raise RunMismatchError(
                f"it is stale: it was answered at generation {same[0].get('generation')!r} of "
                f"{_rel(s, root)}, "
                f"which is now at generation {m['generation']}; re-run `lightning-sketch query` on this run."
            )


def _attribution_file(root: Path, f: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    _check_queries(data)
    _check_query_runs(root, data)
    view = _check_view(data)
    damping = data.get("damping")
    kernel = damping.get("kernel") if isinstance(damping, dict) else None
    parts = [_h3(f"{_rel(f, root)}: method ", code=str(data.get("method")),
                 suffix=f", {len(data['queries'])} queries, k={data.get('k')}"
                 + (f", second view {view['method']}" if view is not None else "")),
             _meaning_block(data, kernel, second=False)]
    if view is not None:
        parts.append(_meaning_block(view, kernel, second=True))
    parts.append(_summary_block(data.get("method"), data["queries"], data))
    if view is not None:
        parts.append(_summary_block(view["method"], view["queries"], data))
    damping_p = _damping_line(damping)
    if damping_p is not None:
        parts.append(damping_p)
    # with a second view each query takes two rows of pictures: half as many queries are drawn
    n_drawn = _MAX_QUERIES if view is None else _MAX_QUERIES // 2
    recs = data["queries"][:n_drawn]
    rankings = [(str(data.get("method")), recs)]
    if view is not None:
        rankings.append((view["method"], view["queries"][:n_drawn]))
    if any(r.get("image") is not None for r in recs):
        rows, omitted = [], 0
        for q, rec in enumerate(recs):
            for method, ranked in rankings:
                full = {**rec, "proponents": ranked[q]["proponents"], "opponents": ranked[q]["opponents"],
                        "view": method if view is not None else None}
                drawn = _fewer_pictures(full)
                omitted += len(full["proponents"]) + len(full["opponents"]) - len(drawn["proponents"]) - len(
                    drawn["opponents"])
                rows.append(drawn)
        parts.append(_png(plots.attribution_figure(rows)))
        if omitted:
            parts.append(_p(f"Pictures show at most {_MAX_PICTURES} training examples per query"
                            + (" and ranking" if view is not None else "")
                            + f" (the top proponents and opponents); {omitted} more are omitted from the "
                            "pictures and listed in the table below."))
        if len(data["queries"]) > n_drawn:
            parts.append(_p(f"Pictures and the table show the first {n_drawn} of {len(data['queries'])} "
                            "queries."))
    elif len(data["queries"]) > n_drawn:
        parts.append(_p(f"The table shows the first {n_drawn} of {len(data['queries'])} queries."))
    rows_t = []
    for method, ranked in rankings:
        for rec, r in zip(recs, ranked):
            for kind in ("proponents", "opponents"):
                for rank, e in enumerate(r[kind], 1):
                    rows_t.append([rec["query"], rec["label"], kind[:-1], rank, e["id"], e["label"],
                                   float(e["score"]), method])
    header = ["query", "label", "kind", "rank", "train id", "train label", "score", "method"]
    parts.append(_table(header, rows_t, left=0))
    return parts


def _fewer_pictures(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` with at most :data:`_MAX_PICTURES` proponents and opponents together: half each, the
    unused share of one side going to the other."""
    props, opps = rec["proponents"], rec["opponents"]
    n_opp = min(len(opps), max(_MAX_PICTURES // 2, _MAX_PICTURES - len(props)))
    n_prop = min(len(props), _MAX_PICTURES - n_opp)
    return {**rec, "proponents": props[:n_prop], "opponents": opps[:n_opp]}


def _damaged(f: Path, root: Path, err: Exception) -> dict[str, Any]:
    """The block saying that a section's file exists but fails its checks."""
    return _bad(f"damaged: {_rel(f, root)}: {err}")


def _spectrum_section(root: Path) -> list[dict[str, Any]]:
    dirs, parts = [], []
    for idx in _find(root, "index.json"):
        try:
            raw = _read(root, idx, sio.JSON_CAP, "spectrum index")
        except LightningSketchError as err:  # a link out of the run, a FIFO, a device, oversized
            parts.append(_damaged(idx, root, err))
            continue
        # an index.json is a spectrum index when it says so, or is named so beside step_*.npz snapshots
        meant = b"lightning_sketch.spectrum/" in raw or b'"snapshots"' in raw or any(
            idx.parent.glob("step_*.npz"))
        try:
            data = sio.read_json_bytes(raw, path=idx, what="spectrum index")
        except LightningSketchError as err:
            if meant:
                parts.append(_damaged(idx, root, err))
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            dirs.append(idx.parent)
        elif meant:
            parts.append(_damaged(idx, root, StoreCorruptError(f"format is not {FORMAT!r}")))
    if not dirs and not parts:
        return [_absent("No Hessian spectrum snapshots (index.json in the lightning_sketch.spectrum/v1 "
                        "format) in this run: the HessianSpectrum callback was not used.")]
    for d in dirs:
        try:
            entries = load_index(d)
        except LightningSketchError as err:
            parts.append(_damaged(d / "index.json", root, err))
            continue
        snaps = []
        for e in entries:
            try:
                snaps.append((e["step"], load_snapshot(d / e["file"])))
            except LightningSketchError as err:  # one bad snapshot is reported, the others still drawn
                parts.append(_bad(f"{_rel(d, root)}: snapshot at step {e['step']} is refused: {err}"))
        if not snaps:
            parts.append(_absent(f"{_rel(d, root)}: index without readable snapshots."))
            continue
        parts += _spectrum_figures(root, d, entries, snaps)
    return parts


def _spectrum_figures(
    root: Path, d: Path, entries: list[dict[str, Any]], snaps: list[tuple[int, Any]]
) -> list[Any]:
    fig = plots.spectrum_figure(snaps)
    names = sorted({n for e in entries for n, v in (e.get("scalars") or {}).items()
                    if isinstance(v, (int, float))})
    names = names[:9]
    rows = [[e["step"], *[(e.get("scalars") or {}).get(n) for n in names]] for e in entries]
    # "k of K converged": the top-K Ritz pairs whose residual met the snapshot's tolerance
    conv = [[st, f"{int(s['converged'].sum())} of {len(s['eigenvalues'])}" if "converged" in s else None,
             float(s["residuals"].max()) if "residuals" in s and len(s["residuals"]) else None,
             s["meta"].get("lanczos_matvecs"), s["meta"].get("num_matvecs")]
            for st, s in snaps]
    return [_h3(f"{_rel(d, root)}: {len(snaps)} snapshots"), _png(fig),
            _table(["step", *names], rows, left=0),
            _table(["step", "eigenpairs converged", "max residual", "Lanczos HVPs", "HVPs"], conv, left=0)]


def _intrinsic_section(root: Path) -> list[dict[str, Any]]:
    files = _find(root, "intrinsic_dimension.json")
    if not files:
        return [_absent("No intrinsic_dimension.json in this run: the IntrinsicDimension callback was not "
                        "used.")]
    parts: list[dict[str, Any]] = []
    for f in files:
        try:
            raw = _read(root, f, sio.JSON_CAP, "intrinsic-dimension state")
            what = "intrinsic-dimension state"
            data = sio.verify_checked(sio.read_json_bytes(raw, path=f, what=what), path=f, what=what)
            parts += _intrinsic_file(root, f, data)
        except LightningSketchError as err:
            parts.append(_bad(f"{_rel(f, root)} is refused: {err}"))
        except (KeyError, TypeError, ValueError) as err:
            parts.append(_bad(f"{_rel(f, root)} is not a valid intrinsic-dimension state ({err})."))
    return parts


def _intrinsic_file(root: Path, f: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    parts: list[dict[str, Any]] = []
    hist = data.get("history") or (data.get("search") or {}).get("history") or []
    pts = [h for h in hist if isinstance(h, dict) and num(h.get("metric")) and num(h.get("d")) and h["d"] > 0]
    d_star = data.get("d_star", (data.get("search") or {}).get("d_star"))
    facts = [[k, v] for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None][:16]
    parts.append(_h3(f"{_rel(f, root)}: D* = {d_star}"))
    if pts:
        target = data.get("target", (data.get("search") or {}).get("target"))
        fig = plots.intrinsic_figure(pts, target, d_star)
        parts.append(_png(fig))
        rows = [[h.get("round"), h.get("step"), h["d"], h["metric"], h.get("action")] for h in pts]
        parts.append(_table(["round", "step", "d", "metric", "action"], rows, left=0))
    else:
        parts.append(_absent("The file holds no (d, metric) history."))
    parts.append(_table(["field", "value"], facts, left=2))
    return parts


