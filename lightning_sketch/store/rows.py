"""Read-only row sources: stored rows read in blocks without joining their segment files.

A checkpoint slice committed in several segments is a sequence of memory-mapped ``[n_s, D]``
arrays; the TracIn view is the √w_t-scaled concatenation along D of the slices, gathered at the
ids common to every slice. Both are exposed here as row sources with the two reads their readers
need: a contiguous range ``rows[s:e]`` and a gather ``rows[positions]``. Each read copies only the
rows it returns, so a pass over all rows in blocks holds one block at a time on top of the
memory-mapped pages (which the page cache shares between readers).

``np.asarray(source)`` materialises every row: a full copy, made only where a caller asks for it
(:meth:`~lightning_sketch.store.SketchStore.vectors`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from lightning_sketch.exceptions import SketchInputError

__all__ = ["GatheredConcat", "RowSource", "SegmentedRows"]


class _Source(ABC):
    """Common reads: ``len``, ``shape``, ``dtype``, slices and gathers (subclasses implement ``_take``)."""

    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        """``rows[s:e]`` (step 1) or ``rows[positions]`` (1-D ints) → a ``[b, width]`` array."""
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise SketchInputError(f"Row sources read contiguous ranges (step 1), got step {step}.")
            return self._range(start, max(start, stop))
        pos = np.asarray(key)
        if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
            raise SketchInputError(
                f"Row sources take a slice or a 1-D integer position array, got {pos.dtype}{list(pos.shape)}."
            )
        pos = pos.astype(np.int64)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"row position out of range for {n} rows")
        return self._take(np.where(pos < 0, pos + n, pos))

    def _range(self, start: int, stop: int) -> np.ndarray:
        return self._take(np.arange(start, stop, dtype=np.int64))

    @abstractmethod
    def _take(self, pos: np.ndarray) -> np.ndarray:
        """The rows at non-negative positions ``pos`` ``[b]`` int64, as a new ``[b, width]`` array."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._range(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)


class SegmentedRows(_Source):
    """The rows ``[n, D]`` of one checkpoint slice, stored as consecutive segments (memory maps).

    Args:
        parts: the segments' ``[n_s, D]`` arrays in storage order (not copied).
        width: D.
        dtype: the storage dtype every part has.

    Example:
        >>> rows = SegmentedRows([np.zeros((2, 3)), np.ones((1, 3))], 3, "float64")
        >>> rows.shape, rows[1:3].tolist(), rows[[2, 0]][:, 0].tolist()
        ((3, 3), [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [1.0, 0.0])
    """

    def __init__(self, parts: Sequence[np.ndarray], width: int, dtype: Any):
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).astype(np.int64)
        self.shape = (int(self._starts[-1]), int(width))
        self.dtype = np.dtype(dtype)

    @property
    def parts(self) -> list[np.ndarray]:
        """The segments' arrays, in storage order."""
        return list(self._parts)

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        for part, s0 in zip(self._parts, self._starts[:-1].tolist()):
            a, b = max(start, s0), min(stop, s0 + len(part))
            if a < b:
                pieces.append(part[a - s0 : b - s0])
        if not pieces:
            return np.zeros((0, self.shape[1]), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # only [start, stop) is copied

    def _take(self, pos: np.ndarray) -> np.ndarray:
        out = np.empty((len(pos), self.shape[1]), self.dtype)
        seg = np.searchsorted(self._starts, pos, side="right") - 1
        for s in np.unique(seg).tolist():
            m = seg == s
            out[m] = self._parts[s][pos[m] - self._starts[s]]
        return out


class GatheredConcat(_Source):
    """The TracIn view ``[n, T·D]`` float32: row j is hstack_t(scale_t · source_t[positions_t[j]]).

    Args:
        sources: each checkpoint slice's rows ``[n_t, D]`` (arrays or :class:`SegmentedRows`).
        positions: per slice, ``[n]`` int64 row positions of the common ids (aligned across slices).
        scales: √w_t per slice.
    """

    def __init__(
        self, sources: Sequence[RowSource], positions: Sequence[np.ndarray], scales: Sequence[float]
    ) -> None:
        self._sources = list(sources)
        self._positions = [np.asarray(p, dtype=np.int64) for p in positions]
        self._scales = [float(s) for s in scales]
        n = len(self._positions[0]) if self._positions else 0
        self.shape = (n, int(sum(s.shape[1] for s in self._sources)))
        self.dtype = np.dtype(np.float32)

    def _take(self, pos: np.ndarray) -> np.ndarray:
        blocks = [
            np.asarray(src[p[pos]], dtype=np.float32) * sc
            for src, p, sc in zip(self._sources, self._positions, self._scales)
        ]
        if not blocks:
            return np.zeros((len(pos), 0), np.float32)
        return np.ascontiguousarray(np.hstack(blocks), dtype=np.float32)


#: what views hand their readers: a memory map (one segment) or one of the sources above.
RowSource = Union[np.ndarray, SegmentedRows, GatheredConcat]
