"""Spectrum snapshot files: one ``.npz`` per snapshot plus an ``index.json``, loadable without Lightning.

Layout of a snapshot directory (written by :class:`~lightning_sketch.callbacks.HessianSpectrum`)::

    <dirpath>/
      index.json                 {"format": "lightning_sketch.spectrum/v1", "generation": 3,
                                  "snapshots": [{"step": 10, "file": "step_00000010.npz",
                                                 "bytes": 4242, "sha256": "...",
                                                 "scalars": {"lambda_max": ..., ...}}, ...],
                                  "sha256": "<sha256 of this document without this field>"}
      step_00000010.npz          one file per snapshot (NumPy, no pickle):
        eigenvalues   [k] float64   Ritz values, descending ("LA")
        residuals     [k] float64   Ritz residual norms |β_m s_{m,i}|
        converged     [k] bool
        eigenvectors  [k, D] float32 sketched eigenvectors (rows; [k, N] for the exact operator)
        ritz_values   [m] float64   all Ritz values (ascending)
        density_grid  [G] float64   SLQ grid (absent when density is off)
        density       [G] float64   SLQ density
        meta          0-d str       JSON: step, sketch spec (or null), scalars, which, num_matvecs, ...
      .writer.lock               held by the one process writing this directory

Integrity: the index is self-checksummed and records each snapshot's size and sha256, so a
flipped byte, a truncated file or a snapshot swapped in from another step or run is refused
with :class:`~lightning_sketch.exceptions.StoreCorruptError` naming the file. The index and every
snapshot's ``meta`` record the ``run_id`` made when the index was first written (kept on resume); a
snapshot whose run id differs from its index's is refused (``RunMismatchError``). Every file is
written through a fresh ``O_EXCL`` temporary file and ``os.replace`` (never through a planted
symlink; disk full leaves no debris), and one :class:`SnapshotWriter` per directory holds an
exclusive lock and checks the index generation before each publish, so two runs into one
directory never interleave.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sketch.exceptions import (
    LightningSketchError,
    RunMismatchError,
    StoreConflictError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
    StoreWriteError,
)
from lightning_sketch.io import safeio as sio

__all__ = [
    "FORMAT",
    "SnapshotWriter",
    "index_run",
    "load_index",
    "load_snapshot",
    "save_snapshot",
    "snapshot_name",
    "top_eigenpairs_from_snapshot",
]

FORMAT = "lightning_sketch.spectrum/v1"
INDEX = "index.json"
_FILE = re.compile(r"^step_\d{8,}\.npz$")
#: the files written atomically into a spectrum directory: the index, the snapshots and HessianSpectrum's
#: plot; only their temporary files are swept (the directory is the user's ``dirpath``).
_OWN_FILES = re.compile(r"index\.json|step_\d{8,}\.npz|spectrum\.png")
#: largest snapshot file read without an index entry giving its size (k x D float32 eigenvectors).
SNAPSHOT_CAP = 4 << 30


def snapshot_name(step: int) -> str:
    """File name of the snapshot at ``step`` (``step_00000010.npz``)."""
    return f"step_{int(step):08d}.npz"


def _np(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            x = x.real
        return x.numpy()
    return np.asarray(x)


def _entry_ok(e: Any) -> bool:
    """A well-formed snapshot entry of the index (step, file, bytes, sha256, scalars)."""
    return (
        isinstance(e, dict) and isinstance(e.get("step"), int) and not isinstance(e["step"], bool)
        and e["step"] >= 0 and e.get("file") == snapshot_name(e["step"]) and isinstance(e.get("sha256"), str)
        and isinstance(e.get("bytes"), int) and isinstance(e.get("scalars", {}), dict)
    )


def _read_index(root: Path) -> tuple[int, list[dict[str, Any]]]:
    """``(generation, entries)`` of ``root/index.json`` (``(0, [])`` if absent), verified."""
    gen, entries, _ = _read_index_run(root)
    return gen, entries


def index_run(dirpath: str | os.PathLike[str]) -> tuple[int, str | None]:
    """``(generation, run_id)`` of ``dirpath/index.json`` (``(0, None)`` if there is none), verified.

    Raises:
        StoreCorruptError / StoreFormatError / UnsafeFileError: see :func:`load_index`.
    """
    gen, _, run_id = _read_index_run(Path(dirpath))
    return gen, run_id


def _read_index_run(root: Path) -> tuple[int, list[dict[str, Any]], str | None]:
    """``(generation, entries, run_id)`` of ``root/index.json`` (``(0, [], None)`` if absent), verified."""
    path = root / INDEX
    if not os.path.lexists(path):
        return 0, [], None
    data = sio.read_json(sio.confined(root, INDEX, what="spectrum index"), what="spectrum index")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise StoreFormatError(f"Spectrum index {path} has format {fmt!r}, expected {FORMAT!r}.")
    body = sio.verify_checked(data, path=path, what="spectrum index")
    entries, gen = body.get("snapshots"), body.get("generation", 0)
    if (
        not isinstance(entries, list)
        or not isinstance(gen, int)
        or isinstance(gen, bool)
        or not all(_entry_ok(e) for e in entries)
        or len({e["step"] for e in entries}) != len(entries)
    ):
        raise StoreCorruptError(
            f"Spectrum index {path} has malformed snapshot entries (step, file, bytes, sha256); it was "
            "edited. Restore it from the run that wrote it."
        )
    run_id = sio.check_run_id(body.get(sio.RUN_ID_KEY), path=path, what="spectrum index")
    return gen, sorted(entries, key=lambda e: e["step"]), run_id


def load_index(dirpath: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The verified snapshot entries of ``dirpath/index.json`` in step order (``[]`` if there is none).

    Each entry has ``step``, ``file``, ``bytes``, ``sha256`` and ``scalars``.

    Raises:
        StoreCorruptError: the index is not valid JSON, fails its checksum or is malformed.
        StoreFormatError: its format tag is not :data:`FORMAT`.
        UnsafeFileError: it is a link out of ``dirpath``, a device or a FIFO.
    """
    return _read_index(Path(dirpath))[1]


