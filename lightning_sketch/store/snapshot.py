"""Snapshot maintenance of a store: integrity checks, rollback to a generation, refresh.

Mixin of :class:`~lightning_sketch.store.SketchStore`; the checks implement the crash-safety
contract of :mod:`lightning_sketch.store.store` (sizes on open, sha256 eagerly or on first read).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from lightning_sketch.exceptions import SketchInputError, StoreCorruptError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._state import StoreState

__all__ = ["SnapshotMixin"]


class SnapshotMixin(StoreState):
    """Snapshot facts, integrity, rollback and refresh (state lives in ``SketchStore``)."""

    # ------------------------------------------------------------------ snapshot facts
    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the committed manifest."""
        return copy.deepcopy(self._manifest)

    @property
    def generation(self) -> int:
        """Number of commits in the current snapshot."""
        return self._manifest["generation"]

    @property
    def run_id(self) -> str | None:
        """The id made when the store was created (32 hex digits; None for a store written without one)."""
        return self._manifest.get("run_id")

    @property
    def spec(self) -> dict[str, Any] | None:
        """The sketch spec the rows were written with (``make(**spec)`` rebuilds it)."""
        return copy.deepcopy(self._manifest["spec"])

    @property
    def sketch_dim(self) -> int:
        """D, the width of one stored row."""
        return self._manifest["sketch_dim"]

    @property
    def dtype(self) -> str:
        """Storage dtype, "float32" or "float16"."""
        return self._manifest["dtype"]

    @property
    def layout_fingerprint(self) -> str | None:
        """Fingerprint of the parameter layout the rows were computed for."""
        return self._manifest["layout_fingerprint"]

    @property
    def checkpoints(self) -> list[str]:
        """Committed checkpoint names in the order they were added."""
        return [c["name"] for c in self._manifest["checkpoints"]]

    def checkpoint_info(self, name: str) -> dict[str, Any]:
        """The manifest record of checkpoint ``name`` (step, lr, weight, rows, skipped counts).

        Raises:
            SketchInputError: unknown checkpoint.
        """
        for c in self._manifest["checkpoints"]:
            if c["name"] == name:
                return copy.deepcopy(c)
        raise SketchInputError(f"Unknown checkpoint {name!r}; the store has {self.checkpoints}.")

    @property
    def num_rows(self) -> int:
        """Committed rows over all checkpoints."""
        return int(sum(s["rows"] for s in self._manifest["segments"]))

    @property
    def pending_rows(self) -> int:
        """Buffered (uncommitted) rows."""
        return int(sum(len(i) for parts in self._buffer.values() for i, _ in parts))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the committed snapshot (data files, indexes and manifest)."""
        return _data_bytes(self._manifest) + (self.path / mf.MANIFEST).stat().st_size

    def rollback(self, generation: int) -> None:
        """Publish the snapshot as it was at ``generation`` (drop later segments, checkpoints, indexes).

        Used on resume: a callback records the store generation in its Lightning checkpoint and rolls
        back to it, so re-run steps append the same rows again. The pending buffer is cleared.

        Raises:
            SketchInputError: ``generation`` is negative or beyond the current one.
        """
        self._require_writer()
        if (
            isinstance(generation, bool)
            or not isinstance(generation, int)
            or not 0 <= generation <= self.generation
        ):
            raise SketchInputError(
                f"`generation` must be an int in [0, {self.generation}], got {generation!r}."
            )
        new = copy.deepcopy(self._manifest)
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
        _recount(new)
        self._publish(new)
        self._manifest = new
        self._buffer.clear()
        self._pending_ckpts.clear()
        self._pending_skips.clear()
        self._pending_weights.clear()
        self._pending_curvature.clear()
        self._idsets.clear()
        self._cache.clear()

    def refresh(self) -> None:
        """Re-read the manifest to see commits made since this store was opened (readers)."""
        manifest = mf.load_manifest(self.path)
        old, self._manifest = self._manifest, manifest
        try:
            self._check_files()
        except Exception:
            self._manifest = old
            raise
        self._cache.clear()
        self._idsets.clear()

    def prune(self) -> list[str]:
        """Delete top-level files the current manifest does not name and return their names.

        These are leftovers of interrupted commits (``*.tmp-<pid>``, unreferenced segments), replaced
        indexes and rolled-back segments. Readers still holding an older snapshot may need them, so
        prune only when no reader of an older generation is open. Shard directories are left alone.

        Raises:
            StoreWriteError: the store is read-only.
        """
        self._require_writer()
        keep = {e["file"] for e in _file_entries(self._manifest)}
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
    def _check_files(self) -> None:
        for entry in _file_entries(self._manifest):
            full = self._verify == "full" and entry["file"] not in self._verified
            mf.check_file(self.path, entry, full=full)
            if full:
                self._verified.add(entry["file"])

    def verify(self) -> None:
        """Check every committed file's size and sha256 (hashed now, whatever was hashed before) and
        the manifest's row counts.

        Raises:
            StoreCorruptError: naming the first bad file or inconsistent count.
        """
        for entry in _file_entries(self._manifest):
            mf.check_file(self.path, entry, full=True, cached=False)
            self._verified.add(entry["file"])
        counted = copy.deepcopy(self._manifest)
        _recount(counted)
        for a, b in zip(counted["checkpoints"], self._manifest["checkpoints"]):
            if a["rows"] != b["rows"]:
                raise StoreCorruptError(
                    f"{str(self.path / mf.MANIFEST)!r}: checkpoint {b['name']!r} records {b['rows']} rows "
                    f"but its segments hold {a['rows']}."
                )
        for seg in self._manifest["segments"]:
            self._load(seg["ids"], seg["rows"], None, "int64")
            self._load(seg["vectors"], seg["rows"], self.sketch_dim, self.dtype)
        for name in self._manifest.get("weights", {}):  # files beside the store, in the run directory
            self.load_weights(name)
        self._verify_curvature()

    def _load(self, entry: dict[str, Any], rows: int, width: int | None, dtype: str) -> np.ndarray:
        if entry["file"] not in self._verified and self._verify != "size":
            mf.check_file(self.path, entry, full=True)
            self._verified.add(entry["file"])
        return mf.load_npy(self.path, entry, rows=rows, width=width, dtype=dtype)


def _file_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for seg in manifest["segments"]:
        out += [seg["vectors"], seg["ids"]]
    out += [v for v in manifest["indexes"].values()]
    return out


def _data_bytes(manifest: dict[str, Any]) -> int:
    return int(sum(e["bytes"] for e in _file_entries(manifest)))


def _recount(manifest: dict[str, Any]) -> None:
    """Recompute each checkpoint's rows and skipped counts from segments and skip records."""
    for c in manifest["checkpoints"]:
        c["rows"] = int(sum(s["rows"] for s in manifest["segments"] if s["checkpoint"] == c["name"]))
        skips = [s for s in manifest.get("skips", []) if s["checkpoint"] == c["name"]]
        c["skipped_nonfinite"] = int(sum(s["nonfinite"] for s in skips))
        c["skipped_duplicates"] = int(sum(s["duplicates"] for s in skips))
