"""Hessian spectra on sketched Hessian-vector products (arXiv 2402.03994, eq. 10; Sec. 5.5 and Table 7).

Pure PyTorch (no Lightning):

- the probe-set Hessian as a :class:`~lightning_sketch.linalg.LinearOperator`:
  :func:`hessian_operator` (exact H, or Φ H Φᵀ);
- :func:`hessian_eigs`, the entry point: top-k eigenpairs, exact or sketched;
- :func:`spectrum_snapshot`: one full snapshot (the callback's functional twin);
- summary statistics: :func:`rneg`, :func:`ratios`, :func:`outlier_count`, :func:`alignment`;
- snapshot files: :func:`save_snapshot`, :func:`load_snapshot`, :func:`load_index`,
  :func:`top_eigenpairs_from_snapshot`.

The solvers they run (:func:`lanczos`, :func:`arnoldi`, :func:`slq_density`, :func:`hutchinson`,
:func:`hutchpp`) live in :mod:`lightning_sketch.linalg` and are re-exported here.
"""

from __future__ import annotations

from lightning_sketch.linalg import (
    KrylovResult,
    SpectralDensity,
    TraceEstimate,
    arnoldi,
    gaussian_density,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_tridiagonal,
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
