"""The store manifest: the single JSON file that defines a committed snapshot.

A store directory holds ``manifest.json`` and immutable data files. The manifest lists, for the
current snapshot (``generation``), the sketch ``spec``, the parameter ``layout`` and its
``layout_fingerprint``, the storage ``dtype`` and ``sketch_dim`` D, the checkpoints (name, step,
learning rate η_t, weight, rows, skipped counts), every segment (vectors file and ids file with
row count, byte size and sha256), every persisted FAISS index (kind, params, file, sha256), the
saved weights and the curvature files of the slices (``curvature``: per slice, the ``matrix`` and
``sidecar`` files in the run directory with size and sha256) and the ``run_id`` made when the store
was created (every generation keeps it; a checkpoint and a query result record it with the generation
they saw, so a store of another run or an older copy of this one is refused).
Files not named in the manifest (an interrupted commit's leftovers) are invisible to readers.

Format version 1 is the only one this library reads or writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from lightning_sketch.exceptions import (
    LightningSketchError,
    SketchInputError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
from lightning_sketch.io import safeio as sio
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
    """A fresh, empty manifest (generation 0) with a new ``run_id``, kept by every later generation."""
    return {
        "format": FORMAT_NAME,
        "run_id": sio.new_run_id(),
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
_SHA = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


def _bad(path: Path, what: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{str(path)!r}: {what}; the manifest was edited or corrupted. Restore it from a backup (segment "
        "files are left untouched)."
    )


def _int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(v: Any, none: bool = True) -> bool:
    if v is None:
        return none
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _file_entry(e: Any) -> TypeGuard[dict[str, Any]]:
    """A manifest file entry: a relative path of safe parts (no '..', not absolute), size and sha256."""
    return (isinstance(e, dict) and isinstance(e.get("file"), str)
            and all(_PART.match(p) for p in e["file"].split("/")) and _int(e.get("bytes"))
            and isinstance(e.get("sha256"), str) and bool(_SHA.match(e["sha256"])))


def _validate(data: dict[str, Any], path: Path) -> None:
    """Types, names and file entries of every record (no file is read)."""
    names = []
    for c in data["checkpoints"]:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and _NAME.match(c["name"])
                and c["name"] not in RESERVED and (c.get("step") is None or _int(c["step"]))
                and _num(c.get("lr")) and _num(c.get("weight")) and _int(c.get("rows"))
                and _int(c.get("generation", 0)) and isinstance(c.get("meta", {}), dict)):
            raise _bad(path, f"checkpoint record {str(c)[:200]} is malformed (name, step, lr, weight, rows)")
        names.append(c["name"])
    if len(set(names)) != len(names):
        raise _bad(path, f"checkpoint names {names} repeat")
    for seg in data["segments"]:
        if not (isinstance(seg, dict) and isinstance(seg.get("checkpoint"), str) and _int(seg.get("rank"))
                and _int(seg.get("generation")) and _int(seg.get("rows")) and _file_entry(seg.get("vectors"))
                and _file_entry(seg.get("ids"))):
            raise _bad(
                path,
                f"segment record {str(seg)[:200]} is malformed (checkpoint, rank, generation, rows, files)",
            )
    for key, e in data["indexes"].items():
        if not (isinstance(key, str) and _file_entry(e) and e.get("kind") in ("flat", "ivf", "ivfpq", "hnsw")
                and isinstance(e.get("view"), str) and isinstance(e.get("params"), dict)
                and _int(e.get("rows")) and _int(e.get("generation")) and _int(e.get("data_generation"))
                and key == f"{e['view']}:{e['kind']}"):
            raise _bad(path, f"index record {key!r} is malformed")
    weights = data.get("weights", {}).items() if isinstance(data.get("weights", {}), dict) else [(None, None)]
    for name, e in weights:
        if not (isinstance(name, str) and _NAME.match(name) and _file_entry(e) and _int(e.get("generation"))
                and (e.get("layout_fingerprint") is None or isinstance(e["layout_fingerprint"], str))):
            raise _bad(path, f"weights record {name!r} is malformed")
    curvature = data.get("curvature", {})
    for name, e in curvature.items() if isinstance(curvature, dict) else [(None, None)]:
        if not (isinstance(name, str) and _NAME.match(name) and isinstance(e, dict)
                and _int(e.get("generation")) and all(_file_entry(e.get(p)) for p in ("matrix", "sidecar"))):
            raise _bad(path, f"curvature record {name!r} is malformed")
    for s in data.get("skips", []) if isinstance(data.get("skips", []), list) else [None]:
        if not (isinstance(s, dict) and isinstance(s.get("checkpoint"), str) and _int(s.get("generation"))
                and _int(s.get("nonfinite")) and _int(s.get("duplicates"))
                and isinstance(s.get("ids", []), list)):
            raise _bad(path, f"skip record {str(s)[:200]} is malformed")
    for key in ("merged_shards", "merged_skips"):
        val = data.get(key, {})
        if not isinstance(val, dict) or not all(isinstance(k, str) and _int(v) for k, v in val.items()):
            raise _bad(path, f"field {key!r} is malformed")
    if data.get("checkpointed_generation") is not None and not _int(data["checkpointed_generation"]):
        raise _bad(path, "field 'checkpointed_generation' is malformed")


def _consistent(data: dict[str, Any], path: Path) -> None:
    """Cross-record consistency: segments name known checkpoints, counts add up, generations in range."""
    names = {c["name"] for c in data["checkpoints"]}
    gen = data["generation"]
    for seg in data["segments"]:
        if seg["checkpoint"] not in names:
            raise _bad(
                path,
                f"segment {seg['vectors']['file']!r} belongs to checkpoint {seg['checkpoint']!r}, which the "
                "manifest does not declare",
            )
        if seg["generation"] > gen:
            raise _bad(path, f"segment {seg['vectors']['file']!r} has generation {seg['generation']} > {gen}")
    for c in data["checkpoints"]:
        held = sum(s["rows"] for s in data["segments"] if s["checkpoint"] == c["name"])
        if held != c["rows"]:
            raise StoreCorruptError(
                f"{str(path)!r}: checkpoint {c['name']!r} records {c['rows']} rows but its segments hold "
                f"{held}."
            )
    for e in (list(data["indexes"].values()) + list(data.get("weights", {}).values())
              + [{"file": c["matrix"]["file"], **c} for c in data.get("curvature", {}).values()]):
        if e["generation"] > gen:
            raise _bad(path, f"file {e['file']!r} has generation {e['generation']} > {gen}")


def load_manifest(directory: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Read and validate ``<directory>/manifest.json``.

    Checks, in order: the format tag and version, the type of every field and record (checkpoint
    names, finite learning rates, relative file paths without ``..``), the recorded spec checksum
    and, when ``strict``, the cross-record consistency (segments of declared checkpoints, row
    counts) and the manifest's own sha256 (field ``sha256``), so no edit or flipped byte goes
    unnoticed. ``strict=False`` (used by :func:`~lightning_sketch.store.inspect_store` to describe
    a damaged store) skips the last two.

    Raises:
        StoreNotFoundError: the directory or its manifest does not exist.
        StoreCorruptError: the manifest is not valid JSON, misses or mistypes fields, is inconsistent
            or fails its checksum.
        StoreFormatError: the manifest was written by another (newer or unknown) format version.
        UnsafeFileError: the manifest is a device, a FIFO or a symlink leaving the directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(
            f"No sketch store at {str(directory)!r} (directory missing); create one with SketchStore.create."
        )
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise StoreNotFoundError(
            f"No sketch store at {str(directory)!r}: {MANIFEST!r} is missing. If this directory held a "
            "store, its manifest was deleted and the store cannot be read; otherwise create one with "
            "SketchStore.create."
        )
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise StoreCorruptError(
            f"{str(path)!r} is not a lightning_sketch store manifest (bad 'format' field)."
        )
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
        raise StoreCorruptError(
            f"{str(path)!r}: field 'spec' must be a dict or null, got {spec!r}; the manifest was edited."
        )
    if "spec_sha256" in data and data["spec_sha256"] != spec_sha256(spec):
        raise StoreCorruptError(
            f"{str(path)!r}: the sketch spec {spec!r} does not match the checksum recorded when the store "
            "was created (spec_sha256); the spec was edited by hand. Rows were written with the original "
            "sketch, so restore the original spec, or write a new store with the sketch you want."
        )
    if not _int(data["generation"]) or data["sketch_dim"] < 1 or not (
        data.get("layout_fingerprint") is None or isinstance(data["layout_fingerprint"], str)
    ) or not (data.get("layout") is None or isinstance(data["layout"], dict)):
        raise _bad(path, "field 'generation', 'sketch_dim' or 'layout' is out of range")
    sio.check_run_id(data.get("run_id"), path=path, what="store manifest")
    _validate(data, path)
    if strict:
        _consistent(data, path)
        data = sio.verify_checked(data, path=path, what="store manifest")
    else:
        data.pop(sio.CHECKSUM_KEY, None)
    data.setdefault("merged_shards", {})
    return data


def read_generation(directory: Path) -> Any:
    """The ``generation`` field of the manifest on disk now (None if it cannot be read)."""
    try:
        data = read_json(Path(directory) / MANIFEST)
    except LightningSketchError:
        return None
    return data.get("generation") if isinstance(data, dict) else None


#: a file whose content or inode changed less than this long before it was hashed is hashed again
#: at every check: a later in-place write within the file system's timestamp granularity could
#: leave its change time as it was.
RACY_NS = 2_000_000_000

#: files this process hashed and found matching: (real path, sha256) → (device, inode, size,
#: mtime_ns, ctime_ns) as they were when hashed.
_HASHED: dict[tuple[str, str], tuple[int, int, int, int, int]] = {}


def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_file(directory: Path, entry: dict[str, Any], *, full: bool, cached: bool = True) -> None:
    """Check that a data file named by the manifest exists, has its size and (if ``full``) its sha256.

    ``entry`` has keys ``file``, ``bytes`` and ``sha256``. The file must resolve inside
    ``directory`` and be a regular file (never a device or FIFO, which could hang a reader).

    A file is hashed once per process: with ``cached``, a file this process already found to match
    the same sha256 is not hashed again while its device, inode, size, mtime and ctime are unchanged
    and it had not changed for :data:`RACY_NS` before that hash (any write or replacement since
    moves its ctime or inode). ``cached=False`` always hashes.

    Raises:
        StoreCorruptError: missing, truncated, grown or bit-flipped file (the message names it).
        UnsafeFileError: the entry points outside the store, or at a non-regular file.
    """
    path = directory / entry["file"]
    real = sio.confined(directory, entry["file"], what="store file")
    try:
        fd = sio.open_regular(real, what="store file")
    except StoreNotFoundError as err:
        raise StoreCorruptError(
            f"Store file {str(path)!r} named in the manifest is missing; the store is incomplete. "
            f"Restore the file from a backup or rebuild the store."
        ) from err
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_size != entry["bytes"]:
        raise StoreCorruptError(
            f"Store file {str(path)!r} has {st.st_size} bytes but the manifest records {entry['bytes']}: "
            f"it is truncated or was overwritten."
        )
    if not full:
        return
    key, sig = (str(real), str(entry["sha256"])), _signature(st)
    if cached and _HASHED.get(key) == sig:
        return
    _HASHED.pop(key, None)
    started = time.time_ns()
    digest, _ = file_sha256(real)
    if digest != entry["sha256"]:
        raise StoreCorruptError(
            f"Store file {str(path)!r} fails its sha256 checksum (manifest {entry['sha256'][:12]}…, "
            f"file {digest[:12]}…): its content is corrupted (bit flip or partial overwrite)."
        )
    if max(sig[3], sig[4]) < started - RACY_NS and _signature(os.stat(real)) == sig:
        _HASHED[key] = sig


def load_npy(
    directory: Path, entry: dict[str, Any], *, rows: int, width: int | None, dtype: str
) -> np.ndarray:
    """Memory-map a verified ``.npy`` data file and check its shape and dtype against the manifest.

    Raises:
        StoreCorruptError: the header is unreadable or disagrees with the manifest.
    """
    path = directory / entry["file"]
    real = sio.confined(directory, entry["file"], what="store file")
    os.close(sio.open_regular(real, what="store file"))
    try:
        array = np.load(real, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError, KeyError, SyntaxError, MemoryError) as err:
        raise StoreCorruptError(f"Store file {str(path)!r} is not a readable .npy array ({err}).") from err
    shape = (rows,) if width is None else (rows, width)
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise StoreCorruptError(
            f"Store file {str(path)!r} holds {array.dtype}{list(array.shape)} but the manifest expects "
            f"{dtype}{list(shape)}."
        )
    return array
