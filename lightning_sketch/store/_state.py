"""The state every part of :class:`~lightning_sketch.store.SketchStore` shares.

``SketchStore`` is assembled from mixins, one per concern (:mod:`~lightning_sketch.store.snapshot`,
:mod:`~lightning_sketch.store.writer`, :mod:`~lightning_sketch.store.weights`,
:mod:`~lightning_sketch.store.shards`, :mod:`~lightning_sketch.store.views`). They all derive from
:class:`StoreState`, which declares the instance attributes that ``SketchStore.__init__`` sets and,
for the type checker only, the methods one mixin calls on another.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lightning_sketch.store._io import WriterLock

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = ["StoreState"]


class StoreState:
    """Instance attributes of a store (set in ``SketchStore.__init__``) and the cross-mixin methods."""

    path: Path
    mode: str
    _manifest: dict[str, Any]
    _lock: WriterLock | None
    #: "full", "lazy" or "size": when data files are checksummed (see ``SketchStore.open``).
    _verify: str
    #: data files whose sha256 was checked in this process.
    _verified: set[str]
    #: uncommitted rows per (checkpoint, rank): a list of (ids [B], rows [B, D]) parts.
    _buffer: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]]
    _pending_ckpts: list[dict[str, Any]]
    _pending_skips: dict[str, dict[str, Any]]
    _pending_weights: dict[str, dict[str, Any]]
    #: curvature records of slices (``{"matrix": entry, "sidecar": entry}``) waiting for the next commit.
    _pending_curvature: dict[str, dict[str, Any]]
    _pending_mark: bool
    #: ids per checkpoint (committed and buffered), for the duplicate check.
    _idsets: dict[str, set[int]]
    #: views and FAISS indexes of the current generation.
    _cache: dict[Any, Any]

    if TYPE_CHECKING:
        # Defined by SketchStore (store.py).
        @classmethod
        def create(
            cls,
            path: str | Path,
            spec: Any,
            layout: Any = None,
            layout_fingerprint: Any = None,
            dtype: Literal["float32", "float16"] = "float32",
            exist_ok: bool = False,
            nan_policy: Literal["raise", "skip"] = "raise",
            sketch_dim: int | None = None,
        ) -> Self: ...

        @classmethod
        def open(
            cls,
            path: str | Path,
            spec: Any = None,
            layout_fingerprint: Any = None,
            mode: Literal["r", "a"] = "r",
            verify: Literal["auto", "full", "lazy", "size"] = "auto",
        ) -> Self: ...

        def close(self) -> None: ...
        def _require_writer(self) -> None: ...
        def _check_generation(self) -> None: ...
        def _publish(self, new: dict[str, Any]) -> None: ...

        # Defined by WriterMixin (writer.py).
        def commit(self) -> int: ...
        def _idset(self, checkpoint: str) -> set[int]: ...

        # Defined by WeightsMixin (weights.py).
        def load_weights(self, name: str, layout_fingerprint: str | None = None) -> dict[str, Any]: ...

        # Defined by CurvatureMixin (curvature.py).
        def _verify_curvature(self) -> None: ...

        # Defined by StoreViews (views.py).
        def ids(self, checkpoint: str | None = None) -> np.ndarray: ...
