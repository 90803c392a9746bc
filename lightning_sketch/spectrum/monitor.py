"""One spectrum snapshot of a model: the functional twin of the ``HessianSpectrum`` callback.

:func:`spectrum_snapshot` runs, on one (sketched) Hessian operator over a fixed probe set:
Lanczos for the top-k eigenpairs (full re-orthogonalisation), optionally an SLQ density and a
Hutch++ trace, the probe-set gradient (sketched) for the gradient–outlier alignment, and the
paper's summary statistics (arXiv 2402.03994 Sec. 5.5, Fig. 2). The number of matvecs is fixed by
the arguments, or, with ``stop_early=True``, by the convergence of the top-k Ritz pairs; that test
reads only the tridiagonal T, which is built from all-reduced matvecs, so every DDP rank stops at the
same step and runs the same sequence of collective reductions.

With ``max_seconds`` the snapshot also keeps to a time budget: it times its HVPs and lets
:mod:`lightning_sketch.spectrum.budget` choose the unset counts (Lanczos steps, then the density's
probes and steps from what Lanczos left). The two timings that decide are averaged over the ranks
through ``reduce`` first, so every rank takes the same decision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sketch.linalg import (
    FunctionOperator,
    KrylovResult,
    LinearOperator,
    SpectralDensity,
    TolScale,
    TraceEstimate,
    hutchpp,
    lanczos,
    slq_density,
)
from lightning_sketch.sketches import Sketch
from lightning_sketch.spectrum.budget import (
    DEFAULT_DENSITY_ITER,
    DEFAULT_DENSITY_RUNS,
    affordable_matvecs,
    density_plan,
    lanczos_steps,
)
from lightning_sketch.spectrum.hessian import HvpMethod, Reduce, hessian_operator, probe_gradient
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
        seconds_per_matvec: median wall time of one HVP after the first (which also builds the kept
            graph); NaN when only one HVP ran.
        max_seconds: the time budget it was given, or None.
    """

    eigs: KrylovResult
    summary: SpectrumSummary
    density: SpectralDensity | None
    trace: TraceEstimate | None
    num_matvecs: int
    seconds: float
    sketch_spec: dict[str, Any] | None = field(default=None)
    seconds_per_matvec: float = float("nan")
    max_seconds: float | None = None

    def scalars(self) -> dict[str, float]:
        """The scalars logged under ``hessian/...`` (plain floats)."""
        out = {
            "lambda_max": self.summary.lambda_max,
            "lambda_min": self.summary.lambda_min,
            "rneg": self.summary.rneg,
            "outliers": float(self.summary.outliers),
            "alignment": self.summary.alignment,
            "converged": float(self.eigs.converged.sum()),
            "eigenpairs": float(self.eigs.converged.numel()),
            "max_rel_residual": float(self.relative_residuals().max()),
            "matvecs": float(self.num_matvecs),
            "lanczos_matvecs": float(self.eigs.num_matvecs),
            "seconds": self.seconds,
            "seconds_per_matvec": self.seconds_per_matvec,
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
    density: bool | None = True,
    density_runs: int | None = DEFAULT_DENSITY_RUNS,
    density_iter: int | None = DEFAULT_DENSITY_ITER,
    trace: bool = False,
    trace_matvecs: int = 30,
    threshold: float = 0.2,
    tol: float = 1e-6,
    tol_scale: TolScale = "value",
    stop_early: bool = False,
    dtype: torch.dtype = torch.float64,
    reduce: Reduce | None = None,
    cache_graph: bool = True,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SpectrumSnapshot:
    """Top-k eigenpairs, summary statistics and (optionally) density and trace of the probe Hessian.

    Args:
        model: the module (read only).
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses.
        batches: the fixed probe set.
        k: eigenpairs.
        sketch: Φ (Sketch or spec dict) for the sketched operator Φ H Φᵀ; None for exact H.
        num_iter: Lanczos steps; default ``min(dim, max(4k, 40))``, fewer when ``max_seconds`` allows
            fewer (an explicit value is kept whatever the budget).
        method: HVP method.
        layout: ParamLayout (default all trainable parameters).
        generator: CPU generator for the start and probe vectors.
        density: compute the SLQ density (``density_runs × density_iter`` matvecs); None: only when
            ``max_seconds`` leaves room for it (always when there is no budget).
        density_runs: SLQ probes; None: as many as ``max_seconds`` allows, at most 4 (4 without budget).
        density_iter: Lanczos steps per SLQ probe; None: 40, or fewer (at least 20) to fit ``max_seconds``.
        trace: compute a Hutch++ trace estimate (``trace_matvecs`` matvecs).
        trace_matvecs: matvecs of the trace estimate.
        threshold: outlier threshold on λ_n/λ_1.
        tol: relative residual tolerance of the converged flags.
        tol_scale: ``"value"`` (residual ≤ tol·|θ_i|) or ``"norm"`` (residual ≤ tol·max|θ|), see
            :func:`~lightning_sketch.linalg.lanczos`.
        stop_early: end Lanczos once all k pairs are converged (at most ``num_iter`` steps; the
            same result as the full run when they never are).
        dtype: Krylov dtype.
        reduce: applied to every matvec and to the gradient (DDP all-reduce mean).
        cache_graph: keep the graph of ∇L over the probe set for all the snapshot's HVPs
            (``"double_backward"`` only; each HVP is then one backward pass; freed before returning).
        max_seconds: wall-time budget of the snapshot: the unset counts (``num_iter``, ``density``,
            ``density_runs``, ``density_iter`` = None) are chosen by
            :func:`~lightning_sketch.spectrum.budget.lanczos_steps` and
            :func:`~lightning_sketch.spectrum.budget.density_plan` from the measured cost of an HVP.
            At least k Lanczos steps always run; explicit counts and ``trace`` are kept even when they
            exceed it. None: no budget.
        clock: the clock that times the HVPs under ``max_seconds`` (seconds, monotonic).

    Returns:
        A :class:`SpectrumSnapshot`.

    Raises:
        SpectrumError: on bad ``k``/``num_iter`` or empty ``batches``.
    """
    start = clock()
    op = hessian_operator(
        model, loss_fn, batches, sketch, layout=layout, method=method, reduce=reduce, cache_graph=cache_graph
    )
    times: list[float] = []
    timed: LinearOperator = op if max_seconds is None else _timed(op, clock, times)
    cap: list[int] = []

    def left_matvecs(extra: int = 0) -> int:
        """HVPs that still fit in ``max_seconds`` (timings averaged over the ranks first)."""
        timing = torch.tensor([clock() - start, _per_matvec(times)], dtype=torch.float64)
        if reduce is not None:
            timing = reduce(timing.to(_device(model))).cpu()
        left = max(0.0, float(max_seconds or 0.0) - float(timing[0]))
        return affordable_matvecs(left, float(timing[1])) - extra

    def over_budget(steps: int) -> bool:
        if not cap:  # decided once, at the k-th step, from the HVPs timed so far; one kept for the gradient
            cap.append(lanczos_steps(steps + max(0, left_matvecs(extra=1)), k, op.dim))
        return steps >= cap[0]

    try:
        eigs = lanczos(
            timed, k=k, num_iter=num_iter, which="LA", generator=generator, dtype=dtype, tol=tol,
            tol_scale=tol_scale, stop_early=stop_early,
            stop=over_budget if max_seconds is not None and num_iter is None else None,
        )
        if max_seconds is None:
            runs = DEFAULT_DENSITY_RUNS if density_runs is None else density_runs
            steps = DEFAULT_DENSITY_ITER if density_iter is None else density_iter
            runs, steps = (runs, steps) if density is not False else (0, 0)
        else:  # what Lanczos left, less the trace's and the probe gradient's share
            left = left_matvecs(extra=(trace_matvecs if trace else 0) + 1)
            runs, steps = density_plan(max(0, left), op.dim, density, density_runs, density_iter)
        dens = None
        if runs > 0:
            dens = slq_density(
                timed, num_runs=runs, num_iter=min(steps, op.dim), generator=generator, dtype=dtype
            )
        tr = hutchpp(timed, num_matvecs=trace_matvecs, generator=generator, dtype=dtype) if trace else None
    finally:
        op.release()
    grad = probe_gradient(model, loss_fn, batches, op.sketch, layout=layout, reduce=reduce).to(dtype)
    smallest = float(eigs.ritz_values.min())
    summary = summarize(eigs.eigenvalues, eigs.eigenvectors, grad, smallest=smallest, threshold=threshold)
    spec = op.sketch.spec if op.sketch is not None else None
    return SpectrumSnapshot(eigs, summary, dens, tr, op.num_matvecs, clock() - start, spec,
                            seconds_per_matvec=_per_matvec(times), max_seconds=max_seconds)


def _timed(op: LinearOperator, clock: Callable[[], float], times: list[float]) -> LinearOperator:
    """``op`` recording each application's duration per row in ``times`` (after a CUDA synchronisation)."""

    def rows(v: Tensor) -> Tensor:
        t = clock()
        w = op(v)
        if w.is_cuda:
            torch.cuda.synchronize(w.device)
        times.extend([(clock() - t) / v.shape[0]] * v.shape[0])
        return w

    return FunctionOperator(op.shape, rows, symmetric=True)


def _per_matvec(times: list[float]) -> float:
    """Median HVP time without the first call (which builds the kept graph), or the first alone."""
    if not times:
        return float("nan")
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
