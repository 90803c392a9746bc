"""The ``query`` and ``inspect`` commands of ``lightning-sketch`` (see :mod:`lightning_sketch.cli`).

``query`` rebuilds the model and data module from the run's LightningCLI config, loads the
checkpoint, and prints the top proponents and opponents of each query through
:class:`~lightning_sketch.attribution.Attributor` (as a table, CSV or JSON; the JSON also carries
pictures of image inputs for ``lightning-sketch report``). ``inspect`` prints
:func:`~lightning_sketch.store.inspect_store` and fails on an inconsistent store.

Example:
    >>> _parse_ids("3, 1,2")
    [3, 1, 2]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from lightning_sketch.exceptions import (
    CheckpointLoadError,
    LayoutMismatchError,
    SketchInputError,
    StoreNotFoundError,
)
from lightning_sketch.io.safeio import atomic_write, dump_checked_json, load_torch_file

if TYPE_CHECKING:  # the attribution package itself is imported on use (it pulls in torch and FAISS)
    from lightning_sketch.attribution.query import Method

__all__ = ["PROG", "find_stores", "format_inspect", "load_checkpoint_into", "run_inspect", "run_query"]

PROG = "lightning-sketch"


# ---------------------------------------------------------------------------- query
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,2,3, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one id, e.g. --ids 0,1,2")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dataset(datamodule: Any, split: str) -> Any:
    loader = getattr(datamodule, f"{split}_dataloader")()
    return loader.dataset


def _item_field(item: Any, key: str) -> Any:
    return item[key] if isinstance(item, dict) and key in item else None


def _images(datamodule: Any, split: str, ids: Sequence[int]) -> list[Any] | None:
    """Pictures of ``ids`` as nested lists (the datamodule's ``images(split)`` or 2-D/3-D inputs)."""
    if hasattr(datamodule, "images"):
        imgs = datamodule.images(split)
        return [np.asarray(imgs[i], dtype=float).round(4).tolist() for i in ids]
    ds = _dataset(datamodule, split)
    xs = [_item_field(ds[i], "x") for i in ids]
    if all(x is not None and np.ndim(x) in (2, 3) for x in xs):
        return [np.asarray(x, dtype=float).round(4).tolist() for x in xs]
    return None


def _query_batch(args: argparse.Namespace, model: Any, datamodule: Any) -> tuple[dict[str, Any], list[int]]:
    import torch
    from torch.utils.data import default_collate

    if args.inputs is not None:
        path = Path(args.inputs)
        if not path.is_file():
            raise SketchInputError(f"`--inputs` file {str(path)!r} does not exist; pass a .npy array of "
                                   "inputs [Q, ...].")
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                if "x" not in loaded.files:
                    raise SketchInputError(
                        f"`--inputs` {str(path)!r} is an .npz without an array 'x' (it has {loaded.files}); "
                        "save the inputs as x=[Q, ...] (and optionally labels y=[Q])."
                    )
                arr, y = loaded["x"], (loaded["y"] if "y" in loaded.files else None)
            else:
                arr, y = loaded, None
            x = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        except (ValueError, OSError, EOFError) as err:
            raise SketchInputError(
                f"`--inputs` {str(path)!r} is not a readable numeric .npy/.npz array ({err}); pass inputs "
                "[Q, ...]."
            ) from None
        try:
            with torch.no_grad():
                logits = model(x)
                pred = logits.argmax(-1)
        except (RuntimeError, ValueError, IndexError) as err:
            raise SketchInputError(
                f"`--inputs` of shape {tuple(x.shape)} do not fit the model "
                f"({str(err).splitlines()[0][:200]}); pass an array [Q, ...] shaped like one batch of the "
                "training inputs."
            ) from None
        if y is None:  # attribute the model's own prediction
            y = pred
        elif np.shape(y) != (len(x),):
            raise SketchInputError(f"`--inputs` labels y must have shape [{len(x)}], got {np.shape(y)}.")
        else:
            y = _class_labels(np.asarray(y), int(logits.shape[-1]), path)
        batch = {"x": x, "y": torch.as_tensor(np.asarray(y), dtype=torch.long), "index": torch.arange(len(x))}
        return batch, list(range(len(x)))
    datamodule.setup("test" if args.split == "test" else "fit")
    ds = _dataset(datamodule, args.split)
    n = len(ds)
    bad = [i for i in args.ids if not 0 <= i < n]
    if bad:
        raise SketchInputError(f"`--ids` {bad} are outside the {args.split} split's range [0, {n}); pick ids "
                               f"below {n}.")
    return default_collate([ds[i] for i in args.ids]), list(args.ids)


def _class_labels(y: np.ndarray, classes: int, path: Path) -> np.ndarray:
    """``--inputs`` labels as int64 class indices in ``[0, classes)``, refused rather than truncated.

    Raises:
        SketchInputError: non-numeric or non-integer labels, or labels outside ``[0, classes)``.
    """
    if y.dtype.kind not in "biuf":
        raise SketchInputError(
            f"`--inputs` {str(path)!r} labels y have dtype {y.dtype}; save integer class labels y=[Q]."
        )
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        bad = y[~(np.isfinite(y) & (y == np.round(y)))][:5].tolist()
        raise SketchInputError(
            f"`--inputs` {str(path)!r} labels y hold non-integer values {bad}; save integer class labels "
            f"in [0, {classes}) (not scores or probabilities)."
        )
    if y.size and (y.min() < 0 or y.max() >= classes):
        bad = y[(y < 0) | (y >= classes)][:5].tolist()
        raise SketchInputError(
            f"`--inputs` {str(path)!r} labels y {bad} are outside the model's classes [0, {classes}); "
            f"save labels between 0 and {classes - 1}."
        )
    return y.astype(np.int64)


def load_checkpoint_into(model: Any, path: str | Path) -> Any:
    """Load a Lightning checkpoint's ``state_dict`` into ``model`` without unpickling code; return the
    loaded checkpoint (its callback states name the run that wrote it).

    The archive's CRC-32s are checked before loading and the weights against the digest the run's
    ``GradientSketch`` recorded, so a damaged checkpoint is refused before any answer is computed.

    Raises:
        CheckpointLoadError: refused objects (a pickle payload), not a PyTorch file, a truncated or
            bit-flipped file, weights that differ from the recorded digest, or no state dict.
        LayoutMismatchError: the checkpoint is of another architecture than the configured model.
    """
    import torch

    from lightning_sketch.store.provenance import check_checkpoint_digest

    ckpt = load_torch_file(path, what="`--ckpt` checkpoint")
    if isinstance(ckpt, dict):
        check_checkpoint_digest(ckpt, path=path, what="`--ckpt` checkpoint")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not state or not tensors:
        raise CheckpointLoadError(
            f"`--ckpt` {str(path)!r} holds no state_dict of tensors; pass the Lightning checkpoint (.ckpt) "
            "of the run."
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise LayoutMismatchError(
            f"`--ckpt` {str(path)!r} does not fit the model built from `--config` "
            f"({str(err).splitlines()[0][:300]}); pass the checkpoint written by the run with this config."
        ) from None
    return ckpt


def _what_is(path: str | os.PathLike[str]) -> str:
    """What is at ``path`` when it is not a regular file, for messages ("does not exist", "is a FIFO")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.lexists(path) else "is a broken symlink"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


def _load_model(build_from_config: Callable[[Sequence[str]], tuple[Any, Any]], config: Any, ckpt_path: str):
    if not Path(ckpt_path).is_file():
        raise SketchInputError(f"`--ckpt` {ckpt_path!r} {_what_is(ckpt_path)}; pass the Lightning checkpoint "
                               "(a regular .ckpt file) of the run.")
    model, datamodule = build_from_config(config)
    ckpt = load_checkpoint_into(model, ckpt_path)
    model.eval()
    return model, datamodule, ckpt


def _check_runs(manifests: list[dict[str, Any]], stores: list[str], ckpts: list[str],
                loaded: list[Any]) -> list[dict[str, Any]]:
    """Each store's ``run_id`` and ``generation``, after checking it against the checkpoint given for it.

    ``manifests`` are those of the stores the answers come from (the Attributor's). A store older than
    the generation its checkpoint committed, or of another run than the checkpoint recorded, is
    refused. One ``--ckpt`` for several stores only gives the architecture, so it is compared with none.

    Raises:
        RunMismatchError: a store of another run, or an older copy of the store.
    """
    from lightning_sketch.store.provenance import check_checkpoint_store

    if len(ckpts) == len(stores):
        for manifest, st, ckpt, (_, _, checkpoint) in zip(manifests, stores, ckpts, loaded):
            check_checkpoint_store(checkpoint, manifest, store=st, ckpt=ckpt)
    return [{"run_id": m.get("run_id"), "generation": m["generation"]} for m in manifests]


def _predictions(model: Any, batch: Any) -> list[int] | None:
    """The model's predicted classes when it is a classifier over ``batch["x"]`` (else ``None``)."""
    import torch

    try:
        with torch.no_grad():
            logits = getattr(model, "per_example_logits", None)
            out = logits(batch) if logits is not None else model(batch["x"])
    except Exception:  # not a {"x": ...} classifier: the table shows no prediction
        return None
    return out.argmax(-1).tolist() if isinstance(out, torch.Tensor) and out.ndim == 2 else None


def _scalar_label(batch: Any, q: int) -> int | None:
    y = batch.get("y") if isinstance(batch, dict) else None
    return int(y[q]) if y is not None and getattr(y, "ndim", 0) == 1 else None


def run_query(args: argparse.Namespace, build_from_config: Callable[[Sequence[str]], tuple[Any, Any]]) -> int:
    """The ``query`` command on parsed arguments; returns the exit status.

    ``build_from_config(configs) -> (model, datamodule)`` is passed in by :mod:`lightning_sketch.cli`
    (its LightningCLI builder), so that this module does not import the CLI that imports it. Several
    ``--store`` make an ensemble (scores averaged over runs); ``--ckpt`` is given once (the
    architecture; multi-slice methods load each run's saved slice weights) or once per store.
    """
    # Imported on use: torch and FAISS cost seconds, which `--help` and `inspect` should not pay.
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.attribution.meaning import default_second_view, meaning, proponent_summary

    stores = list(args.store) if isinstance(args.store, (list, tuple)) else [args.store]
    ckpts = list(args.ckpt) if isinstance(args.ckpt, (list, tuple)) else [args.ckpt]
    for st in stores:
        if not Path(st).exists():
            raise StoreNotFoundError(
                f"No sketch store at {st!r}: `--store` must be a store or run directory."
            )
    if len(ckpts) not in (1, len(stores)):
        raise SketchInputError(f"Give one --ckpt, or one per --store: got {len(ckpts)} for {len(stores)} "
                               "stores.")
    loaded = [_load_model(build_from_config, args.config, c) for c in ckpts]
    model, datamodule, _ = loaded[0]
    models = [m for m, _, _ in loaded]
    batch, qids = _query_batch(args, model, datamodule)
    # argparse's `choices` restricts --method to ("auto", *METHODS)
    method = cast("Method", getattr(args, "method", "auto"))
    extra: dict[str, Any] = {}
    if method == "arnoldi_if":
        if getattr(args, "snapshot", None):
            extra["snapshot"] = args.snapshot
        else:
            from torch.utils.data import default_collate

            train = _dataset(datamodule, "train")
            n = min(int(getattr(args, "probe", 256)), len(train))
            extra["hessian_batches"] = [default_collate([train[i] for i in range(n)])]
    attributor = Attributor(
        stores if len(stores) > 1 else stores[0], models if len(models) > 1 else model, method=method,
        damping=getattr(args, "damping", None), damping_ratio=getattr(args, "damping_ratio", None), **extra,
    )
    # the stores answered from, checked against their checkpoints before any answer is computed
    runs = _check_runs([r.store.manifest for r in attributor.runs], stores, ckpts, loaded)
    k = min(args.k, len(attributor.ids))
    # the query gradients are taken once for both rankings, the damping's sensitivity and a view that
    # measures the same function
    qs = attributor.all_query_sketches(batch)
    preds = _predictions(model, batch)
    train_ds = _dataset(datamodule, "train") if datamodule is not None else None
    with_images = args.inputs is None and datamodule is not None

    def entries(ids: Any, scores: Any) -> list[dict[str, Any]]:
        rows = []
        for i, s in zip(ids.tolist(), scores.tolist()):
            y = _item_field(train_ds[i], "y") if train_ds is not None else None
            label = None if y is None or np.ndim(y) != 0 else int(y)
            rows.append({"id": int(i), "score": float(s), "label": label})
        return rows

    def ranking(att: Any, sketches: Any) -> list[dict[str, Any]]:
        """Per query: its top-k proponents and opponents under ``att`` (with pictures of image inputs)."""
        (pro_ids, pro_scores), (opp_ids, opp_scores) = att.proponents_opponents(None, k=k, sketches=sketches)
        out = []
        for q in range(len(qids)):
            rec = {"proponents": entries(pro_ids[q], pro_scores[q]),
                   "opponents": entries(opp_ids[q], opp_scores[q])}
            if with_images:
                for kind in ("proponents", "opponents"):
                    pics = _images(datamodule, "train", [e["id"] for e in rec[kind]])
                    for e, pic in zip(rec[kind], pics or [None] * len(rec[kind])):
                        e["image"] = pic
            out.append(rec)
        return out

    query_labels = [_scalar_label(batch, q) for q in range(len(qids))]

    def summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
        """Label agreement of the proponents (classifiers: the model predicts classes) and the hubs."""
        labels = [[e["label"] for e in r["proponents"]] for r in recs] if preds is not None else None
        return proponent_summary([[e["id"] for e in r["proponents"]] for r in recs], labels,
                                 query_labels if preds is not None else None, preds)

    records = []
    for q, (qid, ranked) in enumerate(zip(qids, ranking(attributor, qs))):
        rec: dict[str, Any] = {"query": qid, "label": query_labels[q],
                               "prediction": None if preds is None else int(preds[q]), **ranked}
        if with_images:
            rec["image"] = (_images(datamodule, args.split, [qid]) or [None])[0]
        records.append(rec)
    damping = attributor.damping_info(None, k=k, sketches=qs)
    also = getattr(args, "also", "auto")
    view_method = {"auto": default_second_view(attributor.method), "none": None}.get(also, also)
    second = None
    if view_method is not None and view_method != attributor.method:
        view = attributor.view(cast("Method", view_method))
        # the view's own query gradients only where it measures another function (margin vs loss)
        shared = view.shares_queries(attributor)
        view_recs = ranking(view, qs if shared else view.all_query_sketches(batch))
        second = {"method": view.method, "meaning": meaning(view.method, view.query_function),
                  "query_function": view.query_function, "shares_query_sketches": shared,
                  "summary": summary(view_recs),
                  "queries": [{"query": qid, **r} for qid, r in zip(qids, view_recs)]}
    result = {
        "format": "lightning_sketch.query/v1", "method": attributor.method,
        "meaning": meaning(attributor.method, attributor.query_function),
        "query_function": attributor.query_function,
        "summary": summary(records),
        "split": args.split if args.inputs is None else "inputs",
        "store": str(stores[0]) if len(stores) == 1 else [str(s) for s in stores],
        "ckpt": str(ckpts[0]) if len(ckpts) == 1 else [str(c) for c in ckpts], "k": k, "queries": records,
        # the run id and generation of each store answered from: `report` refuses this result beside a
        # store of another run or generation
        "stores": runs,
        # how the damping was set and how much the top k depends on it (Attributor.damping_info)
        "damping": damping,
        # the same queries ranked by a second method (`--also`); `shares_query_sketches` says whether its
        # query gradients were the default's (same query function) or its own
        "second_view": second,
    }
    text = {"json": _as_json, "csv": _as_csv, "table": _as_table}[args.format](result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.output, [text.encode()], what="query result")
        print(f"wrote {len(records)} queries to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _as_json(result: dict[str, Any]) -> str:
    return dump_checked_json(result).decode()  # carries its own sha256: `report` detects edits


def _as_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "query_label", "kind", "rank", "train_id", "train_label", "score", "method"])
    second = result.get("second_view") or None
    for q, rec in enumerate(result["queries"]):
        views = [(result["method"], rec)] + ([(second["method"], second["queries"][q])] if second else [])
        for method, view in views:
            for kind in ("proponents", "opponents"):
                for rank, e in enumerate(view[kind], 1):
                    w.writerow([rec["query"], rec["label"], kind[:-1], rank, e["id"], e["label"],
                                f"{e['score']:.6g}", method])
    return buf.getvalue()


def _meaning_lines(m: dict[str, Any] | None, indent: str = "  ") -> list[str]:
    if not m:
        return []
    return [f"{indent}score: {m['score']}", f"{indent}proponent: {m['proponent']}",
            f"{indent}opponent: {m['opponent']}"]


def _summary_line(method: str, s: dict[str, Any] | None) -> str:
    """One footer line: how often proponents share the query's label, and the hubs."""
    if not s:
        return f"{method}: no summary"
    parts = []
    if s.get("label_agreement") is not None:
        n, c = s["label_agreement_queries"], s["correct_queries"]
        text = (f"{s['label_agreement']:.1%} of top-k proponents share the query's label "
                f"({n} {'query' if n == 1 else 'queries'}")
        if s.get("label_agreement_correct") is not None:
            text += f"; {s['label_agreement_correct']:.1%} over the {c} correctly classified"
        parts.append(text + ")")
    hubs = ", ".join(f"id {h['id']} ×{h['queries']}" for h in s.get("hubs") or [])
    parts.append(f"hubs (proponents of several queries): {hubs or 'none'}; {s['distinct']} distinct ids in "
                 f"{s['pairs']} proponent slots")
    return f"{method}: " + "; ".join(parts)


def _as_table(result: dict[str, Any]) -> str:
    d = result.get("damping") or {}
    # trak/fisher_if on classifiers measure the query's margin; the other methods its loss
    measure = (result.get("meaning") or {}).get("measure") or (
        "margin" if d.get("kernel") == "margin" else "loss")
    sign = {"margin": "raises the query's margin", "loss": "lowers the query's loss"}.get(
        measure, "lowers the query's query_loss_fn")
    second: dict[str, Any] = result.get("second_view") or {}
    lines = [f"method: {result['method']}  (score > 0: training on the example {sign})"]
    lines += _meaning_lines(result.get("meaning"))
    if second:
        lines.append(f"second view: {second['method']}  (right-hand columns)")
        lines += _meaning_lines(second.get("meaning"))
    elif (result.get("meaning") or {}).get("family") == "counterfactual":
        lines.append("  for look-alike training examples (the similarity view) add --also grad_cos")
    if d.get("rule") is not None:
        ov = d.get("top_k_overlap") or {}
        lams = [x["lambda"] for x in d.get("slices", [])]
        lo, hi = ov.get("lambda/sqrt10", float("nan")), ov.get("lambda*sqrt10", float("nan"))
        unit = "tr(K)/T/r (r: RMS residual)" if d["kernel"] == "margin" else "tr(K)/T"
        taus = [t for t in d.get("training_time") or [] if isinstance(t, (int, float))]
        floor = f" (floored at T/(ρ₀τ), training time τ {min(taus):.3g}–{max(taus):.3g})" if taus else ""
        lines.append(f"damping: {d['kernel']} kernel, ratio {d['ratio']:.3g} of {unit}{floor}, "
                     f"λ {min(lams):.3g}–{max(lams):.3g}; top-k kept at λ/√10, λ·√10: {lo:.0%}, {hi:.0%}"
                     if d.get("ratio") is not None and lams else f"damping: {d.get('damping')}")
    views = second["queries"] if second else [None] * len(result["queries"])
    for rec, other in zip(result["queries"], views):
        lines.append(f"\nquery {rec['query']} ({result['split']})  label={rec['label']}  "
                     f"prediction={rec['prediction']}")
        head = f"  {'kind':<10} {'rank':>4} {'train_id':>8} {'label':>5} {'score':>12}"
        if other is not None:
            head += f"  | {str(second.get('method')) + ' id':>12} {'label':>5} {'score':>12}"
        lines.append(head)
        for kind in ("proponents", "opponents"):
            for rank, e in enumerate(rec[kind], 1):
                row = f"  {kind[:-1]:<10} {rank:>4} {e['id']:>8} {str(e['label']):>5} {e['score']:>12.5g}"
                if other is not None and rank <= len(other[kind]):
                    o = other[kind][rank - 1]
                    row += f"  | {o['id']:>12} {str(o['label']):>5} {o['score']:>12.5g}"
                lines.append(row)
    summaries = [(result["method"], result.get("summary"))]
    if second:
        summaries.append((second["method"], second.get("summary")))
    if any(s for _, s in summaries):
        lines.append("")
        lines += [_summary_line(m, s) for m, s in summaries]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- inspect
def find_stores(path: str | Path) -> list[Path]:
    """Store directories at ``path``: itself if it holds ``manifest.json``, else those below (no shards)."""
    path = Path(path)
    if (path / "manifest.json").is_file() or not path.is_dir():
        return [path]
    found = sorted(p.parent for p in path.rglob("manifest.json") if "shards" not in p.relative_to(path).parts)
    return found or [path]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable summary of an :func:`~lightning_sketch.store.inspect_store` dict."""
    spec = info.get("spec") or {}
    health = info["health"]
    bpr = info.get("bytes_per_row")
    lines = [
        f"store:        {info['path']}",
        f"health:       {'OK' if health['ok'] else 'INCONSISTENT'} (checksums: {health['checksums']})"
        + ("" if health["ok"] else f"\n  error:      {health['error']}"),
        f"rows:         {info['rows']}",
        f"sketch:       kind={spec.get('kind')} dim(N)={spec.get('dim')} sketch_dim(D)={info['sketch_dim']} "
        f"seed={spec.get('seed')} dtype={info['dtype']}",
        f"size on disk: {_human_bytes(info['size_bytes'])}" + (f" ({bpr:.0f} B per row)" if bpr else ""),
        f"format:       v{info['format_version']} (library {info.get('library_version')}), generation "
        f"{info['generation']}, {info['segments']} segments, layout "
        f"{str(info.get('layout_fingerprint'))[:12]}",
        f"checkpoints:  {len(info['checkpoints'])}",
    ]
    for c in info["checkpoints"]:
        lines.append(f"  - {c['name']}: step={c.get('step')} lr={c.get('lr')} rows={c.get('rows')}")
    idx = info.get("indexes") or []
    names = [f"{e['kind']} on {e['view']} ({e['rows']} rows{'' if e['current'] else ', stale'})" for e in idx]
    lines.append("indexes:      " + (", ".join(names) or "none (flat search)"))
    return "\n".join(lines) + "\n"


def run_inspect(args: argparse.Namespace) -> int:
    """The ``inspect`` command on parsed arguments; returns 1 if a store is inconsistent."""
    # Imported on use: the store pulls in FAISS, which `--help` and `query --help` should not pay.
    from lightning_sketch.store import inspect_store

    infos = [inspect_store(p, verify=not args.no_verify) for p in find_stores(args.dir)]
    if args.json:
        sys.stdout.write(json.dumps(infos[0] if len(infos) == 1 else infos, indent=1, default=str) + "\n")
    else:
        sys.stdout.write("\n".join(format_inspect(i) for i in infos))
    bad = [i for i in infos if not i["health"]["ok"]]
    for i in bad:
        print(f"{PROG} inspect: error: store at {i['path']} is inconsistent: {i['health']['error']}",
              file=sys.stderr)
    return 1 if bad else 0
