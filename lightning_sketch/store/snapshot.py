"""The committed snapshot of a store: its manifest, the files it names, and who may replace it.

:class:`Snapshot` is the component of :class:`~lightning_sketch.store.SketchStore` that owns the
committed manifest (format in :mod:`lightning_sketch.store.manifest`), the writer lock and the set
of data files this process has checksummed. It answers the snapshot's facts (generation, spec, D,
dtype, checkpoints, ...), checks files (sizes on open; sha256 eagerly or on first read, per the
``verify`` mode), prunes unreferenced files and builds the manifest of a rollback. It is the one
place a manifest is written: :meth:`Snapshot.publish` checks the generation on disk and the lock
before writing and again right before the rename, so a writer whose lock was stolen never replaces
another writer's manifest. The other components (writer, views, weights, curvature, shards) are
handed this object and change the committed state only through :meth:`Snapshot.publish`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch._version import __version__
from lightning_sketch.exceptions import (
    SketchConfigError,
    SketchInputError,
    StoreConflictError,
    StoreCorruptError,
    StoreWriteError,
)
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._io import WriterLock, write_json_atomic
from lightning_sketch.store._validate import compare_layout, compare_spec

__all__ = ["Snapshot", "data_bytes", "recount"]

#: ``verify="auto"`` checksums every file on open up to this many data bytes, else each on first read.
_AUTO_FULL_VERIFY_BYTES = 1 << 30


class Snapshot:
    """The committed manifest of one store directory, its writer lock and its file checks.

    Build one with :meth:`open` or :meth:`create`. Opening checks the size of every file the
    manifest names (and, with ``verify="full"``, its sha256).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str, lock: WriterLock | None,
                 verify: str) -> None:
        self.path = path
        #: "r" (a reader) or "a" (the writer, holding ``lock`` until :meth:`release`).
        self.mode = mode
        #: the committed manifest; replaced whole (by :meth:`publish` and :meth:`reload`), never edited.
        self.manifest = manifest
        self.lock = lock
        #: "full", "lazy" or "size": when data files are checksummed (see ``SketchStore.open``).
        self.verify_mode = verify
        #: data files whose sha256 was checked in this process.
        self.verified: set[str] = set()
        self.check_files()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        spec: Any = None,
        layout_fingerprint: Any = None,
        mode: str = "r",
        verify: str = "auto",
    ) -> Snapshot:
        """The last committed snapshot at ``path`` (arguments and errors: ``SketchStore.open``)."""
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
            verify = "full" if data_bytes(manifest) <= _AUTO_FULL_VERIFY_BYTES else "lazy"
        try:
            return cls(path, manifest, mode, lock, verify)
        except Exception:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def create(cls, path: Path, **fields: Any) -> Snapshot:
        """Make directory ``path``, take its writer lock and write an empty manifest of ``fields``
        (the keyword arguments of :func:`~lightning_sketch.store.manifest.new_manifest` but the version).

        Raises:
            StoreWriteError: the directory or manifest cannot be written, or another writer holds the lock.
        """
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create store directory {str(path)!r}: {err}.") from err
        lock = WriterLock(path)
        manifest = mf.new_manifest(**fields, library_version=__version__)
        try:
            write_json_atomic(path / mf.MANIFEST, manifest)
        except StoreWriteError:
            lock.release()
            raise
        return cls(path, manifest, "a", lock, "full")

    def release(self) -> None:
        """Release the writer lock (if held); the snapshot stays readable."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ facts
    @property
    def generation(self) -> int:
        return self.manifest["generation"]

    @property
    def sketch_dim(self) -> int:
        return self.manifest["sketch_dim"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def layout_fingerprint(self) -> str | None:
        return self.manifest["layout_fingerprint"]

    @property
    def checkpoints(self) -> list[str]:
        """Committed checkpoint names in the order they were added."""
        return [c["name"] for c in self.manifest["checkpoints"]]

    def checkpoint_info(self, name: str) -> dict[str, Any]:
        """A copy of checkpoint ``name``'s record; :class:`SketchInputError` if there is none."""
        for c in self.manifest["checkpoints"]:
            if c["name"] == name:
                return copy.deepcopy(c)
        raise SketchInputError(f"Unknown checkpoint {name!r}; the store has {self.checkpoints}.")

    @property
    def num_rows(self) -> int:
        return int(sum(s["rows"] for s in self.manifest["segments"]))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the data files, indexes and manifest."""
        return data_bytes(self.manifest) + (self.path / mf.MANIFEST).stat().st_size

    # ------------------------------------------------------------------ publishing
    def require_writer(self) -> None:
        """Raise :class:`StoreWriteError` unless this snapshot is open for writing and holds the lock."""
        if self.mode != "a" or self.lock is None:
            raise StoreWriteError(
                f"Store {str(self.path)!r} is open read-only (or closed); open it with mode='a'."
            )

    def check_generation(self) -> None:
        """Raise :class:`StoreConflictError` if another writer published since this one loaded the store."""
        if self.lock is not None:
            self.lock.check()
        disk = mf.read_generation(self.path)
        if disk != self.manifest["generation"]:
            raise StoreConflictError(
                f"Store {str(self.path)!r} is at generation {disk} on disk but this writer loaded generation "
                f"{self.manifest['generation']}: another writer committed meanwhile (was .writer.lock "
                "deleted?). Nothing was published and the other writer's rows are intact; reopen the store "
                "and append again."
            )

    def check_writer(self) -> None:
        """:meth:`require_writer`, then :meth:`check_generation` (see ``SketchStore.check_writer``)."""
        self.require_writer()
        self.check_generation()

    def publish(self, new: dict[str, Any], *, written: Iterable[str] = ()) -> None:
        """Atomically replace the manifest by ``new`` if the on-disk generation is still the loaded one.

        The generation and lock are checked before the new manifest is written and again right before
        its rename, so a writer whose lock was stolen meanwhile never replaces the other's manifest.
        Once it is published, ``new`` is the committed manifest and the files named in ``written``
        (which this process wrote and hashed for it) count as verified.
        """
        self.check_generation()
        write_json_atomic(self.path / mf.MANIFEST, new, before_replace=self.check_generation)
        self.manifest = new
        self.verified.update(written)

    def rollback(self, generation: int) -> None:
        """Publish the snapshot as it was at ``generation`` (see ``SketchStore.rollback``).

        Raises:
            SketchInputError: ``generation`` is negative or beyond the current one.
            StoreWriteError: read-only. StoreConflictError: another writer got in.
        """
        self.require_writer()
        if (
            isinstance(generation, bool)
            or not isinstance(generation, int)
            or not 0 <= generation <= self.generation
        ):
            raise SketchInputError(
                f"`generation` must be an int in [0, {self.generation}], got {generation!r}."
            )
        new = copy.deepcopy(self.manifest)
        new["segments"] = [s for s in new["segments"] if s["generation"] <= generation]
        new["checkpoints"] = [c for c in new["checkpoints"] if c.get("generation", 0) <= generation]
        new["skips"] = [s for s in new.get("skips", []) if s["generation"] <= generation]
        new["indexes"] = {k: v for k, v in new["indexes"].items() if v["generation"] <= generation}
        new["weights"] = {k: v for k, v in new.get("weights", {}).items() if v["generation"] <= generation}
        new["curvature"] = {k: v for k, v in new.get("curvature", {}).items()
                            if v["generation"] <= generation}
        for name in new["merged_shards"]:  # keep shard merges idempotent after a rollback
            new["merged_shards"][name] = sum(
                s["vectors"]["file"].startswith(f"shards/{name}/") for s in new["segments"]
            )
            new.setdefault("merged_skips", {})[name] = sum(s.get("shard") == name for s in new["skips"])
        new["generation"] = self.generation + 1
        recount(new)
        self.publish(new)

    def reload(self) -> None:
        """Re-read the manifest on disk and check its files (sizes, or per ``verify``); on any error the
        loaded snapshot is kept."""
        manifest = mf.load_manifest(self.path)
        old, self.manifest = self.manifest, manifest
        try:
            self.check_files()
        except Exception:
            self.manifest = old
            raise

    def prune(self) -> list[str]:
        """Delete top-level files the manifest does not name (see ``SketchStore.prune``); their names."""
        self.require_writer()
        keep = {e["file"] for e in _file_entries(self.manifest)}
        removed = []
        for p in sorted(self.path.iterdir()):
            if (
                p.is_file()
                and p.name not in keep
                and (p.name.startswith(("seg-", "index-")) or ".tmp-" in p.name)
            ):
                p.unlink()
                removed.append(p.name)
        return removed

    # ------------------------------------------------------------------ integrity
    def check_files(self) -> None:
        """Check every data file's size, and its sha256 too (once) under ``verify="full"``."""
        for entry in _file_entries(self.manifest):
            full = self.verify_mode == "full" and entry["file"] not in self.verified
            mf.check_file(self.path, entry, full=full)
            if full:
                self.verified.add(entry["file"])

    def check_hash(self, entry: dict[str, Any]) -> None:
        """Check the sha256 of ``entry``'s file unless this process already verified it."""
        if entry["file"] not in self.verified:
            mf.check_file(self.path, entry, full=True)
            self.verified.add(entry["file"])

    def verify(self) -> None:
        """Hash every data file now, check the row counts and every segment's header (the store's own
        files; ``SketchStore.verify`` adds the weights and curvature files).

        Raises:
            StoreCorruptError: naming the first bad file or inconsistent count.
        """
        for entry in _file_entries(self.manifest):
            mf.check_file(self.path, entry, full=True, cached=False)
            self.verified.add(entry["file"])
        counted = copy.deepcopy(self.manifest)
        recount(counted)
        for a, b in zip(counted["checkpoints"], self.manifest["checkpoints"]):
            if a["rows"] != b["rows"]:
                raise StoreCorruptError(
                    f"{str(self.path / mf.MANIFEST)!r}: checkpoint {b['name']!r} records {b['rows']} rows "
                    f"but its segments hold {a['rows']}."
                )
        for seg in self.manifest["segments"]:
            self.load(seg["ids"], seg["rows"], None, "int64")
            self.load(seg["vectors"], seg["rows"], self.sketch_dim, self.dtype)

    def load(self, entry: dict[str, Any], rows: int, width: int | None, dtype: str) -> np.ndarray:
        """Memory-map a data file, checksummed first unless verified already or ``verify="size"``."""
        if self.verify_mode != "size":
            self.check_hash(entry)
        return mf.load_npy(self.path, entry, rows=rows, width=width, dtype=dtype)


def _file_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for seg in manifest["segments"]:
        out += [seg["vectors"], seg["ids"]]
    out += [v for v in manifest["indexes"].values()]
    return out


def data_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the data files (segments and indexes) a manifest names."""
    return int(sum(e["bytes"] for e in _file_entries(manifest)))


def recount(manifest: dict[str, Any]) -> None:
    """Recompute each checkpoint's rows and skipped counts from segments and skip records."""
    for c in manifest["checkpoints"]:
        c["rows"] = int(sum(s["rows"] for s in manifest["segments"] if s["checkpoint"] == c["name"]))
        skips = [s for s in manifest.get("skips", []) if s["checkpoint"] == c["name"]]
        c["skipped_nonfinite"] = int(sum(s["nonfinite"] for s in skips))
        c["skipped_duplicates"] = int(sum(s["duplicates"] for s in skips))
