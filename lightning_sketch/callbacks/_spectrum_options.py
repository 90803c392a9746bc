"""``SpectrumNumerics``: the numerical settings of :class:`~lightning_sketch.callbacks.HessianSpectrum`.

An option group (a dataclass, which ``LightningCLI``/jsonargparse reads as a nested mapping), so the
callback keeps a short signature::

    HessianSpectrum(k=10, numerics=SpectrumNumerics(num_iter=40, density_iter=30))

    # YAML
    init_args:
      k: 10
      numerics:
        num_iter: 40
        density_iter: 30
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_sketch._checks import boolean, number, one_of, positive_int

__all__ = ["SpectrumNumerics"]


@dataclass(frozen=True)
class SpectrumNumerics:
    """How each Hessian snapshot is computed (the defaults follow arXiv 2402.03994, App. B.8).

    Args:
        num_iter: most Lanczos steps per snapshot; None (default): ``min(D, max(4k, 40))``, or
            fewer (at least k) to fit the callback's ``budget``. A number is kept whatever the budget.
        tol: convergence tolerance of the top-k Ritz pairs, relative to the largest |Ritz value|
            (≈ λ_max): a pair is converged when its residual ‖Hy − θy‖ ≤ tol·|λ_max|, i.e. it is an exact
            eigenpair of a Hessian perturbed by that relative amount; its eigenvalue is then off by
            at most that much (typically by its square over the spectral gap). The snapshot's
            ``converged`` flags use it, and a fit whose snapshots miss it warns once.
        stop_early: end a snapshot's Lanczos as soon as all k pairs meet ``tol`` instead of always
            running ``num_iter`` steps (the steps taken are a prefix of the full run, so an
            unconverged snapshot is unchanged).
        hvp_method: ``"double_backward"``, ``"fwd_rev"`` or ``"finite_difference"`` (the only one
            allowed under FSDP/DeepSpeed).
        dtype: dtype of the (D-dimensional) Krylov vectors; HVPs run in the module's own dtype.
        mode: module mode during the HVPs (``"eval"`` turns dropout off so that every matvec sees
            the same loss); the original mode is restored.
        outlier_threshold: an eigenvalue is an outlier when λ_n/λ_1 exceeds it (paper: 0.2).
        density_runs: SLQ probe vectors of the spectral density; None (default): as many as the
            callback's ``budget`` leaves room for, at most 4 (4 with ``budget=None``). A number is kept
            whatever the budget.
        density_iter: Lanczos steps per SLQ probe; None (default): 40, or fewer (at least 20) to fit
            the budget. A number is kept whatever the budget.
        trace_matvecs: HVPs of the Hutch++ trace estimate (``HessianSpectrum(trace=True)``).
        cache_graph: with ``"double_backward"``, build the graph of ∇L over the probe set once per
            snapshot and run one backward pass per HVP (1.7-1.9x cheaper HVPs on the models of
            benchmarks/real_models.py); the graph (about one ``create_graph`` training step over the
            whole probe set) is held during the snapshot only. Set False when that memory is tight.
            With ``mode="train"`` the kept graph fixes one dropout mask for all of a snapshot's HVPs
            (one consistent operator); without it every HVP draws its own.

    Raises:
        SketchConfigError: on an invalid value.
    """

    num_iter: int | None = None
    tol: float = 1e-3
    stop_early: bool = True
    hvp_method: Literal["double_backward", "fwd_rev", "finite_difference"] = "double_backward"
    dtype: Literal["float32", "float64"] = "float64"
    mode: Literal["eval", "train"] = "eval"
    outlier_threshold: float = 0.2
    density_runs: int | None = None
    density_iter: int | None = None
    trace_matvecs: int = 30
    cache_graph: bool = True

    def __post_init__(self) -> None:
        positive_int("num_iter", self.num_iter, allow_none=True)
        positive_int("density_runs", self.density_runs, allow_none=True)
        positive_int("density_iter", self.density_iter, allow_none=True)
        positive_int("trace_matvecs", self.trace_matvecs, minimum=6)
        one_of("hvp_method", self.hvp_method, ("double_backward", "fwd_rev", "finite_difference"))
        number("tol", self.tol, low=0, high=1, low_open=True, high_open=True)
        boolean("stop_early", self.stop_early)
        boolean("cache_graph", self.cache_graph)
        one_of("dtype", self.dtype, ("float32", "float64"))
        one_of("mode", self.mode, ("eval", "train"))
        number("outlier_threshold", self.outlier_threshold, low=0, high=1, low_open=True, high_open=True)
