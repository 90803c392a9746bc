"""Sketched curvature kernels for influence, gathered during fit: their files and their accumulation.

Every kernel is a ``[D, D]`` second moment K = Σ_t w φ_t φ_tᵀ of per-example sketched gradients
φ_t = Φ∇k_t, independent of N and of T; the functions k are the task's
(:mod:`lightning_sketch.attribution.task`), and the sidecar's ``estimator`` names them:

- ``"margin-logits"`` / ``"margin"``: TRAK's margin kernel (Park et al. 2023), k = the margin
  log p_y − log(1 − p_y) of a classifier's logits / the module's ``per_example_margin``. For the
  cross-entropy the stored loss gradient is g_t = −(1 − p_t)∇m_t, so TRAK's score
  φ(z)ᵀ(Σφφᵀ)⁻¹φ_t(1 − p_t) is q(z)ᵀ(K + λI)⁻¹g_t: the rows carry TRAK's out-to-loss weighting
  and only the kernel has to be gathered.
- ``"gauss-newton"``: k = each output f_o of a regression (the Gauss–Newton matrix Σ∇f∇fᵀ, TRAK's
  kernel for a scalar output); ``"gauss-newton-sampled"``: the softmax Gauss–Newton of a language
  model, E_ŷ[ĝĝᵀ] = Σ_positions Jᵀ(diag p − ppᵀ)J estimated from completions drawn from the model.
- ``"sampled"``: the Fisher of labels sampled from the model (``curvature="fisher"``; Martens 2020,
  §9; the curvature of Kronfluence's EK-FAC, Grosse et al. 2023).
- ``"empirical..."``: the empirical Fisher Σ g gᵀ of the stored loss gradients, for tasks that were
  not recognised; it vanishes on well-fitted examples (Kunstner et al. 2019).

Files: one ``<run>/curvature/<slice>-<token>.npy`` (float64 ``[D, D]``, written with
``allow_pickle=False``) per checkpoint slice, and ``<run>/curvature/<slice>-<token>.json`` with the
slice name, sketch spec,
number of examples, the estimator and the SHA-256 of the ``.npy`` bytes, both written atomically
through :mod:`lightning_sketch.io.safeio` and recorded with their size and SHA-256 in the run's store
manifest (:meth:`~lightning_sketch.store.SketchStore.record_curvature`), committed with the slice;
``<token>`` is fresh for every write, so writing a slice's curvature again never replaces the files
of the committed record before the new one is committed.
:func:`read_curvature` treats both as untrusted: only files the manifest lists are read (a file it
does not list, left by a killed run, is ignored; one it lists but that is missing or changed is
refused), confined to the run directory, regular files only, size capped, shape, symmetry and
finiteness verified, typed errors otherwise.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sketch.attribution._stored import STORE_DIR
from lightning_sketch.exceptions import (
    RunMismatchError,
    SketchConfigError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreWriteError,
)
from lightning_sketch.io.safeio import atomic_write, read_json_bytes, sha256_bytes
from lightning_sketch.store import SketchStore

__all__ = [
    "CURVATURE_DIR",
    "CURVATURE_KINDS",
    "accumulate_fisher",
    "curvature_estimator",
    "curvature_slices",
    "is_margin_estimator",
    "kernel_kind",
    "read_curvature",
    "write_curvature",
]

#: sub-folder of a GradientSketch run directory holding the per-slice curvature files.
CURVATURE_DIR = "curvature"
_FORMAT = "lightning_sketch.curvature/v1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: JSON sidecars are tiny; a larger file is refused before parsing.
_JSON_CAP = 1 << 16

LossFn = Callable[[nn.Module, Any], Tensor]


def accumulate_fisher(
    sketched: Iterable[Tensor], sketch_dim: int, out: Tensor | None = None
) -> tuple[Tensor, int]:
    """Σ_t s_t s_tᵀ over sketched gradients ``[B, D]`` chunks: ``([D, D] float64, count)``.

    Example:
        >>> f, n = accumulate_fisher([torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])], 2)
        >>> f.tolist(), n
        ([[1.0, 2.0], [2.0, 5.0]], 2)
    """
    acc = torch.zeros(sketch_dim, sketch_dim, dtype=torch.float64) if out is None else out
    n = 0
    for s in sketched:
        s = s.detach().to("cpu", torch.float64)
        s = s[torch.isfinite(s).all(dim=1)]
        acc.addmm_(s.T, s)
        n += int(s.shape[0])
    return acc, n


# ---------------------------------------------------------------------------- files
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise StoreCorruptError(
            f"Invalid curvature slice name {name!r}: only letters, digits, '_', '.', '-'."
        )
    return name


def write_curvature(
    run_dir: str | Path, name: str, matrix: Tensor, count: int, spec: Mapping[str, Any], estimator: str,
    task: str | None = None, store: Any = None,
) -> Path:
    """Write one slice's ``[D, D]`` curvature and its sidecar atomically and record both in the store's
    manifest; returns the .npy path.

    Args:
        store: the run's writable :class:`~lightning_sketch.store.SketchStore` (``<run_dir>/store``):
            the files are recorded in it and committed with its next :meth:`commit`, and its lock and
            generation are checked right before each file is renamed into place. ``None`` opens
            ``<run_dir>/store`` for writing, records and commits at once (the store must not be held
            by another writer).

    Raises:
        StoreWriteError: when the files cannot be written (disk full, permissions): nothing partial stays.
        StoreConflictError: another writer took the store's lock or committed meanwhile; nothing of
            this slice is renamed into place after that.
        UnsafeFileError: ``<run_dir>/curvature`` is a symlink.
        StoreNotFoundError: ``store`` is ``None`` and ``<run_dir>/store`` holds no store.
    """
    name = _check_name(name)
    if store is None:
        with SketchStore.open(Path(run_dir) / STORE_DIR, mode="a", verify="size") as own:
            path = write_curvature(run_dir, name, matrix, count, spec, estimator, task=task, store=own)
            own.commit()
        return path
    folder = Path(run_dir) / CURVATURE_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreWriteError(f"Could not create {folder} ({err}).") from err
    m = matrix.detach().to("cpu", torch.float64)
    m = 0.5 * (m + m.T)
    buf = io.BytesIO()
    np.save(buf, m.numpy(), allow_pickle=False)
    check = store.check_writer
    stem = f"{name}-{secrets.token_hex(4)}"  # fresh names: a committed record's files are never replaced
    npy, side = folder / f"{stem}.npy", folder / f"{stem}.json"
    digest, size = atomic_write(npy, [buf.getvalue()], what="curvature matrix", root=run_dir,
                                before_replace=check)
    meta = {
        "format": _FORMAT,
        "slice": name,
        "count": int(count),
        "estimator": str(estimator),
        "task": None if task is None else str(task),
        "dim": int(m.shape[0]),
        "spec": dict(spec),
        "sha256": digest,
        "run_id": store.run_id,  # the store's: a sidecar recorded by another run's manifest is refused
    }
    side_sha, side_size = atomic_write(side, [json.dumps(meta, sort_keys=True).encode()],
                                       what="curvature sidecar", root=run_dir, before_replace=check)
    store.record_curvature(name, {"matrix": (npy, digest, size), "sidecar": (side, side_sha, side_size)})
    return npy


def _run_store(run_dir: str | Path, store: Any) -> Any:
    """The store whose manifest lists the run's curvature files (``None``: the run has no store)."""
    if store is not None:
        return store
    path = Path(run_dir) / STORE_DIR
    if not (path / "manifest.json").exists():
        return None
    return SketchStore.open(path, verify="size")


