"""Spectral density by stochastic Lanczos quadrature, and Hutchinson / Hutch++ trace estimates.

Each estimator takes a square :class:`~lightning_sketch.linalg.LinearOperator` (or a matvec
``[n] -> [n]`` with its ``dim``).

- SLQ (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019): for each of
  ``num_runs`` random unit probes v, m Lanczos steps (fully re-orthogonalised) give nodes θ_i =
  eig(T_m) and weights w_i = s_{1,i}² (first components of T_m's eigenvectors); the density
  φ(t) = mean_v Σ_i w_i 𝒩(t; θ_i, σ²) approximates (1/n) Σ_j 𝒩(t; λ_j, σ²).
- Hutchinson: tr(A) ≈ mean_j z_jᵀ A z_j over Rademacher z_j, with standard error std/√m.
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(QᵀAQ) exactly on a captured range Q plus
  Hutchinson on the deflated remainder (I − QQᵀ)A(I − QQᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sketch._checks import positive_int
from lightning_sketch.exceptions import SpectrumError
from lightning_sketch.linalg.krylov import Matvec, _apply, _operator, lanczos_tridiagonal
from lightning_sketch.linalg.operators import LinearOperator

__all__ = [
    "SpectralDensity",
    "TraceEstimate",
    "gaussian_density",
    "hutchinson",
    "hutchpp",
    "slq_density",
]


@dataclass
class SpectralDensity:
    """A Gaussian-broadened spectral density on a grid.

    Attributes:
        grid: ``[G]`` evaluation points (float64).
        density: ``[G]`` φ(t), integrating to ≈ 1 over the grid.
        nodes: ``[R, m]`` Ritz values of every SLQ run.
        weights: ``[R, m]`` quadrature weights (each row sums to 1).
        sigma: Gaussian broadening (standard deviation).
        num_matvecs: matvecs spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int


@dataclass
class TraceEstimate:
    """A stochastic trace estimate with its standard error.

    Attributes:
        trace: the estimate of tr(A).
        stderr: its standard error (of the stochastic part).
        num_matvecs: matvecs spent.
    """

    trace: float
    stderr: float
    num_matvecs: int


def _pos_int(name: str, value: object, minimum: int = 1) -> int:
    return int(positive_int(name, value, minimum=minimum, error=SpectrumError))


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """φ(t) = Σ_i w_i 𝒩(t; θ_i, σ²) on ``grid`` (``nodes``/``weights`` any matching shape).

    Example:
        >>> grid = torch.linspace(-10, 10, 2001, dtype=torch.float64)
        >>> phi = gaussian_density(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), grid, 0.5)
        >>> round(float(torch.trapezoid(phi, grid)), 6)
        1.0
    """
    if not sigma > 0:
        raise SpectrumError(f"`sigma` must be > 0, got {sigma!r}.")
    t = grid.to(torch.float64).reshape(-1, 1)
    th = nodes.to(torch.float64).reshape(1, -1)
    w = weights.to(torch.float64).reshape(1, -1)
    z = (t - th) / sigma
    return (w * torch.exp(-0.5 * z * z)).sum(1) / (sigma * (2 * torch.pi) ** 0.5)


