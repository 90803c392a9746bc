"""Model weights beside a store: each checkpoint's parameters, checksummed in the manifest.

Mixin of :class:`~lightning_sketch.store.SketchStore`. The files live in the run directory (the
store's parent folder) and are read back only after their size, sha256 and parameter layout match
the manifest, with ``torch.load(weights_only=True)``.
"""

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
from lightning_sketch.store._state import StoreState

__all__ = ["WeightsMixin"]


class WeightsMixin(StoreState):
    """Saving and verified loading of per-checkpoint parameters (state lives in ``SketchStore``)."""

    def save_weights(self, name: str, tensors: dict[str, Any], directory: str | Path,
                     layout_fingerprint: str | None = None) -> Path:
        """Write the parameters of checkpoint ``name`` to ``directory/<name>.pt`` and record them.

        The file is written atomically (``torch.save`` of a dict of CPU tensors) and recorded at
        the next :meth:`commit` with its size, sha256 and the layout fingerprint, so that
        :meth:`load_weights` refuses a flipped, truncated, swapped or foreign file. ``directory``
        must lie in the run directory (the store's parent folder).

        Raises:
            SketchInputError: unsafe checkpoint name, or ``directory`` outside the run directory.
            UnsafeFileError: ``directory`` is reached through a symlinked folder of the run directory.
            StoreWriteError: the write failed (disk full); no file is left behind.
        """
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

    def has_weights(self, name: str) -> bool:
        """Whether committed parameters of checkpoint ``name`` are recorded (see :meth:`save_weights`)."""
        return name in self._snapshot.manifest.get("weights", {})

    def load_weights(self, name: str, layout_fingerprint: str | None = None) -> dict[str, Any]:
        """The verified parameters ``{param name: tensor}`` of checkpoint ``name`` (CPU tensors).

        The file must be the one recorded for ``name``: inside the run directory, a regular file of
        the recorded size and sha256, for the recorded layout (and ``layout_fingerprint``, if
        given). It is read with ``torch.load(weights_only=True)`` (no pickled code).

        Raises:
            StoreNotFoundError: no weights recorded for ``name`` (or the file is missing).
            StoreCorruptError: the file fails its checksum or holds anything but a dict of tensors.
            LayoutMismatchError: the weights were saved for another parameter layout.
            UnsafeFileError: the recorded path leaves the run directory or is not a regular file.
        """
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
