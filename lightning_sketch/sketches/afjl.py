"""AFJL (arXiv 2402.03994, eq. 7): AFFD without the second transform."""

from __future__ import annotations

from typing import ClassVar

from lightning_sketch.sketches._afamily import PreconditionedSketch

__all__ = ["AFJLSketch"]


class AFJLSketch(PreconditionedSketch):
    """Φ(x) = R_D( √(N/D) · G · H_N^{π1} · B · x ) (eq. 7).

    FJL with the sparse Gaussian replaced by a Gaussian diagonal followed by restriction to the
    first D coordinates. B: N Rademacher signs; H^{π1}: normalised Kronecker Walsh–Hadamard with
    independent per-factor row permutations; G: standard normals (N are drawn; only the first D
    can reach the output, so only those are stored). E‖Φx‖² = ‖x‖², relative spread ≈ √(8/D)
    for Gaussian-like inputs (about 4x the D of AFFD for the same accuracy; no theorem in the
    paper). Only one (row-restricted) Kronecker pass is computed.

    N need not be a power of two: inputs are zero-padded to ``N_p = next_pow2(N)`` internally
    (scale √(N_p/D)); ``apply`` takes ``[..., N]``, ``transpose`` returns ``[..., N]``; any
    ``1 <= D <= N``. Options as for :class:`~lightning_sketch.sketches.affd.AFFDSketch`.

    Example:
        >>> import torch
        >>> s = AFJLSketch(1000, 64, seed=0)
        >>> x = torch.randn(3, 1000, dtype=torch.float64)
        >>> torch.allclose(s.apply(x), x @ s.to_dense().T)
        True
    """

    kind: ClassVar[str] = "afjl"
    TWO_PASS: ClassVar[bool] = False