def curvature_slices(run_dir: str | Path, store: Any = None) -> list[str]:
    """Names of the slices whose curvature the run's store records (sorted; files it does not list are
    ignored). ``store`` defaults to ``<run_dir>/store``."""
    st = _run_store(run_dir, store)
    return [] if st is None else list(st.curvature_slices)


def _verified_sidecar(
    run_dir: str | Path, name: str, store: Any
) -> tuple[Any, Path, dict[str, Any]] | None:
    """``(store, path, sidecar)`` of a recorded slice, checked against the manifest (``None``: unrecorded)."""
    st = _run_store(run_dir, store)
    if st is None or not st.has_curvature(name):
        return None
    side, raw = st.curvature_bytes(name, "sidecar")
    if len(raw) > _JSON_CAP:
        raise StoreCorruptError(f"{side} holds more than {_JSON_CAP} bytes; it is not a curvature sidecar.")
    meta = read_json_bytes(raw, path=side, what="curvature sidecar")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("slice") != name:
        raise StoreCorruptError(f"{side} is not the curvature sidecar of slice {name!r}.")
    if meta.get("run_id") != st.run_id:
        raise RunMismatchError(
            f"Curvature sidecar {side} was written by run {meta.get('run_id')!r}, but the store that records "
            f"it belongs to run {st.run_id!r}: the curvature files (and their manifest entry) come "
            "from another "
            "run. Restore this run's curvature folder and store together."
        )
    return st, side, meta


