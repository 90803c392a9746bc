"""Curvature files beside a store: each slice's kernel matrix and sidecar, checksummed in the manifest.

:class:`CurvatureFiles` is the component of :class:`~lightning_sketch.store.SketchStore` for these
files. The ``[D, D]`` curvature of a checkpoint slice (:mod:`lightning_sketch.attribution.curvature`)
decides the attribution kernel, so editing, swapping or deleting one of its files must not go
unnoticed. Its two files (a matrix ``.npy`` and a ``.json`` sidecar under ``curvature/`` in the run
directory, the store's parent folder) are recorded under the manifest's ``curvature`` field with their
size and sha256, committed with the next manifest generation, and read back only through
:meth:`CurvatureFiles.read` (``SketchStore.curvature_bytes``), which refuses a file that is missing or
fails its checksum. A file on disk that the manifest does not list (written by a run killed before
its commit, or left by a rollback) is ignored."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import SketchInputError, StoreCorruptError, StoreNotFoundError
from lightning_sketch.io import safeio as sio
from lightning_sketch.store import manifest as mf
from lightning_sketch.store.snapshot import Snapshot
from lightning_sketch.store.writer import Writer

__all__ = ["CURVATURE_PARTS", "CurvatureFiles"]

#: the files of one slice's curvature record: the matrix (``.npy``) and its sidecar (``.json``).
CURVATURE_PARTS = ("matrix", "sidecar")
#: largest curvature file read (a float64 [65536, 65536] matrix would be 32 GiB; the sidecar is tiny).
_CAP = 1 << 36


class CurvatureFiles:
    """Component of :class:`~lightning_sketch.store.SketchStore`: per-slice curvature files.

    Records them (staged with ``writer``, committed at its next commit) and reads back only the files
    the committed manifest of ``snapshot`` records, after checking their size and sha256.
    """

    def __init__(self, snapshot: Snapshot, writer: Writer) -> None:
        self._snapshot = snapshot
        self._writer = writer

    def record(self, name: str, files: dict[str, tuple[Path, str, int]]) -> None:
        """Stage slice ``name``'s curvature files (see ``SketchStore.record_curvature``)."""
        self._snapshot.require_writer()
        mf.check_checkpoint_name(name)
        if set(files) != set(CURVATURE_PARTS):
            raise SketchInputError(f"`files` must name {CURVATURE_PARTS}, got {sorted(files)}.")
        root = self._snapshot.path.parent.resolve()
        entry: dict[str, Any] = {}
        for part, (path, sha, size) in files.items():
            try:
                rel = Path(path).resolve().relative_to(root).as_posix()
            except ValueError:
                raise SketchInputError(
                    f"Curvature file {str(path)!r} must lie inside the run directory {str(root)!r}."
                ) from None
            entry[part] = {"file": rel, "bytes": int(size), "sha256": str(sha)}
        self._writer.stage("curvature", name, entry)

    @property
    def slices(self) -> list[str]:
        """Slices whose curvature files the committed manifest records (sorted)."""
        return sorted(self._snapshot.manifest.get("curvature", {}))

    def has(self, name: str) -> bool:
        """Whether the committed manifest records curvature files for ``name``."""
        return name in self._snapshot.manifest.get("curvature", {})

    def read(self, name: str, part: str) -> tuple[Path, bytes]:
        """``(path, content)`` of one recorded curvature file, verified (see
        ``SketchStore.curvature_bytes``)."""
        entry = self._snapshot.manifest.get("curvature", {}).get(name)
        if entry is None:
            raise StoreNotFoundError(
                f"Store {str(self._snapshot.path)!r} records no curvature for slice {name!r} (recorded: "
                f"{self.slices}); a curvature file the manifest does not list is ignored."
            )
        if part not in CURVATURE_PARTS:
            raise SketchInputError(f"`part` must be one of {CURVATURE_PARTS}, got {part!r}.")
        e = entry[part]
        root = self._snapshot.path.parent
        path = root / e["file"]
        real = sio.confined(root, e["file"], what=f"curvature {part}")
        try:
            fd = sio.open_regular(real, what=f"curvature {part}")
        except StoreNotFoundError as err:
            raise StoreCorruptError(
                f"Curvature {part} {str(path)!r} of slice {name!r} is recorded in the store's manifest but "
                "missing: the curvature was deleted. Restore the file, or re-run the fit that wrote it."
            ) from err
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        raw = b"" if size != e["bytes"] else sio.read_capped(real, min(size, _CAP), what=f"curvature {part}")
        if size != e["bytes"] or len(raw) != e["bytes"] or sio.sha256_bytes(raw) != e["sha256"]:
            raise StoreCorruptError(
                f"Curvature {part} {str(path)!r} of slice {name!r} fails its SHA-256 checksum "
                f"({size} bytes, manifest records {e['bytes']}): it was edited, damaged or swapped with "
                "another slice's. Restore the original file."
            )
        return path, raw

    def verify(self) -> None:
        """Check every recorded curvature file (:meth:`read`), for ``SketchStore.verify``."""
        for name in self.slices:
            for part in CURVATURE_PARTS:
                self.read(name, part)
