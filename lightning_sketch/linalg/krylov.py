"""Krylov eigen-solvers on a linear operator: Lanczos and Arnoldi with full re-orthogonalisation.

The paper (arXiv 2402.03994, eq. 10 and Sec. 5.5) runs an Arnoldi iteration with *full*
re-orthogonalisation on the D × D sketched operator v ↦ Φ H Φᵀ v, so only D-dimensional Krylov
vectors are stored, and reads the top eigenvalues off the small projected matrix. Without
re-orthogonalisation the Lanczos recurrence loses orthogonality once a Ritz value converges and
produces ghost copies of it (Paige 1971); here every new vector is
orthogonalised twice against the whole basis (classical Gram–Schmidt, "twice is enough").

Both solvers see only a square :class:`~lightning_sketch.linalg.LinearOperator` (or a matvec
``[n] -> [n]`` with its ``dim``, wrapped by :func:`~lightning_sketch.linalg.as_operator`); they never
touch a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_sketch._checks import integer, one_of, positive_int
from lightning_sketch.exceptions import SpectrumError
from lightning_sketch.linalg.operators import LinearOperator, as_operator

__all__ = ["KrylovResult", "TolScale", "Which", "arnoldi", "lanczos", "lanczos_tridiagonal"]

Which = Literal["LA", "SA", "LM"]
_WHICH = ("LA", "SA", "LM")
TolScale = Literal["value", "norm"]
Matvec = Callable[[Tensor], Tensor]


@dataclass
class KrylovResult:
    """Ritz pairs of a Krylov iteration.

    Attributes:
        eigenvalues: ``[k]`` selected Ritz values, ordered by ``which`` (LA: descending, SA:
            ascending, LM: descending magnitude). Complex for :func:`arnoldi`.
        eigenvectors: ``[k, n]`` Ritz vectors as rows (unit norm).
        residuals: ``[k]`` residual norms ‖A y − θ y‖ = |β_m s_{m,i}|.
        converged: ``[k]`` bool, ``residual <= tol · max(|θ|, tiny)`` (``tol_scale="value"``) or
            ``residual <= tol · max_j |θ_j|`` over all Ritz values (``tol_scale="norm"``).
        num_matvecs: matvecs spent (= Lanczos steps m; fewer than ``num_iter`` after an early stop).
        ritz_values: ``[m]`` all Ritz values of the projected matrix (ascending, real for
            Lanczos), e.g. to read the most negative one for RNEG.
        ritz_residuals: ``[m]`` residual norms of all Ritz values, same order.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    ritz_values: Tensor = field(repr=False)
    ritz_residuals: Tensor = field(repr=False)


def _check_args(dim: int, k: int, num_iter: int | None, which: str) -> int:
    dim = positive_int("dim", dim, error=SpectrumError)
    k = positive_int("k", k, error=SpectrumError)
    if k > dim:
        raise SpectrumError(
            f"`k` must be <= `dim` (got k={k} > dim={dim}); ask for at most {dim} eigenpairs."
        )
    one_of("which", which, _WHICH, error=SpectrumError,
           hint="LA/SA: largest/smallest algebraic, LM: largest magnitude.")
    if num_iter is None:
        return min(dim, max(4 * k, 40))
    num_iter = integer("num_iter", num_iter, minimum=k, maximum=dim, error=SpectrumError,
                       hint="The bounds are [k, dim]; pass None for the default min(dim, max(4k, 40)).")
    return num_iter


