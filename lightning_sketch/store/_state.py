"""The state the store's remaining mixins share.

``SketchStore`` owns its committed snapshot (:class:`~lightning_sketch.store.snapshot.Snapshot`), its
views (:class:`~lightning_sketch.store.views.Views`), its writer
(:class:`~lightning_sketch.store.writer.Writer`) and its weights and curvature files, and still takes
DDP shards from a mixin (:mod:`~lightning_sketch.store.shards`). It derives from
:class:`StoreState`, which declares the instance attributes that ``SketchStore.__init__`` sets and,
for the type checker only, the methods one mixin calls on another.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning_sketch.store.snapshot import Snapshot
from lightning_sketch.store.views import Views
from lightning_sketch.store.writer import Writer

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = ["StoreState"]


class StoreState:
    """Instance attributes of a store (set in ``SketchStore.__init__``) and the cross-mixin methods."""

    #: the committed manifest, its files and the writer lock.
    _snapshot: Snapshot
    #: views, FAISS indexes and searches of the committed rows.
    _views: Views
    #: checkpoints, rows and file records not committed yet.
    _writer: Writer
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
