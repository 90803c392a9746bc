"""The damping λ of ``trak`` / ``fisher_if``: the automatic rule, its defaults and its diagnostics.

Each slice c inverts K_c + λ_c I, K_c the slice's ``[D, D]`` kernel (of T_c examples). Without a
ground truth the library sets λ_c = ρ · tr(K_c)/T_c: tr(K_c)/T_c is the mean squared sketched
per-example gradient norm (of the kernel's functions: the margin, the prediction, ...), the trace
of the average per-example curvature, so the rule follows each slice's curvature as it shrinks
during training and does not depend on the sketch dimension D. The ratio ρ is
:data:`DEFAULT_MARGIN_DAMPING_RATIO` on TRAK's margin kernel and :data:`DEFAULT_DAMPING_RATIO` on
the others; benchmarks/RESULTS.md gives the measurements behind both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DAMPING_RATIO_GRID",
    "DEFAULT_DAMPING_RATIO",
    "DEFAULT_MARGIN_DAMPING_RATIO",
    "default_ratio",
    "effective_dimension",
]

#: ρ on the Gauss–Newton, Fisher and empirical kernels and on GᵀG.
DEFAULT_DAMPING_RATIO = 10.0**-0.5
#: ρ on TRAK's margin kernel (classifiers).
DEFAULT_MARGIN_DAMPING_RATIO = 1.0
#: Candidate ratios ρ for :meth:`~lightning_sketch.attribution.Attributor.tune_damping`: 10^-4 … 10^3.
DAMPING_RATIO_GRID = tuple(float(10.0**e) for e in np.arange(-4.0, 3.01, 0.5))


def default_ratio(kernel: str | None) -> float:
    """The automatic ρ for a kernel kind (``Attributor.kernel``).

    Example:
        >>> default_ratio("margin"), round(default_ratio("gauss-newton"), 4)
        (1.0, 0.3162)
    """
    return DEFAULT_MARGIN_DAMPING_RATIO if kernel == "margin" else DEFAULT_DAMPING_RATIO


def effective_dimension(s: Tensor, lam: float) -> float:
    """d_eff(λ) = Σ_i s_i / (s_i + λ): how many kernel directions the damped inverse resolves.

    Example:
        >>> effective_dimension(torch.tensor([9.0, 1.0, 0.0]), 1.0)
        1.4
    """
    s = s.to(torch.float64).clamp_min(0)
    return float((s / (s + lam)).sum()) if lam > 0 else float((s > 0).sum())
