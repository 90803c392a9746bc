"""The attribution maths, per checkpoint slice: pure functions and one small value class, no state.

Shape letters: T training examples, B a block of stored rows, Q queries, D sketch dimension, k
eigenpairs.

**Sign convention (one, everywhere).** A *positive* score means that training on the example
raises the query's measurement (lowers its loss; raises its margin for TRAK). A gradient step
θ' = θ − η g(x) changes the query loss by ≈ −η ⟨g(z), g(x)⟩, so every score is a (preconditioned)
inner product between the query's and the training example's sketched gradients; "opponents" are
the most negative scores.

Every method is, per slice c, a bilinear form q_c(z)ᵀ M_c g_c(x) (the streaming engine behind
:class:`~lightning_sketch.attribution.Attributor` sums it over slices and averages over runs):

- ``grad_dot`` / ``tracin`` (TracIn-CP, Pruthi et al. 2020, eq. 3): M_c = η_c I
  (:meth:`SliceWeight.identity`); ``grad_cos`` divides by both feature norms.
- ``trak`` / ``fisher_if`` (Park et al. 2023, §3; Koh & Liang 2017): M_c = (K_c + λ_c I)⁻¹ / C for
  the slice's kernel K_c = U diag(s) Uᵀ (:func:`kernel_eigh`, :meth:`SliceWeight.damped_inverse`).
- ``arnoldi_if`` (Schioppa et al. 2022, eq. 5, with the sketched eigenvectors of arXiv 2402.03994
  eq. 10): M = U diag(1/s) Uᵀ over the top positive eigenpairs (:meth:`SliceWeight.eigen`).

A block of stored rows ``g [B, D]`` then contributes :func:`block_scores` ``(M q, g)`` to the
``[Q, T]`` scores, and :meth:`SliceWeight.quad` its self-influence g M gᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sketch.exceptions import SketchInputError, SpectrumError

__all__ = [
    "SliceWeight",
    "block_scores",
    "classification_margin",
    "kernel_eigh",
]


@dataclass(frozen=True)
class SliceWeight:
    """One slice's query weight M, a ``[D, D]`` operator kept in factored form.

    ``s is None``: M = scale · I. Otherwise M = scale · U diag(1/(s + λ)) Uᵀ with ``U [D, r]`` and
    ``s [r]`` (r ≤ D; the complement of U is dropped), float64.

    Example:
        >>> f64 = torch.float64
        >>> w = SliceWeight.damped_inverse(
        ...     "c0", torch.tensor([3.0, 1.0], dtype=f64), torch.eye(2, dtype=f64), lam=1.0, scale=2.0)
        >>> w.apply(torch.tensor([[4.0, 4.0]], dtype=f64)).tolist()  # 2 · [4/(3+1), 4/(1+1)]
        [[2.0, 4.0]]
        >>> w.quad(torch.tensor([[2.0, 0.0]], dtype=f64)).tolist()  # 2 · 2²/(3+1)
        [2.0]
    """

    name: str
    scale: float
    s: Tensor | None = None
    U: Tensor | None = None
    lam: float = 0.0

    @classmethod
    def identity(cls, name: str, scale: float) -> SliceWeight:
        """M = scale · I (TracIn's η_c, or 1 for ``grad_dot``)."""
        return cls(name, float(scale))

    @classmethod
    def damped_inverse(cls, name: str, s: Tensor, U: Tensor, lam: float, scale: float = 1.0,
                       rank: int | None = None) -> SliceWeight:
        """M = scale · (K + λI)⁻¹ for K = U diag(s) Uᵀ (eigenvalues ascending, as ``torch.linalg.eigh``);
        ``rank``: keep the top ``rank`` directions only.

        Raises:
            SketchInputError: for a negative or non-finite λ, or mismatched shapes.
        """
        if not lam >= 0 or lam == float("inf"):
            raise SketchInputError(f"The damping λ must be finite and >= 0, got {lam!r}.")
        if s.ndim != 1 or U.ndim != 2 or U.shape[1] != s.shape[0]:
            raise SketchInputError(f"Need s [r] and U [D, r], got {tuple(s.shape)} and {tuple(U.shape)}.")
        if rank is not None:
            s, U = s[-rank:], U[:, -rank:]
        return cls(name, float(scale), s.to(torch.float64), U.to(torch.float64), float(lam))

    @classmethod
    def eigen(cls, name: str, values: Tensor, vectors: Tensor) -> SliceWeight:
        """M = Σ_i u_i u_iᵀ / λ_i over the strictly positive eigenpairs (``values [k]``, ``vectors [D, k]``).

        Raises:
            SpectrumError: when no eigenvalue is positive or the shapes disagree.
        """
        if vectors.ndim != 2 or values.ndim != 1 or values.shape[0] != vectors.shape[1]:
            raise SpectrumError(
                f"Eigenpairs must be values [k] and vectors [D, k] (columns), got {tuple(values.shape)} and "
                f"{tuple(vectors.shape)}."
            )
        keep = values > 0
        if not bool(keep.any()):
            raise SpectrumError(
                f"No positive eigenvalue among {values.tolist()}; arnoldi_if needs positive curvature."
            )
        return cls(name, 1.0, values[keep].to(torch.float64), vectors[:, keep].to(torch.float64), 0.0)

    def apply(self, q: Tensor) -> Tensor:
        """``[Q, D] -> [Q, D]``: M q (M is symmetric)."""
        if self.U is None or self.s is None:
            return q * self.scale
        return ((q @ self.U) / (self.s + self.lam)) @ self.U.T * self.scale

    def quad(self, g: Tensor) -> Tensor:
        """``[B, D] -> [B]``: gᵀ M g per row (self-influence)."""
        if self.U is None or self.s is None:
            return (g * g).sum(1) * self.scale
        return ((g @ self.U) ** 2 / (self.s + self.lam)).sum(1) * self.scale


def kernel_eigh(K: Tensor, count: int) -> tuple[Tensor, Tensor, float]:
    """``(s [D] ascending, clamped ≥ 0; U [D, D]; tr(K)/T)`` of a symmetric PSD kernel ``[D, D]``.

    ``count`` is T, the examples summed into K; tr(K)/T is the mean squared per-example sketched
    gradient norm, the unit of the automatic damping (:mod:`lightning_sketch.attribution.damping`).

    Example:
        >>> s, U, unit = kernel_eigh(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), 5)
        >>> s.tolist(), unit
        ([1.0, 4.0], 1.0)
    """
    K = K.to(torch.float64)
    s, U = torch.linalg.eigh(K)
    return s.clamp_min(0), U, float(K.trace()) / max(int(count), 1)


def block_scores(weighted_queries: Tensor, rows: Tensor) -> Tensor:
    """``[Q, D] × [B, D] -> [Q, B]``: the scores of a block of stored rows, (M q)ᵀ g.

    Raises:
        SketchInputError: when the sketch dimensions differ.

    Example:
        >>> block_scores(torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 2.0]])).tolist()
        [[1.0], [2.0]]
    """
    if weighted_queries.shape[-1] != rows.shape[-1]:
        raise SketchInputError(
            f"Query features have dimension {weighted_queries.shape[-1]} but stored rows {rows.shape[-1]}; "
            "compute the queries with the store's sketch."
        )
    return weighted_queries @ rows.to(weighted_queries.dtype).T


def classification_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """TRAK's margin m = z_y − logsumexp_{j≠y} z_j = log p_y − log(1 − p_y): ``[B, K], [B] -> [B]``.

    Example:
        >>> m = classification_margin(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        >>> round(float(m), 4)
        2.0
    """
    if logits.ndim != 2 or targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise SketchInputError(
            f"`logits` must be [B, K] and `targets` [B], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}."
        )
    correct = logits.gather(1, targets.long()[:, None]).squeeze(1)
    others = logits.scatter(1, targets.long()[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)
