"""Hessian spectra on sketched Hessian-vector products (arXiv 2402.03994, eq. 10; Sec. 5.5 and Table 7).

Pure PyTorch (no Lightning):

- Krylov solvers over a matvec: :func:`lanczos`, :func:`arnoldi` (full re-orthogonalisation);
- operators over a fixed probe set: :func:`hessian_operator` (exact H, or Φ H Φᵀ);
- :func:`hessian_eigs`, the entry point: top-k eigenpairs, exact or sketched;
- :func:`spectrum_snapshot`: one full snapshot (the callback's functional twin);
- spectral density by SLQ (:func:`slq_density`), trace by :func:`hutchinson` / :func:`hutchpp`;
- summary statistics: :func:`rneg`, :func:`ratios`, :func:`outlier_count`, :func:`alignment`;
- snapshot files: :func:`save_snapshot`, :func:`load_snapshot`, :func:`load_index`,
  :func:`top_eigenpairs_from_snapshot`.
"""

from __future__ import annotations

from lightning_sketch.spectrum.density import (
    SpectralDensity,
    TraceEstimate,
    gaussian_density,
    hutchinson,
    hutchpp,
    slq_density,
)
from lightning_sketch.spectrum.hessian import (
    HessianEigs,
    HessianOperator,
    hessian_eigs,
    hessian_operator,
    probe_gradient,
    resolve_sketch,
)
from lightning_sketch.spectrum.lanczos import KrylovResult, arnoldi, lanczos, lanczos_tridiagonal
from lightning_sketch.spectrum.monitor import SpectrumSnapshot, spectrum_snapshot
from lightning_sketch.spectrum.snapshot import (
    load_index,
    load_snapshot,
    save_snapshot,
    snapshot_name,
    top_eigenpairs_from_snapshot,
)
from lightning_sketch.spectrum.stats import SpectrumSummary, alignment, outlier_count, ratios, rneg, summarize

__all__ = [
    "HessianEigs",
    "HessianOperator",
    "KrylovResult",
    "SpectralDensity",
    "SpectrumSnapshot",
    "SpectrumSummary",
    "TraceEstimate",
    "alignment",
    "arnoldi",
    "gaussian_density",
    "hessian_eigs",
    "hessian_operator",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_tridiagonal",
    "load_index",
    "load_snapshot",
    "outlier_count",
    "probe_gradient",
    "ratios",
    "resolve_sketch",
    "rneg",
    "save_snapshot",
    "slq_density",
    "snapshot_name",
    "spectrum_snapshot",
    "summarize",
    "top_eigenpairs_from_snapshot",
]
