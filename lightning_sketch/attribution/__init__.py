"""Training data attribution on stored gradient sketches.

arXiv 2402.03994 Sec. 5.2; TracIn (Pruthi et al. 2020); TRAK (Park et al. 2023).

Sign convention, everywhere: a **positive** score means that training on the example lowers the
query's loss (raises its margin, for TRAK); opponents are the most negative scores.

- :class:`Attributor`: queries (``top_k``, ``scores``, ``self_influence``) against a store.
- :mod:`lightning_sketch.attribution.scores`: the maths, as pure functions.
"""

from __future__ import annotations

from lightning_sketch.attribution.query import (
    DAMPING_RATIO_GRID,
    DEFAULT_DAMPING_RATIO,
    DEFAULT_MARGIN_DAMPING_RATIO,
    METHODS,
    Attributor,
    negative_margin,
    negative_margin_of,
)
from lightning_sketch.attribution.scores import (
    arnoldi_features,
    classification_margin,
    damping_loo_errors,
    dot_scores,
    lds,
    normalize_rows,
    tracin_features,
    trak_preconditioner,
)

__all__ = [
    "DAMPING_RATIO_GRID",
    "DEFAULT_DAMPING_RATIO",
    "DEFAULT_MARGIN_DAMPING_RATIO",
    "METHODS",
    "Attributor",
    "arnoldi_features",
    "classification_margin",
    "damping_loo_errors",
    "dot_scores",
    "lds",
    "negative_margin",
    "negative_margin_of",
    "normalize_rows",
    "tracin_features",
    "trak_preconditioner",
]
