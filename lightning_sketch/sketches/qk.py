"""QK: a Kronecker product of restricted Haar-orthogonal factors (arXiv 2402.03994, eq. 8, Thm 3.3)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch.sketches._common import (
    check_max_block,
    compute_dtype,
    pad_cols,
    rows_per_chunk,
)
from lightning_sketch.sketches._kron import (
    balanced_order,
    balanced_split,
    haar_orthogonal,
    kron_apply,
    kron_apply_into,
    kron_shapes,
    uses_autograd,
)
from lightning_sketch.sketches.base import Sketch, next_pow2

__all__ = ["QKSketch", "balanced_split"]


class QKSketch(Sketch):
    """Φ(x) = √(N/D) · (Q^(1) ⊗ … ⊗ Q^(K)) x with Haar factors restricted to D_i rows (eq. 8).

    Each ``Q^(i)`` is the first ``D_i`` rows of a Haar-distributed ``[B_i, B_i]`` orthogonal
    matrix (sign-corrected QR, Mezzadri 2007), stored explicitly as ``[D_i, B_i]``. The
    ``B_i`` are ``kron_shapes(N_p, max_block)`` with N zero-padded to ``N_p = next_pow2(N)``
    (so ``Π B_i = N_p``; padding keeps every factorisation available whatever N is). The ``D_i``
    split ``D_p = next_pow2(D)`` as evenly as the factor sizes allow (:func:`balanced_split`);
    a D that is not a power of two keeps the first D of the ``D_p`` rows (a subset of
    orthonormal rows, each with E(q·x)² = ‖x‖²/N_p, so √(N_p/D) stays unbiased).

    The ``D_p`` output coordinates are ordered by :func:`~lightning_sketch.sketches._kron.balanced_order`
    rather than row-major, so that for every power of two d <= D_p the first d coordinates are
    themselves a balanced QK (up to the scale √(D/d)): the intrinsic-dimension search trains the
    first d coordinates of one D_max projection, and in row-major order those would keep a single
    row of the leading factors (1/cond of the prefix's Gram matrix then drops well below that of a
    fresh d-dimensional QK, inflating D*). For D = D_p this is a fixed permutation of the output
    coordinates, so norms and inner products are the same as in row-major order. No B, no
    Hadamard: Q is the pre-conditioner. Persistent memory ``4·Σ D_i·B_i`` bytes (kilobytes).

    Options:
        max_block: largest factor size B_i, a power of two in [2, 1024] (default 32, as for
            AFFD; part of the spec).

    Example:
        >>> s = QKSketch(1000, 64, seed=0)
        >>> s.row_splits
        (8, 8)
        >>> x = torch.randn(2, 1000, dtype=torch.float64)
        >>> torch.allclose(s.apply(x), x @ s.to_dense().T)
        True
    """

    kind: ClassVar[str] = "qk"
    OPTIONS: ClassVar[dict[str, Any]] = {"max_block": 32}

    # Persistent state, set in ``_build``.
    _n_pad: int
    _d_pad: int
    _splits: tuple[int, ...]
    _order: Tensor
    _tensors: dict[str, Tensor]
    _scale: float

    def _validate_options(self, options: dict[str, Any]) -> None:
        check_max_block(options["max_block"])

    def _build(self) -> None:
        n_pad = next_pow2(self.dim)
        shapes = kron_shapes(n_pad, self.options["max_block"])
        d_pad = next_pow2(self.sketch_dim)
        splits = balanced_split(shapes, d_pad)
        tensors = {
            f"q_{i}": haar_orthogonal(b, self.generator(f"factor/{i}"), rows=r).to(torch.float32).contiguous()
            for i, (b, r) in enumerate(zip(shapes, splits))
        }
        self._set("_n_pad", n_pad)
        self._set("_d_pad", d_pad)
        self._set("_splits", splits)
        self._set("_order", balanced_order(shapes, d_pad)[: self.sketch_dim].contiguous())
        self._set("_tensors", tensors)
        self._set("_scale", math.sqrt(n_pad / self.sketch_dim))

    @property
    def row_splits(self) -> tuple[int, ...]:
        """The D_i of each factor (their product is ``next_pow2(D)``)."""
        return self._splits

    def _state_tensors(self) -> dict[str, Tensor]:
        return self._tensors

    def _factors(self, like: Tensor, transpose: bool = False) -> list[Tensor]:
        fs = [self.state(f"q_{i}", like) for i in range(len(self._splits))]
        return [f.T for f in fs] if transpose else fs

    def _apply(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(compute_dtype(x))
        factors = self._factors(x)
        if uses_autograd(x) or x.shape[0] == 0:
            out = kron_apply(pad_cols(x, self._n_pad), factors)[:, self._order.to(x.device)] * self._scale
            return out.to(dtype)
        m, n, n_pad = x.shape[0], self.dim, self._n_pad
        rows = min(m, rows_per_chunk(n_pad, x.device))
        work = (x.new_empty(rows * n_pad), x.new_empty(rows * n_pad))
        out = x.new_empty(m, self.sketch_dim)
        order = self._order.to(x.device)
        for start in range(0, m, rows):
            xc = x[start : start + rows]
            r = xc.shape[0]
            u = work[0][: r * n_pad].view(r, n_pad)
            u[:, :n].copy_(xc)
            u[:, n:].zero_()
            v = kron_apply_into(u, factors, work)
            torch.mul(v[:, order], self._scale, out=out[start : start + r])
        return out.to(dtype)

    def _transpose(self, y: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.to(compute_dtype(y)) * self._scale
        z = y.new_zeros(y.shape[0], self._d_pad).index_copy(1, self._order.to(y.device), y)
        u = kron_apply(z, self._factors(y, transpose=True))
        return u[:, : self.dim].to(dtype)