class SnapshotWriter:
    """The single writer of a snapshot directory: holds ``.writer.lock`` until :meth:`close`.

    Args:
        dirpath: the snapshot directory (created if missing).

    Raises:
        StoreWriteError: another process writes this directory, or it cannot be created.
        StoreCorruptError / StoreFormatError: an existing index is damaged.

    Example:
        >>> import tempfile
        >>> w = SnapshotWriter(tempfile.mkdtemp())
        >>> p = w.write(3, {"eigenvalues": torch.tensor([1.0])}, {"sketch_spec": None})
        >>> w.close(); p.name
        'step_00000003.npz'
    """

    def __init__(self, dirpath: str | os.PathLike[str]) -> None:
        self.root = Path(dirpath)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create the spectrum directory {str(self.root)!r}: {err}.") from err
        self._lock: sio.DirLock | None = sio.DirLock(self.root, what="spectrum snapshot directory")
        try:
            self._generation, _, run_id = _read_index_run(self.root)
            sio.sweep_temp_files(self.root, _OWN_FILES)  # left by a killed writer; the lock is ours now
        except LightningSketchError:
            self.close()
            raise
        #: the id recorded in the index and in every snapshot: kept from an existing index, else new.
        self.run_id: str = run_id or sio.new_run_id()

    @property
    def generation(self) -> int:
        """The generation of the index this writer last read or wrote."""
        return self._generation

    def write(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write one snapshot file and add (or replace) its entry in ``index.json``.

        See :func:`save_snapshot`.

        Raises:
            StoreConflictError: the index changed on disk since this writer last wrote it, or the lock
                file was replaced (another writer got in); nothing is published.
            StoreWriteError: disk full or another write error; no temporary file is left.
        """
        gen, entries = self._check()
        name = snapshot_name(step)
        meta = {**meta, "step": int(step), "format": FORMAT, sio.RUN_ID_KEY: self.run_id}
        payload = {k: _np(v) for k, v in arrays.items()}
        if "eigenvectors" in payload:
            payload["eigenvectors"] = payload["eigenvectors"].astype(np.float32)
        payload["meta"] = np.array(json.dumps(meta, allow_nan=True))
        buf = io.BytesIO()
        # numpy's stub lets `**payload` fill savez's keyword `allow_pickle: bool`; the keys are array names.
        np.savez(buf, **payload)  # type: ignore[arg-type]
        sha, size = sio.atomic_write(self.root / name, [buf.getbuffer()], what="spectrum snapshot",
                                     before_replace=self._check)
        entries = [e for e in entries if e["step"] != int(step)]
        entries.append({"step": int(step), "file": name, "bytes": size, "sha256": sha,
                        "scalars": _finite(meta.get("scalars", {}))})
        entries.sort(key=lambda e: e["step"])
        doc = {"format": FORMAT, "generation": gen + 1, "snapshots": entries, sio.RUN_ID_KEY: self.run_id}
        sio.atomic_write(self.root / INDEX, [sio.dump_checked_json(doc)], what="spectrum index",
                         before_replace=self._check)
        self._generation = gen + 1
        return self.root / name

    def _check(self) -> tuple[int, list[dict[str, Any]]]:
        """``(generation, entries)`` of the index on disk, after checking that this writer may still publish:
        its lock file is the one it took and the index is at the generation it last wrote. Run before a
        snapshot is written and again right before each rename (snapshot file, then index).

        Raises:
            StoreWriteError: the writer is closed. StoreConflictError: another writer got in.
        """
        if self._lock is None:
            raise StoreWriteError(f"The snapshot writer of {str(self.root)!r} is closed.")
        self._lock.check()
        gen, entries = _read_index(self.root)
        if gen != self._generation:
            raise StoreConflictError(
                f"Spectrum index {str(self.root / INDEX)!r} moved from generation {self._generation} to "
                f"{gen} behind this writer: another run writes this directory. Nothing was published; give "
                "each run its own dirpath."
            )
        return gen, entries

    def close(self) -> None:
        """Release the directory lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _finite(scalars: Any) -> Any:
    """Scalars for the JSON index: NaN/inf become None (JSON has no such numbers)."""
    if not isinstance(scalars, dict):
        return {}
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in scalars.items()}


