"""The crash-safe sketch store: append sketched gradients per checkpoint, commit, reopen, search.

A store is a directory (see :mod:`lightning_sketch.store.manifest`) of immutable segment files
plus ``manifest.json``. :meth:`SketchStore.append` buffers rows in memory; :meth:`SketchStore.commit`
writes the buffered rows as new segment files (tmp + fsync + rename) and then atomically replaces
the manifest. Readers open one manifest snapshot and only ever see committed segments; a crash
loses at most the uncommitted buffer. One writer per directory (an ``fcntl`` lock); DDP ranks
write their own shard (:meth:`SketchStore.open_shard`) that rank 0 merges (:meth:`merge_shards`).

This module opens, creates, closes and publishes; the rest of the class comes from mixins on the
shared :class:`~lightning_sketch.store._state.StoreState`: :mod:`~lightning_sketch.store.writer`
(checkpoints, append, commit), :mod:`~lightning_sketch.store.weights` (model weights),
:mod:`~lightning_sketch.store.curvature` (curvature files of the slices),
:mod:`~lightning_sketch.store.snapshot` (facts, integrity, rollback), :mod:`~lightning_sketch.store.shards`
(DDP shards) and :mod:`~lightning_sketch.store.views` (views, indexes, search).

Rows are sketched per-example gradients Φ∇ℓ(z; θ_t) ∈ R^D (arXiv 2402.03994 Sec. 5.2); checkpoint ``lr`` is
η_t, used by the TracIn view Σ_t η_t ⟨Φg_t(z), Φg_t(z')⟩ (see :mod:`lightning_sketch.store.views`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sketch._checks import one_of, positive_int
from lightning_sketch._version import __version__
from lightning_sketch.exceptions import SketchConfigError, StoreConflictError, StoreWriteError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._io import WriterLock, write_json_atomic
from lightning_sketch.store._validate import compare_layout, compare_spec, layout_info, spec_dict
from lightning_sketch.store.curvature import CurvatureMixin
from lightning_sketch.store.shards import ShardMixin
from lightning_sketch.store.snapshot import SnapshotMixin, _data_bytes
from lightning_sketch.store.views import StoreViews
from lightning_sketch.store.weights import WeightsMixin
from lightning_sketch.store.writer import WriterMixin

__all__ = ["SketchStore"]

log = logging.getLogger(__name__)

_AUTO_FULL_VERIFY_BYTES = 1 << 30


class SketchStore(StoreViews, WriterMixin, WeightsMixin, CurvatureMixin, ShardMixin, SnapshotMixin):
    """A directory of committed sketch rows, one slice per training checkpoint.

    Build one with :meth:`create` or :meth:`open`, never directly.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> store = SketchStore.create(d + "/s", {"kind": "dense", "dim": 8, "sketch_dim": 4, "seed": 0})
        >>> store.add_checkpoint("step-10", step=10, lr=0.1)
        >>> store.append([0, 1], np.eye(2, 4, dtype=np.float32), checkpoint="step-10")
        2
        >>> store.commit()
        1
        >>> scores, ids = SketchStore.open(d + "/s").search(np.ones((1, 4), dtype=np.float32), k=2)
        >>> sorted(ids[0].tolist()), scores[0].tolist()
        ([0, 1], [1.0, 1.0])
        >>> store.close()
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str, lock: WriterLock | None, verify: str):
        self.path = path
        self.mode = mode
        self._manifest = manifest
        self._lock = lock
        self._verify = verify
        self._verified: set[str] = set()
        self._buffer: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_ckpts: list[dict[str, Any]] = []
        self._pending_skips: dict[str, dict[str, Any]] = {}
        self._pending_weights: dict[str, dict[str, Any]] = {}
        self._pending_curvature: dict[str, dict[str, Any]] = {}
        self._pending_mark = False
        self._idsets: dict[str, set[int]] = {}
        self._cache: dict[Any, Any] = {}
        self._check_files()

    # ------------------------------------------------------------------ construction
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
    ) -> SketchStore:
        """Create an empty store at ``path`` and open it for appending.

        Args:
            path: directory to create (parents too).
            spec: the sketch (or its ``.spec`` dict) the rows are made with; ``None`` needs ``sketch_dim``.
            layout: the model's ``ParamLayout`` (or its ``to_dict()``), recorded for later checks.
            layout_fingerprint: the layout's fingerprint, if ``layout`` is not given.
            dtype: storage dtype of the rows ("float16" halves disk; search still runs in float32).
            exist_ok: reopen an existing store (spec and layout must match) instead of failing.
            nan_policy: default handling of non-finite rows: "raise" or "skip" (counted).
            sketch_dim: D when ``spec`` is None (else taken from ``spec["sketch_dim"]``).

        Raises:
            StoreWriteError: ``path`` holds a store and ``exist_ok`` is False, or it cannot be written.
            SketchConfigError: bad ``dtype``, ``nan_policy``, spec or D.
        """
        path = Path(path)
        one_of("dtype", dtype, mf.DTYPES)
        one_of("nan_policy", nan_policy, ("raise", "skip"))
        spec_d = spec_dict(spec)
        width = sketch_dim if spec_d is None else spec_d.get("sketch_dim", sketch_dim)
        width = positive_int("sketch_dim", width, hint="It is the store's row width D (spec['sketch_dim']).")
        layout_d, fingerprint = layout_info(layout, layout_fingerprint)
        if (path / mf.MANIFEST).exists():
            if not exist_ok:
                raise StoreWriteError(
                    f"A sketch store already exists at {str(path)!r}; pass exist_ok=True to append to it or "
                    f"choose another path."
                )
            return cls.open(path, spec=spec_d, layout_fingerprint=fingerprint, mode="a")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create store directory {str(path)!r}: {err}.") from err
        lock = WriterLock(path)

        manifest = mf.new_manifest(
            spec=spec_d,
            sketch_dim=width,
            layout=layout_d,
            layout_fingerprint=fingerprint,
            dtype=dtype,
            nan_policy=nan_policy,
            library_version=__version__,
        )
        try:
            write_json_atomic(path / mf.MANIFEST, manifest)
        except StoreWriteError:
            lock.release()
            raise
        return cls(path, manifest, "a", lock, "full")

    @classmethod
    def open(
        cls,
        path: str | Path,
        spec: Any = None,
        layout_fingerprint: Any = None,
        mode: Literal["r", "a"] = "r",
        verify: Literal["auto", "full", "lazy", "size"] = "auto",
    ) -> SketchStore:
        """Open the last committed snapshot of the store at ``path``.

        Args:
            path: the store directory.
            spec: if given, must equal the stored sketch spec (a Sketch or dict).
            layout_fingerprint: if given (str or ``ParamLayout``), must equal the stored one.
            mode: "r" (any number of readers, no lock) or "a" (the single writer; takes the lock).
            verify: "full" checks every file's sha256 now; "lazy" checks each file's sha256 the first
                time it is read; "size" checks sizes only; "auto" = full up to 1 GiB, else lazy.
                Sizes are always checked on open. A file is hashed once per process: one this
                process already verified and that has not changed since (same inode, size, mtime
                and ctime) is not hashed again (:func:`~lightning_sketch.store.manifest.check_file`).

        Raises:
            StoreNotFoundError: no store (or no manifest) at ``path``.
            StoreFormatError: unknown format version.
            StoreCorruptError: manifest or a data file is missing, truncated or fails its checksum.
            SketchMismatchError / LayoutMismatchError: ``spec`` / ``layout_fingerprint`` differ.
            StoreWriteError: ``mode="a"`` while another process holds the writer lock.
        """
        if mode not in ("r", "a"):
            raise SketchConfigError(f"`mode` must be 'r' or 'a', got {mode!r}.")
        if verify not in ("auto", "full", "lazy", "size"):
            raise SketchConfigError(f"`verify` must be one of auto/full/lazy/size, got {verify!r}.")
        path = Path(path)
        manifest = mf.load_manifest(path)
        compare_spec(manifest["spec"], spec, f"Store {str(path)!r}")
        compare_layout(manifest["layout_fingerprint"], layout_fingerprint, f"Store {str(path)!r}")
        lock = WriterLock(path) if mode == "a" else None
        if mode == "a":  # re-read under the lock: another writer may have committed meanwhile
            manifest = mf.load_manifest(path)
        if verify == "auto":
            verify = "full" if _data_bytes(manifest) <= _AUTO_FULL_VERIFY_BYTES else "lazy"
        try:
            return cls(path, manifest, mode, lock, verify)
        except Exception:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Release the writer lock. Uncommitted rows are dropped (call :meth:`commit` first)."""
        if self._buffer:
            log.warning(
                "Closing store %s with %d uncommitted rows; they are dropped.", self.path, self.pending_rows
            )
        self._buffer.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SketchStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def _require_writer(self) -> None:
        if self.mode != "a" or self._lock is None:
            raise StoreWriteError(
                f"Store {str(self.path)!r} is open read-only (or closed); open it with mode='a'."
            )

    # ------------------------------------------------------------------ publishing
    def _check_generation(self) -> None:
        """Raise :class:`StoreConflictError` if another writer published since this one loaded the store."""
        if self._lock is not None:
            self._lock.check()
        disk = mf.read_generation(self.path)
        if disk != self._manifest["generation"]:
            raise StoreConflictError(
                f"Store {str(self.path)!r} is at generation {disk} on disk but this writer loaded generation "
                f"{self._manifest['generation']}: another writer committed meanwhile (was .writer.lock "
                "deleted?). Nothing was published and the other writer's rows are intact; reopen the store "
                "and append again."
            )

    def check_writer(self) -> None:
        """Raise unless this store may publish now: open for writing, its lock file still the one it took,
        and the manifest on disk still at the generation it loaded. Writers of files recorded in the
        manifest (curvature) call it right before their rename.

        Raises:
            StoreWriteError: read-only or closed. StoreConflictError: another writer got in.
        """
        self._require_writer()
        self._check_generation()

    def _publish(self, new: dict[str, Any]) -> None:
        """Atomically replace the manifest by ``new`` if the on-disk generation is still the loaded one.

        The generation and lock are checked before the new manifest is written and again right before
        its rename, so a writer whose lock was stolen meanwhile never replaces the other's manifest.
        """
        self._check_generation()
        write_json_atomic(self.path / mf.MANIFEST, new, before_replace=self._check_generation)
