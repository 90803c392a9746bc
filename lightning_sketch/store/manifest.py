"""The store manifest: the single JSON file that defines a committed snapshot.

A store directory holds ``manifest.json`` and immutable data files. The manifest lists, for the
current snapshot (``generation``), the sketch ``spec``, the parameter ``layout`` and its
``layout_fingerprint``, the storage ``dtype`` and ``sketch_dim`` D, the checkpoints (name, step,
learning rate η_t, weight, rows, skipped counts), every segment (vectors file and ids file with
row count, byte size and sha256) and every persisted FAISS index (kind, params, file, sha256).
Files not named in the manifest (an interrupted commit's leftovers) are invisible to readers.

Format version 1 is the only one this library reads or writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.exceptions import (
    SketchInputError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
from lightning_sketch.store._io import file_sha256, read_json

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "check_checkpoint_name",
    "check_file",
    "load_manifest",
    "new_manifest",
]

FORMAT_NAME = "lightning_sketch.store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
#: view names that are not checkpoints.
RESERVED = ("tracin",)


def check_checkpoint_name(name: Any) -> str:
    """Validate a checkpoint name (it becomes part of file names).

    Raises:
        SketchInputError: on a non-string or unsafe name.

    Example:
        >>> check_checkpoint_name("step-100")
        'step-100'
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
        raise SketchInputError(
            f"`checkpoint` name must be 1-100 characters of letters, digits, '_', '.', '-' (not starting "
            f"with a symbol) and not one of {list(RESERVED)}; got {name!r}. Use e.g. 'step-1000'."
        )
    return name


def spec_sha256(spec: dict[str, Any] | None) -> str:
    """sha256 of the canonical JSON of a sketch spec (recorded at creation; detects hand edits)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def new_manifest(
    *,
    spec: dict[str, Any] | None,
    sketch_dim: int,
    layout: dict[str, Any] | None,
    layout_fingerprint: str | None,
    dtype: str,
    nan_policy: str,
    library_version: str,
) -> dict[str, Any]:
    """A fresh, empty manifest (generation 0)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "generation": 0,
        "spec": spec,
        "spec_sha256": spec_sha256(spec),
        "sketch_dim": int(sketch_dim),
        "layout": layout,
        "layout_fingerprint": layout_fingerprint,
        "dtype": dtype,
        "nan_policy": nan_policy,
        "checkpoints": [],
        "segments": [],
        "indexes": {},
        "merged_shards": {},
    }


_REQUIRED = {
    "generation": int,
    "sketch_dim": int,
    "dtype": str,
    "checkpoints": list,
    "segments": list,
    "indexes": dict,
}


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``<directory>/manifest.json``.

    Raises:
        StoreNotFoundError: the directory or its manifest does not exist.
        StoreCorruptError: the manifest is not valid JSON or misses required fields.
        StoreFormatError: the manifest was written by another (newer or unknown) format version.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(
            f"No sketch store at {str(directory)!r} (directory missing); create one with SketchStore.create."
        )
    path = directory / MANIFEST
    if not path.exists():
        raise StoreNotFoundError(
            f"No sketch store at {str(directory)!r}: {MANIFEST!r} is missing. If this directory held a store, "
            f"its manifest was deleted and the store cannot be read; otherwise create one with "
            f"SketchStore.create."
        )
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{str(path)!r} is not a lightning_sketch store manifest (bad 'format' field).")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"Store {str(directory)!r} has format_version {version!r}, but this library (reads version "
            f"{FORMAT_VERSION}) cannot read it. Use the lightning_sketch version that wrote it "
            f"(library_version {data.get('library_version')!r})."
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise StoreCorruptError(
                f"{str(path)!r}: field {key!r} must be {kind.__name__}, got {data.get(key)!r}; "
                f"the manifest was edited or corrupted."
            )
    if data["dtype"] not in DTYPES:
        raise StoreCorruptError(f"{str(path)!r}: dtype {data['dtype']!r} is not one of {DTYPES}.")
    spec = data.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise StoreCorruptError(f"{str(path)!r}: field 'spec' must be a dict or null, got {spec!r}; the manifest was edited.")
    if "spec_sha256" in data and data["spec_sha256"] != spec_sha256(spec):
        raise StoreCorruptError(
            f"{str(path)!r}: the sketch spec {spec!r} does not match the checksum recorded when the store was "
            f"created (spec_sha256); the spec was edited by hand. Rows were written with the original sketch, so "
            f"restore the original spec, or write a new store with the sketch you want."
        )
    data.setdefault("merged_shards", {})
    return data


def check_file(directory: Path, entry: dict[str, Any], *, full: bool) -> None:
    """Check that a data file named by the manifest exists, has its size and (if ``full``) its sha256.

    ``entry`` has keys ``file``, ``bytes`` and ``sha256``.

    Raises:
        StoreCorruptError: missing, truncated, grown or bit-flipped file (the message names it).
    """
    path = directory / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError as err:
        raise StoreCorruptError(
            f"Store file {str(path)!r} named in the manifest is missing; the store is incomplete. "
            f"Restore the file from a backup or rebuild the store."
        ) from err
    if size != entry["bytes"]:
        raise StoreCorruptError(
            f"Store file {str(path)!r} has {size} bytes but the manifest records {entry['bytes']}: "
            f"it is truncated or was overwritten."
        )
    if full:
        digest, _ = file_sha256(path)
        if digest != entry["sha256"]:
            raise StoreCorruptError(
                f"Store file {str(path)!r} fails its sha256 checksum (manifest {entry['sha256'][:12]}…, "
                f"file {digest[:12]}…): its content is corrupted (bit flip or partial overwrite)."
            )


def load_npy(directory: Path, entry: dict[str, Any], *, rows: int, width: int | None, dtype: str) -> np.ndarray:
    """Memory-map a verified ``.npy`` data file and check its shape and dtype against the manifest.

    Raises:
        StoreCorruptError: the header is unreadable or disagrees with the manifest.
    """
    path = directory / entry["file"]
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise StoreCorruptError(f"Store file {str(path)!r} is not a readable .npy array ({err}).") from err
    shape = (rows,) if width is None else (rows, width)
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise StoreCorruptError(
            f"Store file {str(path)!r} holds {array.dtype}{list(array.shape)} but the manifest expects "
            f"{dtype}{list(shape)}."
        )
    return array
