"""Boundary checks of the store API: example ids, vectors, queries, specs and layouts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from lightning_sketch.exceptions import (
    LayoutMismatchError,
    NonFiniteGradientError,
    SketchConfigError,
    SketchInputError,
    SketchMismatchError,
)

__all__ = ["as_ids", "as_rows", "finite_rows", "layout_info", "spec_dict", "compare_spec", "compare_layout"]

_INT64_MAX = np.iinfo(np.int64).max


def finite_rows(ids: np.ndarray, rows: np.ndarray, policy: str, where: str) -> np.ndarray:
    """The one non-finite row check: ``bool[n]``, True for rows of ``rows [n, D]`` without NaN/inf.

    Used by :meth:`SketchStore.append` (which drops and counts the others in the manifest) and by the
    :class:`~lightning_sketch.callbacks.GradientSketch` callback (which raises at the training step).

    Raises:
        NonFiniteGradientError: some row is non-finite and ``policy == "raise"``; the message names
            up to five example ids and ``where`` (e.g. ``"at step 2"``).
    """
    finite = np.isfinite(rows).all(axis=1)
    if policy == "raise" and not finite.all():
        raise NonFiniteGradientError(
            f"{int((~finite).sum())} row(s) are NaN/inf (non-finite per-example gradients) for example ids "
            f"{np.asarray(ids)[~finite][:5].tolist()} {where}; fix the loss/data or pass nan_policy='skip' "
            "to drop and count them."
        )
    return finite


def as_ids(ids: Any, name: str = "ids") -> np.ndarray:
    """Example ids as a 1-D int64 array; ids must be integers in ``[0, 2**63 - 1]``.

    Raises:
        SketchInputError: non-integer (float, bool, str) ids, ids outside int64, negative ids
            (FAISS reserves -1 for "no result"), or a non-1-D shape.

    Example:
        >>> as_ids([3, 1, 2]).tolist()
        [3, 1, 2]
    """
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise SketchInputError(
                f"`{name}` must hold integers, got a tensor of dtype {ids.dtype}; use .long()."
            )
        ids = ids.detach().cpu().numpy()
    try:
        arr = np.asarray(ids)
    except (OverflowError, ValueError) as err:
        raise SketchInputError(f"`{name}` must be a 1-D sequence of int64 example ids ({err}).") from err
    if arr.dtype == object:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.reshape(-1)):
            raise SketchInputError(f"`{name}` must hold integers only, got {arr.reshape(-1)[:3].tolist()}….")
        if any(int(v) > _INT64_MAX or int(v) < 0 for v in arr.reshape(-1)):
            raise SketchInputError(
                f"`{name}` must fit in [0, 2**63 - 1] (int64), got values outside it; remap ids to dataset "
                f"indices."
            )
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise SketchInputError(
            f"`{name}` must be integer example ids, got dtype {arr.dtype}; pass dataset indices as int64."
        )
    if arr.ndim != 1:
        raise SketchInputError(f"`{name}` must be 1-D [B], got shape {arr.shape}.")
    if arr.dtype.kind == "u" and arr.size and arr.max() > _INT64_MAX:
        raise SketchInputError(f"`{name}` must fit in int64 (<= 2**63 - 1), got max {int(arr.max())}.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise SketchInputError(
            f"`{name}` must be >= 0 (FAISS reserves -1 for 'no result'), got min {int(arr.min())}."
        )
    return arr


def as_rows(x: Any, width: int, name: str) -> np.ndarray:
    """A real floating ``[B, width]`` (or ``[width]`` -> ``[1, width]``) array, not yet cast.

    Raises:
        SketchInputError: non-floating dtype, wrong rank or wrong last dimension.
    """
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise SketchInputError(f"`{name}` must be a floating tensor, got {x.dtype}; use .float().")
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise SketchInputError(f"`{name}` must be a real floating array, got dtype {arr.dtype}.")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != width:
        raise SketchInputError(
            f"`{name}` must have shape [B, {width}] (the store's row width), got {tuple(np.shape(x))}."
        )
    return arr


def spec_dict(spec: Any) -> dict[str, Any] | None:
    """A JSON-serialisable spec dict from a :class:`~lightning_sketch.sketches.Sketch`, a dict or None.

    Raises:
        SketchConfigError: the spec is neither, or is not JSON-serialisable.
    """
    if spec is None:
        return None
    if hasattr(spec, "spec") and isinstance(spec.spec, dict):
        spec = spec.spec
    if not isinstance(spec, dict):
        raise SketchConfigError(
            f"`spec` must be a Sketch, its `.spec` dict or None, got {type(spec).__name__}."
        )
    try:
        return json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise SketchConfigError(f"`spec` must be JSON-serialisable ({err}).") from err


def layout_info(layout: Any, fingerprint: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(layout dict, fingerprint)`` from a ``ParamLayout`` (``to_dict``/``fingerprint``), a dict or None.

    Raises:
        LayoutMismatchError: ``layout_fingerprint`` disagrees with the layout's own fingerprint.
        SketchConfigError: wrong argument types.
    """
    own = None
    if layout is None:
        as_dict = None
    elif hasattr(layout, "to_dict") and hasattr(layout, "fingerprint"):
        as_dict, own = layout.to_dict(), layout.fingerprint()
    elif isinstance(layout, dict):
        as_dict, own = layout, layout.get("fingerprint")
    else:
        raise SketchConfigError(
            f"`layout` must be a ParamLayout, a dict or None, got {type(layout).__name__}."
        )
    if fingerprint is not None and hasattr(fingerprint, "fingerprint"):
        fingerprint = fingerprint.fingerprint()
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise SketchConfigError(f"`layout_fingerprint` must be a str, got {type(fingerprint).__name__}.")
    if own is not None and fingerprint is not None and own != fingerprint:
        raise LayoutMismatchError(
            f"`layout_fingerprint` {fingerprint[:12]}… disagrees with the layout's own fingerprint "
            f"{own[:12]}…; pass only one of them."
        )
    if as_dict is not None:
        as_dict = spec_dict(as_dict)
    return as_dict, fingerprint if fingerprint is not None else own