def _start_vector(
    dim: int,
    v0: Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.shape != (dim,):
            shape = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
            raise SpectrumError(f"`v0` must be a tensor of shape ({dim},), got {shape}.")
        v = v0.to(dtype=dtype, device=device)
    else:
        v = torch.randn(dim, generator=generator, dtype=dtype, device="cpu").to(device)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SpectrumError("`v0` must be finite and non-zero; pass v0=None for a random start vector.")
    return v / norm


def _fresh_direction(basis: Tensor, generator: torch.Generator | None) -> Tensor | None:
    """A random unit vector orthogonal to the rows of ``basis`` (used after a breakdown)."""
    dim = basis.shape[1]
    for _ in range(3):
        w = torch.randn(dim, generator=generator, dtype=basis.dtype, device="cpu").to(basis.device)
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        n = w.norm()
        if n > 1e-8:
            return w / n
    return None


def _apply(op: LinearOperator, v: Tensor) -> Tensor:
    """A v in the Krylov basis' dtype and device (the operator computes in its own dtype, if it has one)."""
    w = op.matvec(v if op.dtype is None else v.to(op.dtype)).to(dtype=v.dtype, device=v.device)
    if not torch.isfinite(w).all():
        raise SpectrumError(
            "the operator returned non-finite values; check the loss and the model's parameters."
        )
    return w


def _operator(operator: LinearOperator | Matvec, dim: int | None, symmetric: bool = True) -> LinearOperator:
    return as_operator(operator, dim, symmetric=symmetric, error=SpectrumError)


def lanczos_tridiagonal(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    num_iter: int | None = None,
    *,
    v0: Tensor | None = None,
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    should_stop: Callable[[Tensor, Tensor], bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The Lanczos tridiagonalisation V A Vᵀ ≈ T_m of a symmetric operator.

    Args:
        operator: the symmetric operator: a square LinearOperator, or a matvec ``[n] -> [n]``.
        dim: n (required with a matvec; the operator's size otherwise).
        num_iter: m, the number of Lanczos steps (= matvecs), ``1 <= m <= n``; None: m = n.
        v0: ``[n]`` start vector (normalised here); random Gaussian from ``generator`` if None.
        reorthogonalize: full re-orthogonalisation (CGS twice) against the whole basis.
        generator: CPU generator for the start vector and breakdown restarts.
        dtype: dtype of the Krylov vectors and T (float64 by default: the vectors are small in
            sketch space and the recurrence is sensitive to rounding).
        device: device of the Krylov vectors.
        should_stop: called after step j (j + 1 matvecs) with ``(alpha[: j + 1], beta[: j + 1])``
            unless that step broke down; True ends the iteration there (m = j + 1). It sees only T,
            which is built from the (reduced) matvecs, so every DDP rank takes the same decision.

    Returns:
        ``(alpha [m], beta [m], V [m, n], num_matvecs)``: the diagonal, the off-diagonal
        (``beta[j]`` couples steps j and j+1; ``beta[m-1]`` is the residual coupling β_m used by the
        residual norms), and the orthonormal basis as rows. After an exact breakdown (an invariant
        subspace) the iteration continues from a fresh random vector orthogonal to the basis, with
        the coupling set to 0, so multiple eigenvalues are still found.

    Raises:
        SpectrumError: on a bad operator, ``dim``, ``num_iter`` or ``v0``, or non-finite matvecs.
    """
    op = _operator(operator, dim)
    dim = op.shape[0]
    if num_iter is None:
        num_iter = dim
    num_iter = integer("num_iter", num_iter, minimum=1, maximum=dim, error=SpectrumError)
    dev = (
        torch.device(device)
        if device is not None
        else (v0.device if isinstance(v0, Tensor) else torch.device("cpu"))
    )
    v = _start_vector(dim, v0, generator, dtype, dev)
    basis = torch.zeros(num_iter, dim, dtype=dtype, device=dev)
    alpha = torch.zeros(num_iter, dtype=dtype)
    beta = torch.zeros(num_iter, dtype=dtype)
    v_prev = torch.zeros_like(v)
    b_prev = torch.zeros((), dtype=dtype, device=dev)
    scale = torch.zeros((), dtype=dtype)
    for j in range(num_iter):
        basis[j] = v
        w = _apply(op, v)
        a = torch.dot(w, v)
        alpha[j] = a
        if reorthogonalize:
            q = basis[: j + 1]
            for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
                w = w - q.T @ (q @ w)
        else:
            w = w - a * v - b_prev * v_prev
        b = w.norm()
        scale = torch.maximum(scale, a.abs().cpu() + b.cpu())
        beta[j] = b
        if j + 1 == num_iter:
            break
        breakdown = bool(b <= 1e-10 * max(float(scale), 1e-300))
        # after a breakdown the basis spans an invariant subspace that may miss the wanted
        # eigenvalues: never stop there, continue from a fresh direction
        if not breakdown and should_stop is not None and should_stop(alpha[: j + 1], beta[: j + 1]):
            return alpha[: j + 1], beta[: j + 1], basis[: j + 1], j + 1
        if breakdown:
            beta[j] = 0.0
            nxt = _fresh_direction(basis[: j + 1], generator)
            if nxt is None:
                raise SpectrumError("Lanczos could not extend the Krylov basis; lower `num_iter`.")
            v_prev, v, b_prev = v, nxt, torch.zeros((), dtype=dtype, device=dev)
        else:
            v_prev, v, b_prev = v, w / b, b
    return alpha, beta, basis, num_iter


def _select(values: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        key = -values.real if values.is_complex() else -values
    elif which == "SA":
        key = values.real if values.is_complex() else values
    else:
        key = -values.abs()
    return torch.argsort(key, stable=True)[:k]


def lanczos(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    k: int = 10,
    num_iter: int | None = None,
    which: Which = "LA",
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    *,
    v0: Tensor | None = None,
    tol: float = 1e-6,
    tol_scale: TolScale = "value",
    stop_early: bool = False,
    check_every: int = 2,
    stop: Callable[[int], bool] | None = None,
) -> KrylovResult:
    """Top-k Ritz pairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    The Ritz values are the eigenvalues θ_i of the m × m tridiagonal T_m = V A Vᵀ; the Ritz
    vectors are Vᵀ s_i; the residual norm of pair i is |β_m s_{m,i}| (Parlett 1998).

    Args:
        operator: the symmetric operator: a square LinearOperator (e.g. the Hessian H, or the
            sketched Φ H Φᵀ of :func:`lightning_sketch.spectrum.hessian_operator`), or a matvec
            ``[n] -> [n]``.
        dim: n (required with a matvec; the operator's size otherwise).
        k: number of eigenpairs, ``1 <= k <= n``.
        num_iter: Lanczos steps m (= matvecs), ``k <= m <= dim``; default ``min(dim, max(4k, 40))``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
        reorthogonalize: full re-orthogonalisation (default); False gives the plain three-term
            recurrence, which shows ghost eigenvalues (kept for tests and comparison).
        generator: CPU generator for the random start vector (seed it for reproducibility).
        dtype: dtype of the Krylov basis (the matvec's output is cast to it).
        device: device of the Krylov basis.
        v0: optional ``[n]`` start vector (e.g. a warm start).
        tol: relative residual tolerance of the ``converged`` flags.
        tol_scale: what ``tol`` is relative to: ``"value"``, each pair's own |θ_i|; ``"norm"``,
            the largest |θ| of all Ritz values (an estimate of ‖A‖, from below), so ``tol`` bounds the
            relative backward error of each pair (it is an exact eigenpair of some A + E with
            ‖E‖ = residual) and small eigenvalues among the k are not held to a stricter standard.
        stop_early: stop as soon as all k selected pairs are ``converged`` (checked every
            ``check_every`` steps once there are k Ritz values), never after more than ``num_iter``
            steps. The steps taken are a prefix of the fixed-``num_iter`` run, so when the pairs do
            not converge the result is the same as with ``stop_early=False``.
        check_every: steps between convergence checks (each an m × m eigen-decomposition of T_m).
        stop: called after each step from the k-th on with the number of steps taken; True ends the
            iteration there (e.g. a time budget). Under DDP it must decide the same on every rank.

    Returns:
        A :class:`KrylovResult` with ``eigenvalues [k]``, ``eigenvectors [k, n]``,
        ``residuals [k]``, ``converged [k]``; ``num_matvecs`` is the number of steps taken.

    Raises:
        SpectrumError: on a non-square operator, a callable without ``dim``, ``k > n``, an unknown
            ``which``, a bad ``num_iter``, a bad ``v0``, a bad ``tol_scale`` or ``check_every``, or a
            matvec returning the wrong shape or non-finite values.

    Example:
        >>> from lightning_sketch.linalg import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64)))
        >>> res = lanczos(A, k=3, num_iter=50, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 6) for x in res.eigenvalues.tolist()]
        [50.0, 49.0, 48.0]
        >>> res = lanczos(lambda v: 2 * v, dim=4, k=1)  # a bare matvec needs its dim
        >>> round(float(res.eigenvalues[0]), 6)
        2.0
    """
    op = _operator(operator, dim)
    dim = op.shape[0]
    m = _check_args(dim, k, num_iter, which)
    one_of("tol_scale", tol_scale, ("value", "norm"), error=SpectrumError)
    positive_int("check_every", check_every, error=SpectrumError)

    def should_stop(alpha: Tensor, beta: Tensor) -> bool:
        steps = alpha.shape[0]
        if steps < k:
            return False
        if stop is not None and stop(steps):
            return True
        if not stop_early or steps % check_every:
            return False
        theta, s = _ritz(alpha, beta)
        idx = _select(theta, k, which)
        return bool(_converged(theta, (beta[-1] * s[-1, :]).abs(), idx, tol, tol_scale, dtype).all())

    alpha, beta, basis, used = lanczos_tridiagonal(
        op,
        dim,
        m,
        v0=v0,
        reorthogonalize=reorthogonalize,
        generator=generator,
        dtype=dtype,
        device=device,
        should_stop=should_stop if stop_early or stop is not None else None,
    )
    theta, s = _ritz(alpha, beta)
    ritz_res = (beta[-1] * s[-1, :]).abs()
    idx = _select(theta, k, which)
    vecs = (s[:, idx].T.to(basis.device)) @ basis
    vals = theta[idx]
    res = ritz_res[idx]
    conv = _converged(theta, ritz_res, idx, tol, tol_scale, dtype)
    return KrylovResult(vals, vecs, res, conv, used, theta, ritz_res)


def _ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-pairs (ascending) of the tridiagonal T: diagonal ``alpha``, off-diagonal ``beta[:-1]``."""
    t = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s


def _converged(
    theta: Tensor, ritz_res: Tensor, idx: Tensor, tol: float, tol_scale: str, dtype: torch.dtype
) -> Tensor:
    """``[k]`` flags of the selected pairs ``idx``: residual within ``tol`` of |θ_i| or of max |θ|."""
    tiny = torch.finfo(dtype).tiny
    scale = theta[idx].abs() if tol_scale == "value" else theta.abs().max().expand(idx.shape[0])
    return ritz_res[idx] <= tol * scale.clamp_min(tiny)


def arnoldi(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    k: int = 10,
    num_iter: int | None = None,
    which: Which = "LA",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    *,
    v0: Tensor | None = None,
    tol: float = 1e-6,
) -> KrylovResult:
    """Top-k Ritz pairs of a (possibly non-symmetric) operator by Arnoldi, fully re-orthogonalised.

    Builds the m × m upper Hessenberg H_m = V A Vᵀ by modified Gram–Schmidt applied twice and
    returns eigen-pairs of H_m (arXiv 2402.03994 Sec. 5.5: the paper's "Arnoldi" on Φ H Φᵀ; for a symmetric
    operator H_m is tridiagonal up to rounding and this agrees with :func:`lanczos`).

    Args:
        operator: a square LinearOperator, or a matvec ``[n] -> [n]``.
        dim: n (required with a matvec; the operator's size otherwise).
        k: number of eigenpairs.
        num_iter: Arnoldi steps m, ``k <= m <= dim``; default ``min(dim, max(4k, 40))``.
        which: ``"LA"``/``"SA"`` by real part, ``"LM"`` by modulus.
        generator: CPU generator for the start vector.
        dtype: real dtype of the Krylov basis.
        device: device of the Krylov basis.
        v0: optional ``[n]`` start vector.
        tol: relative residual tolerance of the ``converged`` flags.

    Returns:
        A :class:`KrylovResult`; ``eigenvalues`` and ``eigenvectors`` are complex (``[k]``,
        ``[k, n]``); residuals are |h_{m+1,m} s_{m,i}| with unit-norm s_i.

    Raises:
        SpectrumError: as :func:`lanczos`.

    Example:
        >>> f64 = torch.float64
        >>> A = torch.triu(torch.ones(6, 6, dtype=f64)) + torch.diag(torch.arange(6.0, dtype=f64))
        >>> from lightning_sketch.linalg import DenseOperator
        >>> res = arnoldi(DenseOperator(A), k=2, num_iter=6, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 6) for x in res.eigenvalues.real.tolist()]
        [6.0, 5.0]
    """
    op = _operator(operator, dim, symmetric=False)
    dim = op.shape[0]
    m = _check_args(dim, k, num_iter, which)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    v = _start_vector(dim, v0, generator, dtype, dev)
    basis = torch.zeros(m, dim, dtype=dtype, device=dev)
    h = torch.zeros(m + 1, m, dtype=dtype)
    for j in range(m):
        basis[j] = v
        w = _apply(op, v)
        q = basis[: j + 1]
        for _ in range(2):
            c = q @ w
            w = w - q.T @ c
            h[: j + 1, j] += c.cpu()
        b = w.norm()
        h[j + 1, j] = b
        if j + 1 == m:
            break
        scale = float(h[: j + 2, : j + 1].abs().max())
        if b <= 1e-10 * max(scale, 1e-300):
            h[j + 1, j] = 0.0
            nxt = _fresh_direction(q, generator)
            if nxt is None:
                raise SpectrumError("Arnoldi could not extend the Krylov basis; lower `num_iter`.")
            v = nxt
        else:
            v = w / b
    theta, s = torch.linalg.eig(h[:m, :m])
    s = s / torch.linalg.vector_norm(s, dim=0, keepdim=True)
    ritz_res = (h[m, m - 1] * s[-1, :]).abs()
    idx = _select(theta, k, which)
    vecs = s[:, idx].T.to(basis.device) @ basis.to(s.dtype)
    vals = theta[idx]
    res = ritz_res[idx]
    conv = res <= tol * vals.abs().clamp_min(torch.finfo(dtype).tiny)
    order = torch.argsort(theta.real, stable=True)
    return KrylovResult(vals, vecs, res, conv, m, theta[order], ritz_res[order])
