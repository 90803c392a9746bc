"""Training data attribution on stored gradient sketches.

arXiv 2402.03994 Sec. 5.2; TracIn (Pruthi et al. 2020); TRAK (Park et al. 2023).

Sign convention, everywhere: a **positive** score means that training on the example lowers the
query's loss (raises its margin, for TRAK); opponents are the most negative scores.

- :class:`Attributor`: queries (``top_k``, ``proponents_opponents``, ``scores``, ``self_influence``)
  against a store.
- :mod:`lightning_sketch.attribution.methods`: the method objects (:class:`Trak`, :class:`FisherIF`,
  :class:`TracIn`, :class:`GradCos`, :class:`GradDot`, :class:`ArnoldiIF`), each with its arguments.
- :mod:`lightning_sketch.attribution.task`: what is differentiated (loss, query measurement, kernel).
- :mod:`lightning_sketch.attribution.scores`: the per-slice maths, as pure functions.
- :mod:`lightning_sketch.attribution.damping`: the automatic damping and its diagnostics.
"""

from __future__ import annotations

from lightning_sketch.attribution.damping import (
    DAMPING_RATIO_GRID,
    DEFAULT_DAMPING_RATIO,
)
from lightning_sketch.attribution.methods import (
    METHODS,
    ArnoldiIF,
    AttributionMethod,
    FisherIF,
    GradCos,
    GradDot,
    TracIn,
    Trak,
)
from lightning_sketch.attribution.query import Attributor, negative_margin, negative_margin_of
from lightning_sketch.attribution.scores import SliceWeight, block_scores, classification_margin, kernel_eigh
from lightning_sketch.attribution.task import AttributionTask, resolve_task

__all__ = [
    "DAMPING_RATIO_GRID",
    "DEFAULT_DAMPING_RATIO",
    "METHODS",
    "ArnoldiIF",
    "AttributionMethod",
    "AttributionTask",
    "Attributor",
    "FisherIF",
    "GradCos",
    "GradDot",
    "SliceWeight",
    "block_scores",
    "classification_margin",
    "kernel_eigh",
    "negative_margin",
    "negative_margin_of",
    "resolve_task",
    "TracIn",
    "Trak",
]