def read_curvature(
    run_dir: str | Path, name: str, spec: Mapping[str, Any], store: Any = None
) -> tuple[Tensor, dict[str, Any]]:
    """Read and verify one slice's curvature: ``([D, D] float64, metadata)``.

    Both files must be the ones the store's manifest records (size and sha256); ``store`` defaults to
    ``<run_dir>/store`` opened read-only.

    Raises:
        StoreNotFoundError: when the store records no curvature for the slice (a file on disk that the
            manifest does not list is ignored), or the run has no store.
        StoreCorruptError: a recorded file is missing or fails its checksum (the message names it); or
            a format, shape, spec, symmetry or finiteness mismatch.
        UnsafeFileError: for a path that is not a regular file inside the run directory.
    """
    name = _check_name(name)
    found = _verified_sidecar(run_dir, name, store)
    if found is None:
        raise StoreNotFoundError(
            f"The run {str(run_dir)!r} records no curvature for slice {name!r} in its store's manifest; "
            "re-run GradientSketch with curvature enabled."
        )
    st, side, meta = found
    dim = meta.get("dim")
    if not isinstance(dim, int) or not 1 <= dim <= 1 << 16:
        raise StoreCorruptError(f"{side} has an invalid dim {dim!r}.")
    if dict(meta.get("spec") or {}) != dict(spec):
        raise StoreCorruptError(
            f"The curvature of slice {name!r} was sketched with {meta.get('spec')}, the store with "
            f"{dict(spec)}; "
            f"it belongs to another run."
        )
    path, data = st.curvature_bytes(name, "matrix")
    if len(data) > dim * dim * 8 + 4096 or sha256_bytes(data) != meta.get("sha256"):
        raise StoreCorruptError(
            f"{path} fails its SHA-256 check against {side}: the file was changed or damaged."
        )
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise StoreCorruptError(f"{path} is not a numpy array file ({err}).") from err
    if arr.dtype != np.float64 or arr.shape != (dim, dim):
        raise StoreCorruptError(f"{path} holds {arr.dtype} {arr.shape}, expected float64 ({dim}, {dim}).")
    m = torch.from_numpy(np.array(arr))
    if not bool(torch.isfinite(m).all()) or not torch.allclose(m, m.T):
        raise StoreCorruptError(f"{path} is not a finite symmetric matrix.")
    count = meta.get("count")
    if not isinstance(count, int) or count < 0 or float(m.trace()) < 0:
        raise StoreCorruptError(f"{side} has an invalid count or trace.")
    return m, meta


#: the values of ``GradientSketch(curvature=...)``.
CURVATURE_KINDS = ("auto", "margin", "fisher", "none")


def check_curvature_arg(curvature: str) -> str:
    """Validate the ``curvature`` argument of the callback (one of :data:`CURVATURE_KINDS`)."""
    if curvature not in CURVATURE_KINDS:
        raise SketchConfigError(f"`curvature` must be one of {CURVATURE_KINDS}, got {curvature!r}.")
    return curvature


def kernel_kind(estimator: Any) -> str | None:
    """The kernel a sidecar's ``estimator`` names: ``"margin"`` (``margin``, ``margin-logits``),
    ``"gauss-newton"`` (``gauss-newton``, ``gauss-newton-sampled``), ``"fisher"`` (``sampled``),
    ``"empirical"`` (``empirical...``); ``None`` for no file or an unknown name.

    Example:
        >>> [kernel_kind(e) for e in ("margin-logits", "gauss-newton-sampled", "sampled", None)]
        ['margin', 'gauss-newton', 'fisher', None]
    """
    if not isinstance(estimator, str):
        return None
    if estimator.startswith("margin"):
        return "margin"
    if estimator.startswith("gauss-newton"):
        return "gauss-newton"
    if estimator == "sampled":
        return "fisher"
    if estimator.startswith("empirical"):
        return "empirical"
    return None


def is_margin_estimator(estimator: Any) -> bool:
    """Whether a sidecar's ``estimator`` names TRAK's margin kernel (else a Fisher estimate)."""
    return isinstance(estimator, str) and estimator.startswith("margin")


def curvature_estimator(run_dir: str | Path, name: str, store: Any = None) -> str | None:
    """The ``estimator`` in slice ``name``'s sidecar, or ``None`` when the store records no curvature for it.

    Reads only the small JSON sidecar, checked against the manifest; :func:`read_curvature` verifies
    the matrix. ``store`` defaults to ``<run_dir>/store``.

    Raises:
        StoreCorruptError: the recorded sidecar is missing, fails its checksum or is not a sidecar.
    """
    name = _check_name(name)
    found = _verified_sidecar(run_dir, name, store)
    if found is None:
        return None
    _, side, meta = found
    estimator = meta.get("estimator")
    if not isinstance(estimator, str):
        raise StoreCorruptError(f"{side} is not a curvature sidecar.")
    return estimator
