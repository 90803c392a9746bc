"""Matrix-free linear algebra (layer 0, pure torch): operators and the solvers that run on them.

- :class:`LinearOperator` and its builders (:class:`FunctionOperator`, :class:`DenseOperator`,
  :func:`as_operator`): a shape, an adjoint, composition with ``@`` (curvlinops' interface);
- Krylov eigen-solvers on a symmetric (or, for Arnoldi, any square) operator: :func:`lanczos`,
  :func:`arnoldi`, :func:`lanczos_tridiagonal`, with full re-orthogonalisation;
- spectral density and trace estimates: :func:`slq_density`, :func:`hutchinson`, :func:`hutchpp`.

The solvers take a square :class:`LinearOperator` (H, Φ H Φᵀ, a dense matrix) or a matvec with
its ``dim``; they never touch a model. :mod:`lightning_sketch.spectrum` builds the Hessian operators
they run on (arXiv 2402.03994, eq. 10).
"""

from __future__ import annotations

from lightning_sketch.linalg.krylov import (
    KrylovResult,
    TolScale,
    Which,
    arnoldi,
    lanczos,
    lanczos_tridiagonal,
)
from lightning_sketch.linalg.operators import DenseOperator, FunctionOperator, LinearOperator, as_operator
from lightning_sketch.linalg.trace import (
    SpectralDensity,
    TraceEstimate,
    gaussian_density,
    hutchinson,
    hutchpp,
    slq_density,
)

__all__ = [
    "DenseOperator",
    "FunctionOperator",
    "KrylovResult",
    "LinearOperator",
    "SpectralDensity",
    "TolScale",
    "TraceEstimate",
    "Which",
    "arnoldi",
    "as_operator",
    "gaussian_density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_tridiagonal",
    "slq_density",
]
