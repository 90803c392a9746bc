"""Spectrum snapshot files: one ``.npz`` per snapshot plus an ``index.json``, loadable without Lightning.

Layout of a snapshot directory (written by :class:`~lightning_sketch.callbacks.HessianSpectrum`)::

    <dirpath>/
      index.json                 {"format": "lightning_sketch.spectrum/v1",
                                  "snapshots": [{"step": 10, "file": "step_00000010.npz",
                                                 "scalars": {"lambda_max": ..., ...}}, ...]}
      step_00000010.npz          one file per snapshot (NumPy, no pickle):
        eigenvalues   [k] float64   Ritz values, descending ("LA")
        residuals     [k] float64   Ritz residual norms |β_m s_{m,i}|
        converged     [k] bool
        eigenvectors  [k, D] float32 sketched eigenvectors (rows; [k, N] for the exact operator)
        ritz_values   [m] float64   all Ritz values (ascending)
        density_grid  [G] float64   SLQ grid (absent when density is off)
        density       [G] float64   SLQ density
        meta          0-d str       JSON: step, sketch spec (or null), scalars, which, num_matvecs, ...

Every file is written to a temporary name and moved into place with ``os.replace``, so a
crash never leaves a half-written snapshot or index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sketch.exceptions import StoreCorruptError, StoreFormatError, StoreNotFoundError

__all__ = [
    "FORMAT",
    "load_index",
    "load_snapshot",
    "save_snapshot",
    "snapshot_name",
    "top_eigenpairs_from_snapshot",
]

FORMAT = "lightning_sketch.spectrum/v1"
INDEX = "index.json"


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


def _atomic_write_bytes(path: Path, writer: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        writer(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_index(dirpath: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The snapshot entries of ``dirpath/index.json`` in step order (``[]`` if there is none).

    Raises:
        StoreCorruptError: if the index is not valid JSON.
        StoreFormatError: if its format tag is not :data:`FORMAT`.
    """
    path = Path(dirpath) / INDEX
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorruptError(f"Spectrum index {path} is not valid JSON ({err}); delete it or restore it.") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise StoreFormatError(f"Spectrum index {path} has format {fmt!r}, expected {FORMAT!r}.")
    return sorted(data.get("snapshots", []), key=lambda e: e["step"])


def save_snapshot(
    dirpath: str | os.PathLike[str],
    step: int,
    arrays: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write one snapshot file and add (or replace) its entry in ``index.json``.

    Args:
        dirpath: the snapshot directory (created if missing).
        step: the training step (global_step) of the snapshot.
        arrays: name -> tensor/array (``eigenvalues``, ``residuals``, ``converged``,
            ``eigenvectors``, ``ritz_values``, optional ``density_grid``/``density``).
        meta: JSON-serialisable metadata; ``meta["scalars"]`` is copied into the index entry.

    Returns:
        The snapshot file's path.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> p = save_snapshot(d, 5, {"eigenvalues": torch.tensor([2.0, 1.0]),
        ...                          "eigenvectors": torch.eye(2)}, {"sketch_spec": None})
        >>> load_snapshot(p)["eigenvalues"].tolist(), [e["step"] for e in load_index(d)]
        ([2.0, 1.0], [5])
    """
    root = Path(dirpath)
    root.mkdir(parents=True, exist_ok=True)
    name = snapshot_name(step)
    meta = {**meta, "step": int(step), "format": FORMAT}
    payload = {k: _np(v) for k, v in arrays.items()}
    if "eigenvectors" in payload:
        payload["eigenvectors"] = payload["eigenvectors"].astype(np.float32)
    payload["meta"] = np.array(json.dumps(meta))
    _atomic_write_bytes(root / name, lambda fh: np.savez(fh, **payload))
    entries = [e for e in load_index(root) if e["step"] != int(step)]
    entries.append({"step": int(step), "file": name, "scalars": meta.get("scalars", {})})
    entries.sort(key=lambda e: e["step"])
    text = json.dumps({"format": FORMAT, "snapshots": entries}, indent=1)
    _atomic_write_bytes(root / INDEX, lambda fh: fh.write(text.encode()))
    return root / name


def load_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one snapshot file: arrays as float64/bool tensors (eigenvectors float32) and ``meta``.

    Raises:
        StoreNotFoundError: if the file does not exist.
        StoreCorruptError: if it cannot be read as a snapshot.
    """
    p = Path(path)
    if not p.is_file():
        raise StoreNotFoundError(f"Spectrum snapshot {p} does not exist; list snapshots with load_index(dirpath).")
    try:
        with np.load(p, allow_pickle=False) as data:
            out: dict[str, Any] = {k: torch.from_numpy(np.array(data[k])) for k in data.files if k != "meta"}
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise StoreCorruptError(f"Spectrum snapshot {p} is unreadable ({err}); delete it and its index entry.") from err
    out["meta"] = meta
    return out


def top_eigenpairs_from_snapshot(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, dict[str, Any] | None]:
    """(eigenvalues ``[k]``, sketched eigenvectors ``[k, D]``, sketch spec) for ``arnoldi_if``.

    ``path`` is a snapshot file, or a snapshot directory (its latest snapshot is used). The
    eigenvectors are those of Φ H Φᵀ (orthonormal rows in R^D); the spec rebuilds Φ with
    ``make(**spec)`` (None for an exact, unsketched snapshot).

    Raises:
        StoreNotFoundError: for a missing file or a directory without snapshots.
        StoreCorruptError: for an unreadable file.
    """
    p = Path(path)
    if p.is_dir():
        entries = load_index(p)
        if not entries:
            raise StoreNotFoundError(f"No spectrum snapshots under {p} (no {INDEX} entries).")
        p = p / entries[-1]["file"]
    snap = load_snapshot(p)
    vals = snap["eigenvalues"].to(torch.float64)
    vecs = snap["eigenvectors"].to(torch.float32)
    return vals, vecs, snap["meta"].get("sketch_spec")
