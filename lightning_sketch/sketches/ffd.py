"""FFD: Fastfood used as a sketch, i.e. transposed (arXiv 2402.03994, eq. 3 / eq. 12 of App. C.4, Thm 3.1)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.sketches._common import (
    check_max_block,
    compute_dtype,
    float_state,
    pad_cols,
    rademacher,
)
from lightning_sketch.sketches._kron import hadamard, kron_apply, kron_shapes
from lightning_sketch.sketches.base import Sketch, next_pow2

__all__ = ["FFDSketch"]


class FFDSketch(Sketch):
    """Φ(x) = Σ_{b=1}^{N/D} B_b H_D Π_bᵀ G_b H_D x_b with σ = 1 (paper eq. 12).

    x is cut into N/D blocks x_b of length D; each block has its own Rademacher diagonal B_b,
    permutation Π_b and standard-normal diagonal G_b; H_D is the orthonormal Walsh–Hadamard, so
    σ = 1 makes E‖Φx‖² = ‖x‖². This is the transpose of the Fastfood generator
    ``u ↦ [H G_b Π_b H B_b u]_b`` that Li et al. use implicitly (θ = θ0 + FFD(ω)); the stored index
    is that of Π_bᵀ, and :meth:`transpose` (the generator) applies its inverse, Π_b (arXiv 2402.03994
    App. B.1). It is **not** a sketch (Thm 3.1): for x = (first row of H_D) in block 1,
    ‖Φx‖² = g_1², whose spread does not shrink with D. Kept as a baseline.

    D must be a power of two (H_D); N is zero-padded to ``N_p = next_pow2(N)`` internally, which
    D then divides; ``apply`` takes ``[..., N]``, ``transpose`` returns ``[..., N]``. Persistent
    memory: ``N_p`` signs (1 B), ``N_p`` Gaussians (4 B), ``N_p`` permutation indices (8 B).

    Options:
        max_block: Hadamard factor size (default 32; unpermuted factors, so speed only).

    Example:
        >>> s = FFDSketch(1000, 64, seed=0)
        >>> x = torch.randn(2, 1000, dtype=torch.float64)
        >>> torch.allclose(s.apply(x), x @ s.to_dense().T)
        True
    """

    kind: ClassVar[str] = "ffd"
    OPTIONS: ClassVar[dict[str, Any]] = {"max_block": 32}

    # Persistent state, set in ``_build``.
    _n_pad: int
    _nb: int
    _n_factors: int
    _tensors: dict[str, Tensor]

    def _validate_options(self, options: dict[str, Any]) -> None:
        check_max_block(options["max_block"])
        d = self.sketch_dim
        if d & (d - 1):
            lower = 1 << (d.bit_length() - 1)
            raise SketchConfigError(
                f"kind='ffd' needs `sketch_dim` to be a power of two (its blocks use H_D), got {d}; "
                f"use sketch_dim={lower} or {lower * 2}, or kind='affd', which takes any D."
            )

    def _build(self) -> None:
        n_pad = next_pow2(self.dim)
        d = self.sketch_dim
        nb = n_pad // d
        g = self.generator("perms")
        perms = torch.stack([torch.randperm(d, generator=g) for _ in range(nb)])
        shapes = kron_shapes(d, self.options["max_block"])
        self._set("_n_pad", n_pad)
        self._set("_nb", nb)
        self._set("_n_factors", len(shapes))
        self._set(
            "_tensors",
            {
                "signs": rademacher(n_pad, self.generator("signs")).view(nb, d),
                "gauss": torch.randn(n_pad, generator=self.generator("gauss"), dtype=torch.float32).view(
                    nb, d
                ),
                "perms": perms,
                **{f"h_{i}": hadamard(s) for i, s in enumerate(shapes)},
            },
        )

    def _state_tensors(self) -> dict[str, Tensor]:
        return self._tensors

    def _h(self, u: Tensor) -> Tensor:
        """Orthonormal H_D on the last axis of ``u [M, nb, D]``."""
        m = u.shape[0]
        fs = [self.state(f"h_{i}", u) for i in range(self._n_factors)]
        return kron_apply(u.reshape(-1, self.sketch_dim), fs).reshape(
            m, self._nb, self.sketch_dim
        ) / math.sqrt(self.sketch_dim)

    def _apply(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(compute_dtype(x))
        m, nb, d = x.shape[0], self._nb, self.sketch_dim
        perms = self._tensors["perms"].to(x.device)
        v = self._h(pad_cols(x, self._n_pad).reshape(m, nb, d)) * self.state("gauss", x)
        v = torch.gather(v, 2, perms.expand(m, nb, d))
        v = self._h(v) * float_state(self, "signs", x)
        return v.sum(1).to(dtype)

    def _transpose(self, y: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.to(compute_dtype(y))
        m, nb, d = y.shape[0], self._nb, self.sketch_dim
        perms = self._tensors["perms"].to(y.device)
        v = self._h(y[:, None, :] * float_state(self, "signs", y))
        v = v.new_zeros(m, nb, d).scatter(2, perms.expand(m, nb, d), v)
        v = self._h(v * self.state("gauss", y))
        return v.reshape(m, self._n_pad)[:, : self.dim].to(dtype)