def slq_density(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    num_runs: int = 10,
    num_iter: int = 80,
    *,
    grid: Tensor | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        operator: the symmetric operator: a square LinearOperator, or a matvec ``[n] -> [n]``.
        dim: n (required with a matvec; the operator's size otherwise).
        num_runs: R random probes (Rademacher, normalised).
        num_iter: m Lanczos steps per probe (capped at n), fully re-orthogonalised.
        grid: ``[G]`` evaluation points; default ``num_points`` points over the Ritz range padded
            by 10% (and 5σ).
        num_points: G when ``grid`` is None.
        sigma: broadening; default (θ_max − θ_min)/100 (Ghorbani et al. use a fraction of the range).
        generator: CPU generator for the probes.
        dtype: Krylov dtype.
        device: Krylov device.

    Returns:
        A :class:`SpectralDensity` (R·m matvecs).

    Raises:
        SpectrumError: on non-positive ``num_runs``/``num_iter``/``num_points`` or ``sigma``.

    Example:
        >>> from lightning_sketch.linalg import DenseOperator
        >>> A = torch.diag(torch.linspace(0, 1, 100, dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> d = slq_density(DenseOperator(A), num_runs=4, num_iter=30, generator=g)
        >>> abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-3
        True
    """
    op = _operator(operator, dim)
    dim = op.shape[0]
    _pos_int("num_runs", num_runs)
    m = min(_pos_int("num_iter", num_iter), dim)
    _pos_int("num_points", num_points, 2)
    if sigma is not None and not sigma > 0:
        raise SpectrumError(f"`sigma` must be > 0 or None, got {sigma!r}.")
    nodes, weights = [], []
    for _ in range(num_runs):
        z = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64).to(dtype) * 2 - 1
        alpha, beta, _, _ = lanczos_tridiagonal(
            op, dim, m, v0=z.to(device) if device is not None else z, generator=generator, dtype=dtype,
            device=device,
        )
        t = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
        theta, s = torch.linalg.eigh(t)
        nodes.append(theta.to(torch.float64))
        weights.append((s[0, :] ** 2).to(torch.float64))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sig = float(sigma) if sigma is not None else width / 100.0
    if grid is None:
        pad = 0.1 * width + 5 * sig
        grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
    dens = gaussian_density(nodes_t, weights_t, grid, sig) / num_runs
    return SpectralDensity(grid.to(torch.float64), dens, nodes_t, weights_t, sig, num_runs * m)


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int64).to(dtype) * 2 - 1


def hutchinson(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j, Rademacher z_j, stderr = std/√m.

    Raises:
        SpectrumError: if ``num_matvecs < 2`` (the standard error needs two probes).

    Example:
        >>> from lightning_sketch.linalg import DenseOperator
        >>> A = torch.diag(torch.arange(10.0, dtype=torch.float64))
        >>> est = hutchinson(DenseOperator(A), num_matvecs=50, generator=torch.Generator().manual_seed(0))
        >>> est.trace  # diagonal A: every Rademacher probe gives the exact trace
        45.0
    """
    op = _operator(operator, dim)
    dim = op.shape[0]
    m = _pos_int("num_matvecs", num_matvecs, 2)
    vals = []
    for _ in range(m):
        z = _rademacher((dim,), generator, dtype).to(device)
        vals.append(torch.dot(z, _apply(op, z)).item())
    x = torch.tensor(vals, dtype=torch.float64)
    return TraceEstimate(float(x.mean()), float(x.std() / m**0.5), m)


def hutchpp(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    num_matvecs: int = 99,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on range(A S) plus Hutchinson on the deflated rest.

    With m matvecs: s = m // 3 sketch probes S, Q = orth(A S) (s matvecs), tr(QᵀAQ) (s matvecs),
    and m − 2s Rademacher probes of (I − QQᵀ) A (I − QQᵀ). The standard error is that of the
    Hutchinson part; the first term is exact.

    Raises:
        SpectrumError: if ``num_matvecs < 6``.

    Example:
        >>> from lightning_sketch.linalg import DenseOperator
        >>> A = torch.diag(torch.arange(10.0, dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> round(hutchpp(DenseOperator(A), num_matvecs=30, generator=g).trace, 6)
        45.0
    """
    op = _operator(operator, dim)
    dim = op.shape[0]
    m = _pos_int("num_matvecs", num_matvecs, 6)
    s = min(m // 3, dim)
    g = m - 2 * s
    S = _rademacher((s, dim), generator, dtype).to(device)
    AS = torch.stack([_apply(op, S[i]) for i in range(s)])
    Q = torch.linalg.qr(AS.T).Q.T  # [s, n] orthonormal rows
    AQ = torch.stack([_apply(op, Q[i]) for i in range(s)])
    t_low = float((Q * AQ).sum())
    vals = []
    for _ in range(g):
        z = _rademacher((dim,), generator, dtype).to(device)
        z = z - Q.T @ (Q @ z)
        az = _apply(op, z)
        vals.append(float(torch.dot(z, az - Q.T @ (Q @ az))))
    if len(vals) >= 2:
        x = torch.tensor(vals, dtype=torch.float64)
        return TraceEstimate(t_low + float(x.mean()), float(x.std() / len(vals) ** 0.5), 2 * s + g)
    return TraceEstimate(t_low + (vals[0] if vals else 0.0), float("nan") if vals else 0.0, 2 * s + g)
