"""Health report of a store directory, for ``lightning-sketch inspect`` and humans."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import LightningSketchError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store.snapshot import data_bytes
from lightning_sketch.store.store import SketchStore

__all__ = ["inspect_store"]


def inspect_store(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Summarise the committed snapshot at ``path`` and check its health.

    Args:
        path: the store directory.
        verify: check every file's sha256 and the row counts (else sizes only).

    Returns:
        A JSON-serialisable dict: ``path``, ``format_version``, ``library_version``, ``generation``,
        ``spec``, ``layout_fingerprint``, ``dtype``, ``sketch_dim``, ``rows``, ``checkpoints`` (name,
        step, lr, weight, rows, skipped counts), ``segments``, ``shards``, ``indexes`` (view, kind,
        rows, current), ``size_bytes`` (committed files + manifest), ``bytes_per_row`` and ``health``
        (``ok`` bool, ``checksums`` "ok"/"not checked"/"failed", ``error`` message or None).

    Raises:
        StoreNotFoundError: no store at ``path``. StoreFormatError: unknown format version.
        (Corrupt files do not raise: they are reported under ``health``.)

    Example:
        >>> import tempfile
        >>> from lightning_sketch.store import SketchStore
        >>> d = tempfile.mkdtemp() + "/s"
        >>> SketchStore.create(d, None, sketch_dim=4).close()
        >>> info = inspect_store(d)
        >>> info["rows"], info["health"]["ok"]
        (0, True)
    """

    path = Path(path)
    manifest = mf.load_manifest(path, strict=False)  # structure only: consistency and checksum go to `health`
    health: dict[str, Any] = {"ok": True, "checksums": "ok" if verify else "not checked", "error": None}
    try:
        store = SketchStore.open(path, verify="full" if verify else "size")
        if verify:
            store.verify()
    except LightningSketchError as err:
        if isinstance(err, FileNotFoundError) and not os.path.lexists(path / mf.MANIFEST):
            raise
        health = {"ok": False, "checksums": "failed", "error": str(err)}
    rows = int(sum(s["rows"] for s in manifest["segments"]))
    size = data_bytes(manifest) + (path / mf.MANIFEST).stat().st_size
    indexes = []
    for key, entry in manifest["indexes"].items():
        view_rows = rows if entry["view"] == "tracin" else sum(
            s["rows"] for s in manifest["segments"] if s["checkpoint"] == entry["view"]
        )
        indexes.append(
            {
                "name": key,
                "view": entry["view"],
                "kind": entry["kind"],
                "rows": entry["rows"],
                "bytes": entry["bytes"],
                "current": entry["view"] == "tracin" or entry["rows"] == view_rows,
            }
        )
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "library_version": manifest.get("library_version"),
        "generation": manifest["generation"],
        "spec": manifest["spec"],
        "layout_fingerprint": manifest["layout_fingerprint"],
        "dtype": manifest["dtype"],
        "sketch_dim": manifest["sketch_dim"],
        "rows": rows,
        "checkpoints": [
            {
                k: c.get(k)
                for k in ("name", "step", "lr", "weight", "rows", "skipped_nonfinite", "skipped_duplicates")
            }
            for c in manifest["checkpoints"]
        ],
        "segments": len(manifest["segments"]),
        "shards": sorted(manifest.get("merged_shards", {})),
        "indexes": indexes,
        "size_bytes": int(size),
        "bytes_per_row": size / rows if rows else None,
        "health": health,
    }
