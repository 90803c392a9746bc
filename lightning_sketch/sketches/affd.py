"""AFFD, the paper's main sketch (arXiv 2402.03994, eq. 6, Thm 3.2)."""

from __future__ import annotations

from typing import ClassVar

from lightning_sketch.sketches._afamily import PreconditionedSketch

__all__ = ["AFFDSketch"]


class AFFDSketch(PreconditionedSketch):
    """Φ(x) = R_D( √(N/D) · H_N^{π2} · G · H_N^{π1} · B · x ) (eq. 6).

    B: N Rademacher signs; G: N standard normals; H^{π1}/H^{π2}: normalised Walsh–Hadamard as a
    Kronecker product of small factors (sizes ``kron_shapes(N, max_block)``, remainder first) with
    independent per-factor ROW (π1) and COLUMN (π2) permutations; R_D keeps the first D
    coordinates after the last transform. E‖Φx‖² = ‖x‖² and the relative spread is ≈ √(2/D).

    N need not be a power of two: inputs are zero-padded to ``N_p = next_pow2(N)`` internally (the
    paper's scale becomes √(N_p/D)); ``apply`` takes ``[..., N]`` and ``transpose`` returns
    ``[..., N]``. Any ``1 <= D <= N`` works (R_D needs no power of two). Persistent memory is
    ``5·N_p`` bytes plus ``8·Σ s_i²`` for the factors, independent of D.

    Options:
        preconditioner: ``"hadamard"`` (default), ``"fft"`` (the paper's F variant: an exact real
            DFT isometry, no padding) or ``"kron_orthogonal"`` (Q variant: Kronecker Haar factors,
            no B). See :mod:`lightning_sketch.sketches._afamily`.
        max_block: largest Kronecker factor, a power of two in [2, 1024] (default 32; part of the
            spec because it changes the drawn permutations).

    Example:
        >>> import torch
        >>> s = AFFDSketch(1000, 64, seed=0)
        >>> x = torch.randn(3, 1000, dtype=torch.float64)
        >>> s.apply(x).shape, s.transpose(s.apply(x)).shape
        (torch.Size([3, 64]), torch.Size([3, 1000]))
        >>> torch.allclose(s.apply(x), x @ s.to_dense().T)
        True
    """

    kind: ClassVar[str] = "affd"
    TWO_PASS: ClassVar[bool] = True