def save_snapshot(
    dirpath: str | os.PathLike[str],
    step: int,
    arrays: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write one snapshot file and add (or replace) its entry in ``index.json`` (locks the directory).

    Args:
        dirpath: the snapshot directory (created if missing).
        step: the training step (global_step) of the snapshot.
        arrays: name -> tensor/array (``eigenvalues``, ``residuals``, ``converged``,
            ``eigenvectors``, ``ritz_values``, optional ``density_grid``/``density``).
        meta: JSON-serialisable metadata; ``meta["scalars"]`` is copied into the index entry.

    Returns:
        The snapshot file's path.

    Raises:
        StoreWriteError: another process writes the directory, or disk full (no debris left).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> p = save_snapshot(d, 5, {"eigenvalues": torch.tensor([2.0, 1.0]),
        ...                          "eigenvectors": torch.eye(2)}, {"sketch_spec": None})
        >>> load_snapshot(p)["eigenvalues"].tolist(), [e["step"] for e in load_index(d)]
        ([2.0, 1.0], [5])
    """
    writer = SnapshotWriter(dirpath)
    try:
        return writer.write(step, arrays, meta)
    finally:
        writer.close()


def load_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one snapshot file: arrays as float64/bool tensors (eigenvectors float32) and ``meta``.

    When the file's directory has an ``index.json``, the file must be listed there and match the
    recorded size and sha256 (a flipped, truncated or swapped-in snapshot is refused); the
    snapshot's own ``meta["step"]`` must match its file name.

    Raises:
        StoreNotFoundError: if the file does not exist.
        StoreCorruptError: if it cannot be read as a snapshot, fails its checksum, or is not the
            snapshot its name and index say.
        UnsafeFileError: a link out of its directory, a device or a FIFO.
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise StoreNotFoundError(
            f"Spectrum snapshot {p} does not exist; list snapshots with load_index(dirpath)."
        )
    root = p.parent
    real = sio.confined(root, p.name, what="spectrum snapshot")
    _, entries, run_id = _read_index_run(root)
    entry = next((e for e in entries if e["file"] == p.name), None)
    if entries and entry is None:
        raise StoreCorruptError(
            f"Spectrum snapshot {p} is not listed in {root / INDEX}; it does not belong to this run."
        )
    raw = sio.read_capped(real, entry["bytes"] if entry else SNAPSHOT_CAP, what="spectrum snapshot")
    if entry is not None and (len(raw) != entry["bytes"] or sio.sha256_bytes(raw) != entry["sha256"]):
        raise StoreCorruptError(
            f"Spectrum snapshot {p} fails its checksum in {INDEX} ({len(raw)} bytes, index records "
            f"{entry['bytes']}): it is truncated, corrupted or was swapped in from another step or run. "
            "Delete it or restore it."
        )
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            out: dict[str, Any] = {k: torch.from_numpy(np.array(data[k])) for k in data.files if k != "meta"}
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error, RuntimeError,
            NotImplementedError, UnicodeDecodeError, MemoryError) as err:
        raise StoreCorruptError(
            f"Spectrum snapshot {p} is unreadable ({err}); delete it and its index entry."
        ) from err
    _check_snapshot(p, out, meta, entry)
    if entry is not None and meta.get(sio.RUN_ID_KEY) != run_id:
        raise RunMismatchError(
            f"Spectrum snapshot {p} was written by run {meta.get(sio.RUN_ID_KEY)!r}, but "
            f"{root / INDEX} belongs "
            f"to run {run_id!r}: the index or the snapshot was swapped in from another run. Restore the "
            "directory from one run."
        )
    out["meta"] = meta
    return out


def _check_snapshot(p: Path, arrays: dict[str, Tensor], meta: Any, entry: dict[str, Any] | None) -> None:
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format", FORMAT) != FORMAT or (
        _FILE.match(p.name) and step != int(p.name[5:-4])
    ) or (entry is not None and step != entry["step"]):
        raise StoreCorruptError(
            f"Spectrum snapshot {p} records step {step!r}, not the step of its name/index entry: it was "
            "renamed or swapped in. Delete it or restore the original."
        )
    vals = arrays.get("eigenvalues")
    if vals is None or vals.ndim != 1:
        raise StoreCorruptError(f"Spectrum snapshot {p} has no 1-D `eigenvalues` array.")
    vecs = arrays.get("eigenvectors")
    if vecs is not None and (vecs.ndim != 2 or vecs.shape[0] != len(vals)):
        raise StoreCorruptError(
            f"Spectrum snapshot {p}: eigenvectors {tuple(vecs.shape)} do not match {len(vals)} eigenvalues."
        )


def top_eigenpairs_from_snapshot(path: str | os.PathLike[str], with_meta: bool = False) -> tuple[Any, ...]:
    """(eigenvalues ``[k]``, sketched eigenvectors ``[k, D]``, sketch spec) for ``arnoldi_if``.

    With ``with_meta=True`` the snapshot's metadata dict (step, ``layout_fingerprint``, ...) is
    returned as a fourth element.

    ``path`` is a snapshot file, or a snapshot directory (its latest snapshot is used). The
    eigenvectors are those of Φ H Φᵀ (orthonormal rows in R^D); the spec rebuilds Φ with
    ``make(**spec)`` (None for an exact, unsketched snapshot).

    Raises:
        StoreNotFoundError: for a missing file or a directory without snapshots.
        StoreCorruptError: for an unreadable, corrupted or swapped file.
    """
    p = Path(path)
    if p.is_dir():
        entries = load_index(p)
        if not entries:
            raise StoreNotFoundError(f"No spectrum snapshots under {p} (no {INDEX} entries).")
        p = p / entries[-1]["file"]
    snap = load_snapshot(p)
    if "eigenvectors" not in snap:
        raise StoreCorruptError(f"Spectrum snapshot {p} holds no eigenvectors.")
    vals = snap["eigenvalues"].to(torch.float64)
    vecs = snap["eigenvectors"].to(torch.float32)
    if with_meta:
        return vals, vecs, snap["meta"].get("sketch_spec"), dict(snap["meta"])
    return vals, vecs, snap["meta"].get("sketch_spec")
