"""Reading stored checkpoint slices into id-aligned float64 matrices (private helpers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["StoredRows", "load_rows", "open_run"]

#: sub-folders of a GradientSketch run directory.
STORE_DIR = "store"
WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class StoredRows:
    """Stored sketches of several checkpoints, aligned by example id.

    Attributes:
        ids: ``[T]`` int64, sorted ascending: the union of the ids over the checkpoints.
        slices: ``C × [T, D]`` float64; an id missing from a checkpoint (e.g. a row skipped for
            non-finite gradients) is a zero row there, so it contributes nothing to that term.
    """

    ids: Tensor
    slices: list[Tensor]


def open_run(store: Any) -> tuple[Any, Path | None]:
    """Resolve a store object or path; returns ``(store, weights_dir or None)``.

    A path may be a store directory or a GradientSketch run directory (``store/`` + ``weights/``).
    """
    if isinstance(store, (str, Path)):
        from lightning_sketch.store import SketchStore

        path = Path(store)
        if (path / STORE_DIR).is_dir():
            weights = path / WEIGHTS_DIR
            return SketchStore.open(path / STORE_DIR), weights if weights.is_dir() else None
        weights = path.parent / WEIGHTS_DIR
        return SketchStore.open(path), weights if weights.is_dir() else None
    root = getattr(store, "path", None)
    if root is not None:
        weights = Path(root).parent / WEIGHTS_DIR
        return store, weights if weights.is_dir() else None
    return store, None


def load_rows(store: Any, checkpoints: Sequence[str]) -> StoredRows:
    """Read the slices of ``checkpoints`` and align them on the union of their ids."""
    per = []
    for name in checkpoints:
        ids = np.asarray(store.ids(name), dtype=np.int64)
        vecs = np.asarray(store.vectors(name), dtype=np.float64)
        per.append((ids, vecs))
    all_ids = np.unique(np.concatenate([i for i, _ in per])) if per else np.zeros(0, np.int64)
    slices = []
    for ids, vecs in per:
        out = np.zeros((len(all_ids), vecs.shape[1] if vecs.ndim == 2 else 0), dtype=np.float64)
        out[np.searchsorted(all_ids, ids)] = vecs
        slices.append(torch.from_numpy(out))
    return StoredRows(ids=torch.from_numpy(all_ids), slices=slices)
