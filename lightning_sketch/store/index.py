"""FAISS indexes over stored sketches, exact re-ranking, and the exact torch reference search.

Scores are inner products ⟨Φg(z_query), Φg(z_train)⟩, the sketched TracIn / gradient-similarity
score of arXiv 2402.03994 Sec. 5.2 (no normalisation: FAISS has no cosine metric and attribution needs the raw
product). Index kinds (Johnson, Douze & Jégou 2019; the FAISS wiki):

| kind    | FAISS index                                   | exact? | bytes / row        |
|---------|-----------------------------------------------|--------|--------------------|
| flat    | ``IndexIDMap2(IndexFlatIP)``                  | yes    | 4·D + id           |
| ivf     | ``IndexIVFFlat`` (inner product, native ids)  | no     | 4·D + id           |
| ivfpq   | ``IndexIVFPQ`` + exact re-rank from the store | no     | m + id (+ store)   |
| hnsw    | ``IndexIDMap2(IndexHNSWFlat)``                | no     | 4·D + graph + id   |

Approximate results are re-ranked exactly against the stored vectors (the "refine" stage), so
returned scores are always true inner products. FAISS is always handed C-contiguous float32.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import torch

from lightning_sketch.exceptions import SketchConfigError, SketchInputError

__all__ = [
    "INDEX_KINDS",
    "build_index",
    "default_params",
    "exact_topk",
    "flat_topk",
    "rerank",
    "search_index",
    "to_device",
]

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")

_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe", "max_train", "seed"),
    "ivfpq": ("nlist", "nprobe", "m", "nbits", "max_train", "seed"),
    "hnsw": ("M", "ef_construction", "ef_search"),
}


def _f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def default_params(kind: str, n: int, d: int, **overrides: Any) -> dict[str, Any]:
    """Index parameters for ``n`` rows of dimension ``d``, with ``overrides`` applied.

    IVF: ``nlist ≈ 2√n`` lists capped so each has ≥ 39 training points, ``nprobe = 32`` (at most
    ``nlist``): at 10^6 sketches of real gradients this gave recall@10 0.963 at 11.6 ms per query on
    2 cores (``benchmarks/scale.py``); IVF-PQ: ``m`` = the largest divisor of ``d`` up to ``d/16``
    sub-quantisers of ``nbits ≤ 8`` (fewer bits when ``n`` is small); HNSW: ``M = 32``, ``efSearch = 128``.

    Raises:
        SketchConfigError: unknown kind or parameter name.

    Example:
        >>> default_params("ivf", 100_000, 1024)["nlist"], default_params("ivf", 100_000, 1024)["nprobe"]
        (632, 32)
    """
    if kind not in INDEX_KINDS:
        raise SketchConfigError(f"`index` must be one of {INDEX_KINDS}, got {kind!r}.")
    unknown = sorted(set(overrides) - set(_PARAMS[kind]))
    if unknown:
        raise SketchConfigError(
            f"Unknown parameter(s) {unknown} for index {kind!r}; known: {list(_PARAMS[kind]) or 'none'}."
        )
    params: dict[str, Any] = {}
    if kind in ("ivf", "ivfpq"):
        nlist = max(1, min(int(2 * math.sqrt(n)), n // 39))
        params.update(nlist=nlist, nprobe=32, max_train=max(100_000, 64 * nlist), seed=0)
    if kind == "ivfpq":
        params["m"] = max(m for m in range(1, max(1, d // 16) + 1) if d % m == 0)
        params["nbits"] = int(min(8, max(1, math.floor(math.log2(max(2, n // 39))))))
    if kind == "hnsw":
        params.update(M=32, ef_construction=80, ef_search=128)
    params.update(overrides)
    if kind in ("ivf", "ivfpq"):
        params["nprobe"] = min(int(params["nprobe"]), int(params["nlist"]))
    return params


#: stores at least this large show a progress display while their index is built.
PROGRESS_MIN_ROWS = 100_000


@contextlib.contextmanager
def _stages(kind: str, n: int, show: bool) -> Iterator[Callable[[str], None]]:
    """A transient tqdm progress bar over the build stages (k-means training, adding rows).

    FAISS trains and adds in single native calls with no progress hook, so the bar advances per
    stage (with elapsed time) rather than per row; it is drawn only when ``show``. tqdm is the
    library's one progress-bar package (a dependency of Lightning, whose own bar uses it).
    """
    if not show:
        yield lambda stage: None
        return
    from tqdm.auto import tqdm  # on use: only large builds draw a bar

    stages = 2 if kind in ("ivf", "ivfpq") else 1
    with tqdm(total=stages, desc=f"building {kind} index over {n:,} rows", unit="stage", leave=False) as bar:

        def advance(stage: str) -> None:
            bar.set_description(f"building {kind} index over {n:,} rows: {stage} done", refresh=False)
            bar.update(1)

        yield advance


def build_index(
    kind: str, vectors: Any, ids: np.ndarray, params: dict[str, Any], progress: bool | None = None
) -> faiss.Index:
    """Build a FAISS inner-product index of ``kind`` over ``vectors`` [n, D] with external ``ids`` [n].

    Flat and IVF indexes add the rows in blocks (the index holds the one float32 copy); HNSW adds
    them in one call (a float32 copy beside the index while it is built).

    Args:
        kind: one of :data:`INDEX_KINDS`.
        vectors: ``[n, D]`` array or row source (:mod:`lightning_sketch.store.rows`), any float dtype.
        ids: ``[n]`` int64 example ids.
        params: from :func:`default_params`.
        progress: show a progress display; ``None`` shows it for ``n >= PROGRESS_MIN_ROWS``.

    Raises:
        SketchInputError: too few rows to train the requested IVF/PQ index.
    """
    if not hasattr(vectors, "shape"):
        vectors = _f32(vectors)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, d = int(vectors.shape[0]), int(vectors.shape[1])
    if kind == "flat":
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["ef_construction"])
        index = faiss.IndexIDMap2(inner)
    else:
        nlist = int(params["nlist"])
        if nlist > n:
            raise SketchInputError(f"index {kind!r} needs nlist ({nlist}) <= rows ({n}); lower `nlist`.")
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m, nbits = int(params["m"]), int(params["nbits"])
            if d % m:
                raise SketchInputError(f"ivfpq needs `m` ({m}) to divide D ({d}); pick a divisor of {d}.")
            if n < (1 << nbits):
                raise SketchInputError(f"ivfpq with nbits={nbits} needs >= {1 << nbits} rows, got {n}.")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(params.get("seed", 0))
        rng = np.random.default_rng(int(params.get("seed", 0)))
        take = min(n, int(params["max_train"]))
        sample = vectors[0:n] if take == n else vectors[np.sort(rng.choice(n, size=take, replace=False))]
    with _stages(kind, n, n >= PROGRESS_MIN_ROWS if progress is None else progress) as done:
        if kind in ("ivf", "ivfpq"):
            index.train(_f32(sample))
            del sample
            done("training")
        if kind == "hnsw":
            index.add_with_ids(_f32(vectors[0:n]), ids)
        else:
            for s in range(0, n, _ADD_ROWS):
                index.add_with_ids(_f32(vectors[s : s + _ADD_ROWS]), ids[s : s + _ADD_ROWS])
        done("adding")
    set_search_params(index, kind, params)
    return index


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Apply ``nprobe`` (IVF kinds) or ``ef_search`` (HNSW) to a built or loaded CPU index."""
    space = faiss.ParameterSpace()
    if kind in ("ivf", "ivfpq") and params.get("nprobe") is not None:
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw" and params.get("ef_search") is not None:
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))


