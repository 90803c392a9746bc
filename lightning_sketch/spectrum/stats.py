"""The paper's summary statistics of a Hessian spectrum (arXiv 2402.03994 Sec. 5.5, Fig. 2).

- RNEG = |most negative eigenvalue| / largest positive eigenvalue (0 when none is negative);
- R(n) = λ_n / λ_1 for the positive top eigenvalues;
- outliers: eigenvalues with R > threshold (20% by default, after Ghorbani et al. 2019, Fig. 2);
  counted among the k computed eigenvalues, so the count saturates at k (ask for more than you expect);
- gradient–outlier alignment: ‖P_out g‖² / ‖g‖², the share of the probe-set gradient's squared
  norm in the span of the outlier eigenvectors (Gur-Ari et al. 2018). In sketch space the paper's
  sketched eigenvectors live in R^D, so use Φg there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sketch.exceptions import SpectrumError

__all__ = ["SpectrumSummary", "alignment", "outlier_count", "ratios", "rneg", "summarize"]


def _eigs(eigenvalues: Tensor) -> Tensor:
    if not isinstance(eigenvalues, Tensor) or eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise SpectrumError("`eigenvalues` must be a non-empty 1-D tensor.")
    return eigenvalues.detach().to(torch.float64).cpu()


def rneg(eigenvalues: Tensor, smallest: float | None = None) -> float:
    """RNEG = max(0, −λ_min) / λ_max; ``smallest`` overrides λ_min (e.g. an "SA" Ritz value).

    Returns NaN when λ_max ≤ 0 (the ratio is undefined).

    Example:
        >>> rneg(torch.tensor([4.0, 1.0, -1.0]))
        0.25
    """
    e = _eigs(eigenvalues)
    top = float(e.max())
    low = float(e.min()) if smallest is None else min(float(smallest), float(e.min()))
    if top <= 0:
        return float("nan")
    return max(0.0, -low) / top


def ratios(eigenvalues: Tensor) -> Tensor:
    """R(n) = λ_n / λ_1 for the positive eigenvalues, in descending order (``[p]`` float64).

    Example:
        >>> ratios(torch.tensor([1.0, 4.0, -2.0, 2.0])).tolist()
        [1.0, 0.5, 0.25]
    """
    e = _eigs(eigenvalues)
    pos = torch.sort(e[e > 0], descending=True).values
    if pos.numel() == 0:
        return pos
    return pos / pos[0]


def outlier_count(eigenvalues: Tensor, threshold: float = 0.2) -> int:
    """Number of eigenvalues with λ_n / λ_1 > ``threshold`` (λ_1 itself counts).

    Example:
        >>> outlier_count(torch.tensor([10.0, 5.0, 1.0]))
        2
    """
    if not 0 < threshold < 1:
        raise SpectrumError(f"`threshold` must be in (0, 1), got {threshold!r}.")
    return int((ratios(eigenvalues) > threshold).sum())


def alignment(gradient: Tensor, eigenvectors: Tensor) -> float:
    """‖V g‖² / ‖g‖² for orthonormal rows V ``[k, n]`` and gradient g ``[n]`` (0 if g = 0).

    Example:
        >>> alignment(torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0]]))
        0.36
    """
    g = gradient.detach().to(torch.float64).reshape(-1)
    v = eigenvectors.detach().to(torch.float64)
    if v.ndim != 2 or v.shape[1] != g.numel():
        raise SpectrumError(
            f"`eigenvectors` must be [k, {g.numel()}] to match the gradient, got {tuple(eigenvectors.shape)}."
        )
    gg = float(g @ g)
    if gg == 0.0 or v.shape[0] == 0:
        return 0.0
    return round(float(((v @ g) ** 2).sum()) / gg, 15)


@dataclass
class SpectrumSummary:
    """Scalars logged per snapshot (``hessian/...``).

    Attributes:
        lambda_max: largest eigenvalue.
        lambda_min: smallest Ritz value seen (most negative when any is negative).
        rneg: |most negative| / largest (0 when none is negative).
        outliers: count with λ_n/λ_1 > threshold.
        alignment: gradient–outlier alignment in [0, 1] (NaN when no gradient is given).
    """

    lambda_max: float
    lambda_min: float
    rneg: float
    outliers: int
    alignment: float


def summarize(
    eigenvalues: Tensor,
    eigenvectors: Tensor | None = None,
    gradient: Tensor | None = None,
    *,
    smallest: float | None = None,
    threshold: float = 0.2,
) -> SpectrumSummary:
    """All summary statistics at once; eigenvectors ``[k, n]`` rows match ``eigenvalues [k]``.

    Example:
        >>> s = summarize(torch.tensor([4.0, 2.0, 0.5]), torch.eye(3), torch.tensor([1.0, 1.0, 0.0]))
        >>> (s.outliers, s.alignment)
        (2, 1.0)
    """
    e = _eigs(eigenvalues)
    n_out = outlier_count(e, threshold)
    align = float("nan")
    if gradient is not None and eigenvectors is not None:
        pos_order = torch.argsort(e, descending=True)[:n_out]
        vecs = eigenvectors.real if eigenvectors.is_complex() else eigenvectors
        align = alignment(gradient, vecs[pos_order])
    low = float(e.min()) if smallest is None else min(float(smallest), float(e.min()))
    return SpectrumSummary(float(e.max()), low, rneg(e, smallest), n_out, align)
