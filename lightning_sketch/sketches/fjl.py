"""FJL: the fast Johnson–Lindenstrauss transform (Ailon & Chazelle 2009; arXiv 2402.03994, eq. 2)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch._checks import positive_int
from lightning_sketch.sketches._common import (
    check_max_block,
    compute_dtype,
    float_state,
    pad_cols,
    rademacher,
    rows_per_chunk,
)
from lightning_sketch.sketches._kron import hadamard, kron_apply, kron_shapes
from lightning_sketch.sketches.base import Sketch, next_pow2

__all__ = ["FJLSketch"]


class FJLSketch(Sketch):
    """Φ(x) = √(N/D) · G_s · H_N · B · x (eq. 2) with a sparse Gaussian G_s applied by lookups.

    B: N Rademacher signs; H_N: the normalised Sylvester Walsh–Hadamard (applied as Kronecker
    factors of size ≤ ``max_block``); G_s: a sparse ``[D, N]`` matrix whose row d has
    ``nnz_per_row = k`` entries g/√k (g ~ N(0, 1)) at columns drawn uniformly with replacement
    (a fixed-k variant of Ailon–Chazelle's Bernoulli(q) sparsity, k ≈ q·N; repeated columns add).
    Each row then satisfies E(G_s u)_d² = ‖u‖²/N, so E‖Φx‖² = ‖x‖². ``apply`` is a gather
    ``u[:, idx]`` (the lookup of App. B.1); ``transpose`` is the matching ``index_add_``
    (scatter-add). N is zero-padded to ``N_p = next_pow2(N)`` internally (scale √(N_p/D));
    ``apply`` takes ``[..., N]`` and ``transpose`` returns ``[..., N]``; any ``1 <= D <= N``.
    Persistent memory: ``N_p`` signs (1 B) + ``D·k`` indices (8 B) and values (4 B); it grows
    with D (as the paper observes).

    Options:
        nnz_per_row: non-zeros per row of G_s (default 8; Ailon–Chazelle take Θ(log² M) for M
            points; with the H·B pre-conditioner spreading mass, a few suffice in practice).
        max_block: Hadamard factor size (default 32; no permutations here, so it does not
            change the values, only speed).

    Example:
        >>> s = FJLSketch(1000, 64, seed=0)
        >>> x = torch.randn(2, 1000, dtype=torch.float64)
        >>> torch.allclose(s.apply(x), x @ s.to_dense().T)
        True
    """

    kind: ClassVar[str] = "fjl"
    OPTIONS: ClassVar[dict[str, Any]] = {"nnz_per_row": 8, "max_block": 32}

    # Persistent state, set in ``_build``.
    _n_pad: int
    _n_factors: int
    _scale: float
    _tensors: dict[str, Tensor]

    def _validate_options(self, options: dict[str, Any]) -> None:
        positive_int("nnz_per_row", options["nnz_per_row"], hint="The default is 8.")
        check_max_block(options["max_block"])

    def _build(self) -> None:
        n_pad = next_pow2(self.dim)
        k = self.options["nnz_per_row"]
        g = self.generator("sparse")
        idx = torch.randint(0, n_pad, (self.sketch_dim, k), generator=g, dtype=torch.int64)
        vals = torch.randn(self.sketch_dim, k, generator=g, dtype=torch.float32)
        shapes = kron_shapes(n_pad, self.options["max_block"])
        self._set("_n_pad", n_pad)
        self._set("_n_factors", len(shapes))
        self._set("_scale", 1.0 / math.sqrt(self.sketch_dim * k))
        # H_N / √N_p and √(N_p/D) / √k fold into one scale 1/√(D k) on the ±1 Hadamard.
        self._set(
            "_tensors",
            {
                "signs": rademacher(n_pad, self.generator("signs")),
                "idx": idx,
                "vals": vals,
                **{f"h_{i}": hadamard(s) for i, s in enumerate(shapes)},
            },
        )

    def _state_tensors(self) -> dict[str, Tensor]:
        return self._tensors

    def _hadamard(self, u: Tensor) -> Tensor:
        return kron_apply(u, [self.state(f"h_{i}", u) for i in range(self._n_factors)])

    def _apply(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(compute_dtype(x))
        idx = self._tensors["idx"].to(x.device)
        vals = self.state("vals", x)
        signs = float_state(self, "signs", x)[: self.dim]
        outs = []
        for xc in x.split(rows_per_chunk(self._n_pad, x.device)) if x.shape[0] else (x,):
            u = self._hadamard(pad_cols(xc * signs, self._n_pad))
            outs.append((u[:, idx] * vals).sum(-1) * self._scale)
        return torch.cat(outs).to(dtype)

    def _transpose(self, y: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.to(compute_dtype(y)) * self._scale
        idx = self._tensors["idx"].to(y.device).reshape(-1)
        contrib = (y[:, :, None] * self.state("vals", y)).reshape(y.shape[0], idx.numel())
        u = y.new_zeros(y.shape[0], self._n_pad).index_add(1, idx, contrib)
        u = self._hadamard(u)[:, : self.dim]
        return (u * float_state(self, "signs", y)[: self.dim]).to(dtype)
