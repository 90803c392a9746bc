"""One spectrum snapshot of a model: the functional twin of the ``HessianSpectrum`` callback.

:func:`spectrum_snapshot` runs, on one (sketched) Hessian operator over a fixed probe set:
Lanczos for the top-k eigenpairs (full re-orthogonalisation), optionally an SLQ density and a
Hutch++ trace, the probe-set gradient (sketched) for the gradient–outlier alignment, and the
paper's summary statistics (arXiv 2402.03994 Sec. 5.5, Fig. 2). The number of matvecs is fixed by
the arguments, or, with ``stop_early=True``, by the convergence of the top-k Ritz pairs; that test
reads only the tridiagonal T, which is built from all-reduced matvecs, so every DDP rank stops at the
same step and runs the same sequence of collective reductions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sketch.sketches import Sketch
from lightning_sketch.spectrum.density import SpectralDensity, TraceEstimate, hutchpp, slq_density
from lightning_sketch.spectrum.hessian import HvpMethod, Reduce, hessian_operator, probe_gradient
from lightning_sketch.spectrum.lanczos import KrylovResult, TolScale, lanczos
from lightning_sketch.spectrum.stats import SpectrumSummary, summarize

__all__ = ["SpectrumSnapshot", "spectrum_snapshot"]


@dataclass
class SpectrumSnapshot:
    """Everything one snapshot measures.

    Attributes:
        eigs: the top-k Ritz pairs (``eigenvectors [k, D]``, sketched when a sketch is used).
        summary: λ_max, λ_min, RNEG, outlier count, gradient–outlier alignment.
        density: the SLQ density, or None.
        trace: the Hutch++ trace estimate of Φ H Φᵀ (of H when exact), or None.
        num_matvecs: HVPs spent in total (Lanczos + density + trace); the Lanczos share is
            ``eigs.num_matvecs``.
        seconds: wall time.
        sketch_spec: the sketch's spec, or None.
    """

    eigs: KrylovResult
    summary: SpectrumSummary
    density: SpectralDensity | None
    trace: TraceEstimate | None
    num_matvecs: int
    seconds: float
    sketch_spec: dict[str, Any] | None = field(default=None)

    def scalars(self) -> dict[str, float]:
        """The scalars logged under ``hessian/...`` (plain floats)."""
        out = {
            "lambda_max": self.summary.lambda_max,
            "lambda_min": self.summary.lambda_min,
            "rneg": self.summary.rneg,
            "outliers": float(self.summary.outliers),
            "alignment": self.summary.alignment,
            "converged": float(self.eigs.converged.sum()),
            "max_rel_residual": float(self.relative_residuals().max()),
            "matvecs": float(self.num_matvecs),
            "lanczos_matvecs": float(self.eigs.num_matvecs),
            "seconds": self.seconds,
        }
        if self.trace is not None:
            out["trace"] = self.trace.trace
            out["trace_stderr"] = self.trace.stderr
        return out

    def relative_residuals(self) -> Tensor:
        """``[k]`` residual norms over the largest |Ritz value| (≈ ‖Φ H Φᵀ‖): relative backward errors."""
        scale = self.eigs.ritz_values.abs().max().clamp_min(torch.finfo(self.eigs.residuals.dtype).tiny)
        return self.eigs.residuals / scale

    def arrays(self) -> dict[str, Tensor]:
        """The arrays written to the snapshot file (see :mod:`lightning_sketch.spectrum.snapshot`)."""
        out = {
            "eigenvalues": self.eigs.eigenvalues,
            "residuals": self.eigs.residuals,
            "converged": self.eigs.converged,
            "eigenvectors": self.eigs.eigenvectors,
            "ritz_values": self.eigs.ritz_values,
        }
        if self.density is not None:
            out["density_grid"] = self.density.grid
            out["density"] = self.density.density
        return out


def spectrum_snapshot(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    k: int = 10,
    sketch: Sketch | Mapping[str, Any] | None = None,
    num_iter: int | None = None,
    method: HvpMethod = "double_backward",
    layout: Any = None,
    generator: torch.Generator | None = None,
    density: bool = True,
    density_runs: int = 4,
    density_iter: int = 40,
    trace: bool = False,
    trace_matvecs: int = 30,
    threshold: float = 0.2,
    tol: float = 1e-6,
    tol_scale: TolScale = "value",
    stop_early: bool = False,
    dtype: torch.dtype = torch.float64,
    reduce: Reduce | None = None,
    cache_graph: bool = True,
) -> SpectrumSnapshot:
    """Top-k eigenpairs, summary statistics and (optionally) density and trace of the probe Hessian.

    Args:
        model: the module (read only).
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses.
        batches: the fixed probe set.
        k: eigenpairs.
        sketch: Φ (Sketch or spec dict) for the sketched operator Φ H Φᵀ; None for exact H.
        num_iter: Lanczos steps; default ``min(dim, max(4k, 40))``.
        method: HVP method.
        layout: ParamLayout (default all trainable parameters).
        generator: CPU generator for the start and probe vectors.
        density: compute the SLQ density (``density_runs × density_iter`` matvecs).
        density_runs: SLQ probes.
        density_iter: Lanczos steps per SLQ probe.
        trace: compute a Hutch++ trace estimate (``trace_matvecs`` matvecs).
        trace_matvecs: matvecs of the trace estimate.
        threshold: outlier threshold on λ_n/λ_1.
        tol: relative residual tolerance of the converged flags.
        tol_scale: ``"value"`` (residual ≤ tol·|θ_i|) or ``"norm"`` (residual ≤ tol·max|θ|), see
            :func:`~lightning_sketch.spectrum.lanczos`.
        stop_early: end Lanczos once all k pairs are converged (at most ``num_iter`` steps; the
            same result as the full run when they never are).
        dtype: Krylov dtype.
        reduce: applied to every matvec and to the gradient (DDP all-reduce mean).
        cache_graph: keep the graph of ∇L over the probe set for all the snapshot's HVPs
            (``"double_backward"`` only; each HVP is then one backward pass; freed before returning).

    Returns:
        A :class:`SpectrumSnapshot`.

    Raises:
        SpectrumError: on bad ``k``/``num_iter`` or empty ``batches``.
    """
    start = time.perf_counter()
    op = hessian_operator(
        model, loss_fn, batches, sketch, layout=layout, method=method, reduce=reduce, cache_graph=cache_graph
    )
    try:
        eigs = lanczos(
            op, op.dim, k, num_iter=num_iter, which="LA", generator=generator, dtype=dtype, tol=tol,
            tol_scale=tol_scale, stop_early=stop_early,
        )
        dens = None
        if density:
            dens = slq_density(op, op.dim, density_runs, density_iter, generator=generator, dtype=dtype)
        tr = hutchpp(op, op.dim, trace_matvecs, generator=generator, dtype=dtype) if trace else None
    finally:
        op.release()
    grad = probe_gradient(model, loss_fn, batches, op.sketch, layout=layout, reduce=reduce).to(dtype)
    smallest = float(eigs.ritz_values.min())
    summary = summarize(eigs.eigenvalues, eigs.eigenvectors, grad, smallest=smallest, threshold=threshold)
    spec = op.sketch.spec if op.sketch is not None else None
    return SpectrumSnapshot(eigs, summary, dens, tr, op.num_matvecs, time.perf_counter() - start, spec)
