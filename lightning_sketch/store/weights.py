"""Model weights beside a store: each checkpoint's parameters, checksummed in the manifest.

:class:`WeightFiles` is the component of :class:`~lightning_sketch.store.SketchStore` for these
files. They live in the run directory (the store's parent folder) and are read back only after their
size, sha256 and parameter layout match the manifest, with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lightning_sketch.exceptions import (
    LayoutMismatchError,
    SketchInputError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreWriteError,
)
from lightning_sketch.io import safeio as sio
from lightning_sketch.store import manifest as mf
from lightning_sketch.store.snapshot import Snapshot
from lightning_sketch.store.writer import Writer

__all__ = ["WeightFiles"]


class WeightFiles:
    """Component of :class:`~lightning_sketch.store.SketchStore`: per-checkpoint parameter files.

    Writes them (staged with ``writer``, recorded at its next commit) and reads back only the files
    the committed manifest of ``snapshot`` records, after checking size, sha256 and layout.
    """

    def __init__(self, snapshot: Snapshot, writer: Writer) -> None:
        self._snapshot = snapshot
        self._writer = writer

    def save(self, name: str, tensors: dict[str, Any], directory: str | Path,
                     layout_fingerprint: str | None = None) -> Path:
        """Write and stage one checkpoint's parameters (see ``SketchStore.save_weights``)."""
        self._snapshot.require_writer()
        mf.check_checkpoint_name(name)
        root = self._snapshot.path.parent
        directory = Path(directory)
        try:
            rel = directory.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise SketchInputError(
                f"Weights directory {str(directory)!r} must lie inside the run directory {str(root)!r}."
            ) from None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create the weights directory {str(directory)!r}: {err}.") from err
        buf = io.BytesIO()
        torch.save({n: t.detach().cpu().clone() for n, t in tensors.items()}, buf)
        sha, size = sio.atomic_write(directory / f"{name}.pt", [buf.getbuffer()], what="weights file",
                                     root=root)
        file = f"{name}.pt" if rel == "." else f"{rel}/{name}.pt"
        self._writer.stage("weights", name, {
            "file": file, "bytes": size, "sha256": sha,
            "layout_fingerprint": layout_fingerprint or self._snapshot.layout_fingerprint,
        })
        return directory / f"{name}.pt"

    def has(self, name: str) -> bool:
        """Whether committed weights of ``name`` are recorded."""
        return name in self._snapshot.manifest.get("weights", {})

    def load(self, name: str, layout_fingerprint: str | None = None) -> dict[str, Any]:
        """The verified parameters of ``name`` (see ``SketchStore.load_weights``)."""
        entry = self._snapshot.manifest.get("weights", {}).get(name)
        if entry is None:
            raise StoreNotFoundError(
                f"Store {str(self._snapshot.path)!r} records no saved weights for checkpoint {name!r} "
                "(recorded: "
                f"{sorted(self._snapshot.manifest.get('weights', {}))}); write them with "
                "GradientSketch(save_weights=True)."
            )
        root = self._snapshot.path.parent
        path = root / entry["file"]
        real = sio.confined(root, entry["file"], what="weights file")
        try:
            raw = sio.read_capped(real, entry["bytes"], what="weights file")
        except StoreNotFoundError as err:
            raise StoreNotFoundError(
                f"Weights file {str(path)!r} recorded for checkpoint {name!r} is missing; restore it or "
                "re-run with save_weights=True."
            ) from err
        if len(raw) != entry["bytes"] or sio.sha256_bytes(raw) != entry["sha256"]:
            raise StoreCorruptError(
                f"Weights file {str(path)!r} of checkpoint {name!r} fails its checksum ({len(raw)} bytes, "
                f"manifest records {entry['bytes']}): it is corrupted, truncated, or a file from another "
                "checkpoint or run. Restore the original file."
            )
        for fp, where in ((entry.get("layout_fingerprint"), "recorded with the weights"),
                          (self._snapshot.layout_fingerprint, "of the store")):
            if layout_fingerprint is not None and fp is not None and fp != layout_fingerprint:
                raise LayoutMismatchError(
                    f"Weights of checkpoint {name!r} were saved for parameter layout {fp[:12]}… ({where}) "
                    f"but the model has layout {layout_fingerprint[:12]}…; use the architecture the run was "
                    "trained with."
                )
        saved = sio.load_torch_bytes(raw, what=f"weights file {str(path)!r}")
        if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in saved.items()):
            raise StoreCorruptError(f"Weights file {str(path)!r} does not hold a dict of named tensors.")
        return saved

    def verify(self) -> None:
        """Read back every recorded weights file (:meth:`load`), for ``SketchStore.verify``."""
        for name in self._snapshot.manifest.get("weights", {}):  # files beside the store (run directory)
            self.load(name)
