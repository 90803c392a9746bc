"""The batch structures every gradient function takes: a Tensor, a dict or a tuple/list of tensors
sharing the leading (batch) dimension B. A leaf of the package (``loss`` and ``_functional`` use it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_sketch.exceptions import SketchInputError

__all__ = ["Batch", "batch_leaves", "batch_size"]

Batch = Any


def batch_leaves(batch: Batch) -> list[Tensor]:
    """The tensors of a batch (a Tensor, a dict or a tuple/list of tensors)."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, Tensor)]
    raise SketchInputError(
        f"`batch` must be a Tensor, a dict of tensors or a tuple/list of tensors, got {type(batch).__name__}."
    )


def batch_size(batch: Batch) -> int:
    """B, the shared leading dimension of every tensor with ``ndim >= 1`` in ``batch``."""
    sizes = {t.shape[0] for t in batch_leaves(batch) if t.ndim >= 1}
    if len(sizes) != 1:
        raise SketchInputError(
            "Every tensor in `batch` must share the leading (batch) dimension B; found sizes "
            f"{sorted(sizes)}."
        )
    size = sizes.pop()
    if size == 0:
        raise SketchInputError("`batch` is empty (B = 0); pass at least one example.")
    return size
