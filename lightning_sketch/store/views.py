"""Read side of :class:`~lightning_sketch.store.SketchStore`: per-checkpoint and TracIn views, search.

:class:`Views` is the store's component that reads the committed rows of its
:class:`~lightning_sketch.store.snapshot.Snapshot` (each file checked per the ``verify`` mode before
any row of it is returned), caches views and FAISS indexes per generation, searches them and
builds indexes (a persisted one is published through the snapshot).

Views: a checkpoint name gives that checkpoint's rows ``[n_t, D]``; ``"tracin"`` gives, for the ids
present in every checkpoint, the concatenation along D of √w_t-scaled slices ``[n, T·D]``, so one
inner product is the TracIn-CP score Σ_t w_t ⟨Φg_t(z), Φg_t(z')⟩ (arXiv 2402.03994 Sec. 5.2;
Pruthi et al. 2020) with w_t = η_t by default (``weights="sqrt_lr"``).
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import faiss
import numpy as np
import torch

from lightning_sketch._checks import integer
from lightning_sketch.exceptions import SketchInputError, StoreCorruptError, StoreWriteError
from lightning_sketch.io import safeio as sio
from lightning_sketch.store import index as ix
from lightning_sketch.store._io import atomic_write
from lightning_sketch.store._validate import as_rows
from lightning_sketch.store.rows import GatheredConcat, RowSource, SegmentedRows
from lightning_sketch.store.snapshot import Snapshot

__all__ = ["Views", "tracin_scale"]

Weights = str | Mapping[str, float]


def tracin_scale(w: Any, what: str, hint: str = "") -> float:
    """√w_t, the scale of checkpoint t's slice in the TracIn-CP concatenation (Pruthi et al. 2020, eq. 3).

    The one place the TracIn weighting is computed: :class:`Views` (``"tracin"`` view and
    :meth:`Views.concat_queries`) use it, so the inner product of two concatenations is
    Σ_t w_t ⟨a_t, b_t⟩ with w_t = η_t by default.

    Raises:
        SketchInputError: ``w`` is None, not a number, not finite or negative (``what`` names it).

    Example:
        >>> tracin_scale(0.25, "lr")
        0.5
    """
    try:
        value = float(w) if w is not None and not isinstance(w, (bool, str)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise SketchInputError(f"{what} must be a finite learning rate >= 0, got {w!r}{hint}.")
    return math.sqrt(value)


class Views:
    """Component of :class:`~lightning_sketch.store.SketchStore`: the views of the committed rows,
    their FAISS indexes and searches, cached per generation of ``snapshot``.

    Whoever replaces the committed snapshot (commit, rollback, refresh, merge) calls :meth:`clear`.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        #: views and FAISS indexes of the current generation, keyed ``("view" | "index", view, ...)``.
        self.cache: dict[Any, Any] = {}

    def clear(self) -> None:
        """Drop every cached view and index (the committed snapshot changed)."""
        self.cache.clear()

    # ------------------------------------------------------------------ rows
    def _segments(self, checkpoint: str) -> list[dict[str, Any]]:
        if checkpoint not in self._snapshot.checkpoints:
            raise SketchInputError(
                f"Unknown or uncommitted checkpoint {checkpoint!r}; committed checkpoints: "
                f"{self._snapshot.checkpoints}."
            )
        return [s for s in self._snapshot.manifest["segments"] if s["checkpoint"] == checkpoint]

    def _view_name(self, checkpoint: str | None) -> str:
        names = self._snapshot.checkpoints
        if checkpoint is None:
            if len(names) == 1:
                return names[0]
            raise SketchInputError(
                f"`checkpoint` is required: the store has checkpoints {names}; pass one of them "
                "or 'tracin' for the learning-rate-weighted concatenation."
            )
        if checkpoint != "tracin" and checkpoint not in names:
            raise SketchInputError(
                f"Unknown checkpoint {checkpoint!r}; committed checkpoints: {names}."
            )
        return checkpoint

    def ids(self, checkpoint: str | None = None) -> np.ndarray:
        """Committed ids ``[n]`` of a view (see ``SketchStore.ids``)."""
        return self._view(self._view_name(checkpoint))[0]

    def vectors(
        self, checkpoint: str | None = None, as_torch: bool = False, weights: Weights = "sqrt_lr"
    ) -> Any:
        """Committed rows of a view as one array or tensor (see ``SketchStore.vectors``)."""
        vecs = self._view(self._view_name(checkpoint), weights)[1]
        if not isinstance(vecs, np.ndarray):
            vecs = np.asarray(vecs)
        if as_torch:
            return torch.from_numpy(np.array(vecs) if not vecs.flags.writeable else vecs)
        return vecs

    def concat_vectors(self, weights: Weights = "sqrt_lr") -> tuple[np.ndarray, np.ndarray]:
        """The TracIn view as ``(ids, rows)`` arrays (see ``SketchStore.concat_vectors``)."""
        ids, vecs, _ = self._view("tracin", weights)
        return ids, np.asarray(vecs)

    def rows(self, checkpoint: str | None = None, weights: Weights = "sqrt_lr") -> RowSource:
        """The row source of a view, never joined (see ``SketchStore.rows``)."""
        return self._view(self._view_name(checkpoint), weights)[1]

    def _scales(self, weights: Weights) -> list[float]:
        out = []
        for c in self._snapshot.manifest["checkpoints"]:
            if isinstance(weights, Mapping):
                if c["name"] not in weights:
                    raise SketchInputError(f"`weights` has no entry for checkpoint {c['name']!r}.")
                out.append(float(weights[c["name"]]))
                continue
            if weights not in ("sqrt_lr", "sqrt_weight", "uniform"):
                raise SketchInputError(
                    f"`weights` must be sqrt_lr/sqrt_weight/uniform or a mapping, got {weights!r}."
                )
            if weights == "uniform":
                w = 1.0
            elif weights == "sqrt_weight" and c["weight"] is not None:
                w = c["weight"]
            else:
                w = c["lr"]
            what = (
                f"TracIn weights={weights!r}: checkpoint {c['name']!r} (lr={c['lr']}, weight={c['weight']})"
            )
            out.append(tracin_scale(w, what, "; add_checkpoint(..., lr=...) or pass weights='uniform'"))
        return out

    def concat_queries(
        self, queries: Mapping[str, Any] | Sequence[Any], weights: Weights = "sqrt_lr"
    ) -> np.ndarray:
        """Query sketches per checkpoint as ``[Q, T·D]`` TracIn rows (see ``SketchStore.concat_queries``)."""
        names = self._snapshot.checkpoints
        parts = [queries[n] for n in names] if isinstance(queries, Mapping) else list(queries)
        if len(parts) != len(names):
            raise SketchInputError(
                f"`queries` needs one [Q, D] block per checkpoint ({len(names)}), got {len(parts)}."
            )
        blocks = [
            as_rows(p, self._snapshot.sketch_dim, f"queries[{n!r}]").astype(np.float32)
            for p, n in zip(parts, names)
        ]
        return np.ascontiguousarray(
            np.hstack([b * s for b, s in zip(blocks, self._scales(weights))]), np.float32
        )

    def _view(self, view: str, weights: Weights = "sqrt_lr") -> tuple[np.ndarray, RowSource, np.ndarray]:
        """``(ids [n] int64, rows [n, width] row source, argsort(ids))`` of a view, cached per generation.

        The rows are never joined: one segment is its memory map, several a :class:`SegmentedRows`
        over their memory maps, ``"tracin"`` a :class:`GatheredConcat` over the slices. Every segment
        file of the view is checked (per ``verify``) here, before any row of it is returned.
        """
        key = ("view", view, repr(weights) if view == "tracin" else None, self._snapshot.generation)
        if key in self.cache:
            return self.cache[key]
        vecs: RowSource
        if view == "tracin":
            if not self._snapshot.checkpoints:
                raise SketchInputError("The store has no committed checkpoints; append and commit first.")
            slices = [self._view(c) for c in self._snapshot.checkpoints]
            common = reduce(np.intersect1d, [s[0] for s in slices])
            ids = common.astype(np.int64)
            vecs = GatheredConcat(
                [v for _, v, _ in slices], [_rows(i, o, common) for i, _, o in slices], self._scales(weights)
            )
        else:
            segs, snap = self._segments(view), self._snapshot
            id_parts = [snap.load(s["ids"], s["rows"], None, "int64") for s in segs]
            vec_parts = [snap.load(s["vectors"], s["rows"], snap.sketch_dim, snap.dtype) for s in segs]
            ids = (
                np.asarray(id_parts[0])
                if len(segs) == 1
                else np.concatenate(id_parts or [np.zeros(0, np.int64)])
            )
            vecs = vec_parts[0] if len(segs) == 1 else SegmentedRows(vec_parts, snap.sketch_dim, snap.dtype)
        out = (ids, vecs, np.argsort(ids, kind="stable"))
        self.cache[key] = out
        return out

    # ------------------------------------------------------------------ search
    def _prepare(self, queries: Any, k: Any, view: str, weights: Weights) -> tuple[np.ndarray, int, tuple]:
        data = self._view(view, weights)
        n = len(data[0])
        if n == 0:
            raise SketchInputError(
                f"Store {str(self._snapshot.path)!r} has no committed rows in view {view!r}; append rows and "
                "commit() before searching."
            )
        width = data[1].shape[1]
        q = as_rows(queries, width, "queries").astype(np.float32)
        if not np.isfinite(q).all():
            raise SketchInputError("`queries` contain NaN/inf; drop or fix those query sketches.")
        integer("k", k, minimum=1, maximum=n, error=SketchInputError, hint=f"View {view!r} holds {n} rows.")
        return np.ascontiguousarray(q), int(k), data

    def search_exact(
        self, queries: Any, k: int, checkpoint: str | None = None, weights: Weights = "sqrt_lr"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by brute force (see ``SketchStore.search_exact``)."""
        view = self._view_name(checkpoint)
        q, k, (ids, vecs, _) = self._prepare(queries, k, view, weights)
        return ix.exact_topk(q, vecs, ids, k)

    def search(
        self,
        queries: Any,
        k: int,
        checkpoint: str | None = None,
        index: str = "flat",
        rerank: bool = True,
        candidates: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "cpu",
        weights: Weights = "sqrt_lr",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k through FAISS, re-ranked exactly (see ``SketchStore.search``)."""
        view = self._view_name(checkpoint)
        q, k, (ids, vecs, order) = self._prepare(queries, k, view, weights)
        if index == "flat" and device == "cpu" and not self._has_index(view, index, weights, device):
            return ix.flat_topk(q, vecs, ids, k)  # the stored rows serve as the flat index
        idx = self._index(view, index, weights, device)
        knobs = {"nprobe": nprobe, "ef_search": ef_search}
        if any(v is not None for v in knobs.values()):
            if device == "cpu":
                ix.set_search_params(idx, index, knobs)
            elif nprobe is not None:  # HNSW is CPU-only, so only nprobe applies on a GPU
                faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", int(nprobe))
        if index == "flat" or not rerank:
            return ix.search_index(idx, q, k)
        kk = min(len(ids), candidates or max(4 * k, k + 32))
        _, cand = ix.search_index(idx, q, kk)
        return ix.rerank(q, cand, lambda c: np.asarray(vecs[_rows(ids, order, c)], dtype=np.float32), k)

    def _index_key(self, view: str, kind: str, weights: Weights, device: str) -> tuple:
        tag = repr(weights) if view == "tracin" else None
        return ("index", view, kind, tag, device, self._snapshot.generation)

    def _current_entry(self, view: str, kind: str, weights: Weights) -> dict[str, Any] | None:
        """The persisted index of ``kind`` over ``view`` if it indexes the committed rows, else None."""
        entry = self._snapshot.manifest["indexes"].get(f"{view}:{kind}")
        if (
            entry
            and entry["rows"] == len(self._view(view, weights)[0])
            and entry["data_generation"] == self._data_generation(view)
            and (view != "tracin" or entry.get("weights") == repr(weights))
        ):
            return entry
        return None

    def _has_index(self, view: str, kind: str, weights: Weights, device: str) -> bool:
        """Whether a FAISS index of ``kind`` is cached on this object or persisted and current."""
        return (
            self._index_key(view, kind, weights, device) in self.cache
            or self._current_entry(view, kind, weights) is not None
        )

    def _index(self, view: str, kind: str, weights: Weights, device: str) -> faiss.Index:
        key = self._index_key(view, kind, weights, device)
        if key in self.cache:
            return self.cache[key]
        ids, vecs, _ = self._view(view, weights)
        entry = self._current_entry(view, kind, weights)
        if entry is not None:
            index = self._read_index(entry)
        else:
            index = ix.build_index(kind, vecs, ids, ix.default_params(kind, len(ids), vecs.shape[1]))
        index, res = ix.to_device(index, device)
        self.cache[key] = index
        self.cache[key + ("res",)] = res
        return index

    def _data_generation(self, view: str) -> int:
        segs = [s for s in self._snapshot.manifest["segments"] if view == "tracin" or s["checkpoint"] == view]
        return max((s["generation"] for s in segs), default=0)

    def _read_index(self, entry: dict[str, Any]) -> faiss.Index:
        self._snapshot.check_hash(entry)  # never hand FAISS a corrupted file, whatever the verify mode
        real = sio.confined(self._snapshot.path, entry["file"], what="store index")
        try:
            index = faiss.read_index(str(real))
        except RuntimeError as err:
            raise StoreCorruptError(
                f"FAISS cannot read index file {str(self._snapshot.path / entry['file'])!r}: {err}"
            ) from err
        ix.set_search_params(index, entry["kind"], entry["params"])
        return index

    def build_index(
        self,
        kind: str = "flat",
        checkpoint: str | None = None,
        weights: Weights = "sqrt_lr",
        persist: bool = True,
        **params: Any,
    ) -> dict[str, Any]:
        """Build, and unless ``persist=False`` publish, a FAISS index (see ``SketchStore.build_index``);
        with ``persist`` the caller has committed the writer's buffer first."""
        view = self._view_name(checkpoint)
        ids, vecs, _ = self._view(view, weights)
        if len(ids) == 0:
            raise SketchInputError(f"View {view!r} has no committed rows; nothing to index.")
        full = ix.default_params(kind, len(ids), vecs.shape[1], **params)
        index = ix.build_index(kind, vecs, ids, full)
        if not persist:
            tag = repr(weights) if view == "tracin" else None
            for key in [k for k in self.cache if k[:3] == ("index", view, kind)]:
                del self.cache[key]
            self.cache[("index", view, kind, tag, "cpu", self._snapshot.generation)] = index
            return {"kind": kind, "view": view, "params": full, "rows": len(ids)}
        gen = self._snapshot.generation + 1
        name = f"index-{view}-{kind}-g{gen:06d}-{secrets.token_hex(4)}.faiss"
        sha, size = atomic_write(self._snapshot.path / name, [faiss.serialize_index(index).data])
        entry = {
            "file": name, "bytes": size, "sha256": sha, "kind": kind, "view": view, "params": full,
            "rows": len(ids), "generation": gen, "data_generation": self._data_generation(view),
            "weights": repr(weights) if view == "tracin" else None,
        }
        new = copy.deepcopy(self._snapshot.manifest)
        new["indexes"][f"{view}:{kind}"] = entry
        new["generation"] = gen
        try:
            self._snapshot.publish(new, written=[name])
        except StoreWriteError:
            (self._snapshot.path / name).unlink(missing_ok=True)
            raise
        self.cache.clear()
        self.cache[("index", view, kind, entry["weights"], "cpu", gen)] = index
        return dict(entry)


def _rows(ids: np.ndarray, order: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row positions of ``wanted`` ids in ``ids`` (``order = argsort(ids)``)."""
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    rows = order[pos]
    if not np.array_equal(ids[rows], wanted):
        raise StoreCorruptError("An index returned ids that are not in the store's rows; rebuild the index.")
    return rows