def compare_spec(stored: dict[str, Any] | None, given: Any, where: str) -> None:
    """Raise :class:`SketchMismatchError` naming every key whose value differs.

    Example:
        >>> compare_spec({"kind": "dense", "seed": 0}, {"kind": "dense", "seed": 0}, "store")
    """
    given = spec_dict(given)
    if given is None or stored is None:
        if given is not None:
            raise SketchMismatchError(f"{where} records no sketch spec, but spec {given} was given.")
        return
    diff = [
        f"{key}: stored {stored.get(key, '<absent>')!r} vs given {given.get(key, '<absent>')!r}"
        for key in sorted(set(stored) | set(given))
        if stored.get(key, "<absent>") != given.get(key, "<absent>")
    ]
    if diff:
        raise SketchMismatchError(
            f"{where} was written with another sketch spec ({'; '.join(diff)}). Query with the sketch the "
            f"store was written with (make(**store.spec)) or write a new store."
        )


def compare_layout(stored: str | None, given: Any, where: str) -> None:
    """Raise :class:`LayoutMismatchError` if a given layout fingerprint differs from the stored one."""
    _, fingerprint = layout_info(None, given)
    if fingerprint is None:
        return
    if stored is None:
        raise LayoutMismatchError(
            f"{where} records no parameter layout, so the model's layout {fingerprint[:12]}… cannot be "
            "checked; open it without `layout_fingerprint`."
        )
    if stored != fingerprint:
        raise LayoutMismatchError(
            f"{where} was written for parameter layout {stored[:12]}…, but the model has layout "
            f"{fingerprint[:12]}… (different parameter names, shapes or order: another architecture or "
            f"include/exclude filter). Use the model and filters the store was written with."
        )