def to_device(index: faiss.Index, device: str) -> tuple[faiss.Index, Any]:
    """Move ``index`` to ``device`` ("cpu" or "cuda[:i]"); returns ``(index, gpu_resources)``.

    Raises:
        SketchConfigError: a CUDA device was asked for but FAISS has no GPU support installed.
    """
    if device == "cpu":
        return index, None
    if not str(device).startswith("cuda"):
        raise SketchConfigError(f"`device` must be 'cpu' or 'cuda[:i]', got {device!r}.")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise SketchConfigError(
            f"`device={device!r}` needs GPU FAISS and a visible GPU, but the installed faiss "
            f"({faiss.__version__}) reports {getattr(faiss, 'get_num_gpus', lambda: 0)()} GPUs. Install the "
            f"`gpu` extra (faiss-gpu) on a CUDA machine, or search with device='cpu'."
        )
    res = faiss.StandardGpuResources()
    ordinal = int(str(device).split(":")[1]) if ":" in str(device) else 0
    return faiss.index_cpu_to_gpu(res, ordinal, index), res


def search_index(index: faiss.Index, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw FAISS search: ``(scores [Q, k] float32, ids [Q, k] int64)``; missing hits have id -1.

    Raises:
        SketchInputError: a query holds NaN/inf (FAISS would return id -1 for it, not an answer).
    """
    q = _f32(queries)
    if not np.isfinite(q).all():
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
        raise SketchInputError(
            f"Query rows {bad[:5].tolist()} contain NaN/inf (e.g. a non-finite loss or input), so no "
            "neighbour can be ranked; fix or drop those queries."
        )
    return index.search(q, int(k))


def rerank(
    queries: Any,
    candidates: np.ndarray,
    fetch: Callable[[np.ndarray], np.ndarray],
    k: int,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking of approximate candidates against stored vectors.

    Args:
        queries: ``[Q, D]``.
        candidates: ``[Q, k']`` int64 ids from an approximate index (``-1`` = no hit).
        fetch: maps an int64 id array ``[M]`` to the stored vectors ``[M, D]``.
        k: results to keep (``k <= k'``).
        chunk: queries per block (bounds the ``[chunk, k', D]`` gather).

    Returns:
        ``(scores [Q, k] float32, ids [Q, k] int64)`` sorted by decreasing exact inner product
        (float64 accumulation); slots without a candidate hold score ``-inf`` and id ``-1``.
    """
    q = _f32(queries)
    out_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for start in range(0, q.shape[0], chunk):
        cand = candidates[start : start + chunk]
        valid = cand >= 0
        flat_ids = np.where(valid, cand, cand[valid][0] if valid.any() else 0).reshape(-1)
        if not valid.any():
            continue
        vecs = np.asarray(fetch(flat_ids), dtype=np.float64).reshape(*cand.shape, -1)
        scores = np.einsum("qkd,qd->qk", vecs, q[start : start + chunk].astype(np.float64))
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_s[start : start + chunk] = np.take_along_axis(scores, order, 1)
        out_i[start : start + chunk] = np.where(
            np.isfinite(np.take_along_axis(scores, order, 1)), np.take_along_axis(cand, order, 1), -1
        )
    return out_s, out_i


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``a`` as a ``dtype`` tensor: a zero-copy view of a C-contiguous array of that dtype (read
    here only, so a read-only memory map is fine), else a converted copy."""
    if a.flags.c_contiguous and a.dtype == torch.empty(0, dtype=dtype).numpy().dtype:
        with warnings.catch_warnings():  # torch warns that a read-only array is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.tensor(a, dtype=dtype)


#: largest query-chunk × row-block score matrix :func:`exact_topk` holds (elements).
_SCORE_ELEMS = 1 << 24

#: bytes of float32 rows per block that :func:`exact_topk` reads at a time (16,384 rows at D = 256).
BLOCK_BYTES = 1 << 24

#: rows per ``add`` call when a flat or IVF index is built from a row source.
_ADD_ROWS = 65_536


def flat_topk(queries: Any, vectors: Any, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products over rows read in blocks: the flat index without a copy of the rows.

    Each block of :data:`BLOCK_BYTES` of rows is searched with ``faiss.knn`` (the kernel of
    ``IndexFlatIP``; a C-contiguous float32 block, such as a range of a float32 memory map, is not
    copied) and merged into the running top k; equal scores keep storage order.

    Args:
        queries: ``[Q, D]``.
        vectors: ``[n, D]`` rows (array, memory map or row source).
        ids: ``[n]`` int64 ids of the rows.
        k: results per query (``1 <= k <= n``).

    Returns:
        ``(scores [Q, k] float32, ids [Q, k] int64)`` sorted by decreasing score.
    """
    q = _f32(queries)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    chunk = max(1, BLOCK_BYTES // (4 * max(1, int(vectors.shape[1]))))
    best_s = np.zeros((q.shape[0], 0), np.float32)
    best_i = np.zeros((q.shape[0], 0), np.int64)
    for start in range(0, n, chunk):
        block = _f32(vectors[start : start + chunk])
        s, pos = faiss.knn(q, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        s = np.concatenate([best_s, s], axis=1)
        i = np.concatenate([best_i, ids[start + pos]], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def exact_topk(
    queries: Any,
    vectors: Any,
    ids: np.ndarray,
    k: int,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products with :func:`torch.topk`: the exact reference search.

    Args:
        queries: ``[Q, D]``.
        vectors: ``[n, D]`` stored vectors (numpy, memmap, row source or tensor), read in blocks of
            ``chunk`` rows (default: :data:`BLOCK_BYTES` of float32); queries are scored in chunks
            so that a score block holds at most 2^24 entries.
        ids: ``[n]`` int64 ids of the rows.
        k: results per query (``k <= n``).
        dtype: accumulation dtype (float64 by default, the exact reference).

    Returns:
        ``(scores [Q, k], ids [Q, k])`` sorted by decreasing score (numpy; scores in ``dtype``).

    Example:
        >>> v = np.eye(3, dtype=np.float32); q = np.array([[0.0, 2.0, 1.0]], dtype=np.float32)
        >>> s, i = exact_topk(q, v, np.array([10, 11, 12]), 2)
        >>> i.tolist(), s.tolist()
        ([[11, 12]], [[2.0, 1.0]])
    """
    q = torch.as_tensor(
        queries.detach().cpu() if isinstance(queries, torch.Tensor) else np.asarray(queries), dtype=dtype
    )
    ids_t = torch.from_numpy(np.array(ids, dtype=np.int64))
    Q, n = q.shape[0], len(ids_t)
    if chunk is None:
        chunk = max(1, BLOCK_BYTES // (4 * max(1, int(vectors.shape[1]))))
    qstep = max(1, _SCORE_ELEMS // chunk)  # query chunks bound the [Q_chunk, chunk] score block
    parts = [slice(s, min(Q, s + qstep)) for s in range(0, Q, qstep)]
    best = [(torch.zeros((p.stop - p.start, 0), dtype=dtype), ids_t[:0].expand(p.stop - p.start, 0))
            for p in parts]
    for start in range(0, n, chunk):
        part = vectors[start : start + chunk]  # one block of rows: a row source copies only these
        block = part.to(dtype) if isinstance(part, torch.Tensor) else _as_tensor(np.asarray(part), dtype)
        block_ids = ids_t[start : start + chunk]
        for j, p in enumerate(parts):
            top_s, top_pos = torch.topk(torch.mm(block, q[p].T), min(k, block.shape[0]), dim=0)
            top_s, top_pos = top_s.T, top_pos.T  # [Q_chunk, k]: the block's own top k
            s = torch.cat([best[j][0], top_s], dim=1)
            i = torch.cat([best[j][1], block_ids[top_pos]], dim=1)
            best_s, pos = torch.topk(s, min(k, s.shape[1]), dim=1)
            best[j] = (best_s, torch.gather(i, 1, pos))
    if not parts:  # no queries
        empty = torch.zeros((0, min(k, n)), dtype=dtype)
        return empty.numpy(), empty.to(torch.int64).numpy()
    return torch.cat([b[0] for b in best]).numpy(), torch.cat([b[1] for b in best]).numpy()
