"""Intrinsic dimension: subspace training θ = θ0 + Φᵀω and the paper's single-run doubling search.

- :class:`Subspace`: ``Subspace.attach(module, kind="affd", sketch_dim=D, seed=0, said=False,
  normalize=True)`` reparametrises a module so that ω ∈ R^D is its only trainable tensor (Li et al. 2018).
- :class:`DoublingSearch`: the single-run search of arXiv 2402.03994 (Listing 9) as a state machine.
- :func:`binary_search_dimension`: the classic one-run-per-d search, for comparison.
"""

from __future__ import annotations

from lightning_sketch.intrinsic.search import (
    Action,
    BinarySearchResult,
    DoublingSearch,
    binary_search_dimension,
)
from lightning_sketch.intrinsic.subspace import Subspace

__all__ = ["Action", "BinarySearchResult", "DoublingSearch", "Subspace", "binary_search_dimension"]
