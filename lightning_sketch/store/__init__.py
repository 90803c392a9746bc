"""Crash-safe, FAISS-searchable storage of sketched per-example gradients.

arXiv 2402.03994 Sec. 5.2; TracIn, Pruthi et al. 2020.

``SketchStore.create`` / ``SketchStore.open`` a store directory, ``add_checkpoint`` + ``append`` +
``commit`` rows, then ``search`` (flat, ivf, ivfpq, hnsw; exact re-ranking) or ``search_exact``.
``inspect_store`` summarises a directory and checks its health. Pure numpy/torch/FAISS.
"""

from __future__ import annotations

from lightning_sketch.store._validate import finite_rows
from lightning_sketch.store.index import INDEX_KINDS, default_params, exact_topk
from lightning_sketch.store.inspect import inspect_store
from lightning_sketch.store.manifest import FORMAT_VERSION
from lightning_sketch.store.shards import shard_path
from lightning_sketch.store.store import SketchStore

__all__ = [
    "FORMAT_VERSION",
    "INDEX_KINDS",
    "SketchStore",
    "default_params",
    "exact_topk",
    "finite_rows",
    "inspect_store",
    "shard_path",
]
