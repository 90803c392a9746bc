"""Attribution scores on sketched gradients: pure functions, no state, no Lightning.

Shape letters: T training examples, Q queries, D sketch dimension, C checkpoints, k eigenpairs.

**Sign convention (one, everywhere).** A *positive* score means that training on the example
lowers the query's loss (for TRAK: raises the query's margin). A gradient step θ' = θ − η g(x)
changes the query loss by ≈ −η ⟨g(z), g(x)⟩, so every score here is an inner product between the
query's and the training example's (preconditioned) loss gradients, and "opponents" are the most
negative scores.

Every method reduces to one inner product between a query feature vector and a training feature
vector, so a single FAISS inner-product search serves all of them:

- ``grad_dot`` / ``tracin`` (TracIn-CP, Pruthi et al. 2020): Σ_t η_t ⟨Φg_t(z), Φg_t(x)⟩ is the inner
  product of the concatenations [√η_1 Φg_1, …, √η_C Φg_C] (:func:`tracin_features`).
- ``grad_cos``: the same with both sides unit-normalised (:func:`normalize_rows`).
- ``trak`` (Park et al. 2023, eq. 3 with the (1 − p) weighting): per checkpoint,
  ⟨(GᵀG + λI)⁻¹ Φg(z), Φg(x)⟩ with G the ``[T, D]`` stored sketched gradients, averaged over
  checkpoints; the preconditioner is applied to the query only (:func:`trak_preconditioner`).
- ``arnoldi_if`` (Schioppa et al. 2022 with the paper's sketched eigenvectors, arXiv 2402.03994 eq. 10):
  Σ_i λ_i⁻¹ ⟨u_i, Φg(z)⟩⟨u_i, Φg(x)⟩ over the top-k positive eigenpairs of Φ H Φᵀ
  (:func:`arnoldi_features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sketch.exceptions import SketchInputError, SpectrumError
from lightning_sketch.store.views import tracin_scale

__all__ = [
    "arnoldi_features",
    "classification_margin",
    "damping_loo_errors",
    "dot_scores",
    "lds",
    "normalize_rows",
    "tracin_features",
    "trak_preconditioner",
]


def _check_2d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise SketchInputError(f"`{name}` must be a 2-D floating tensor, got {got}.")


def tracin_features(slices: Sequence[Tensor], lrs: Sequence[float]) -> Tensor:
    """Concatenate per-checkpoint sketches scaled by √η_t: ``C × [R, D] -> [R, C·D]``.

    The inner product of two such rows is Σ_t η_t ⟨a_t, b_t⟩, the TracIn-CP score (Pruthi et al.
    2020, eq. 3) of two sketched gradients.

    Raises:
        SketchInputError: on an empty list, mismatched shapes, or lrs of the wrong length or sign.

    Example:
        >>> a = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
        >>> f = tracin_features(a, [0.25, 4.0])
        >>> f.tolist(), float(f[0] @ f[0])  # 0.25 * 5 + 4 * 9
        ([[0.5, 1.0, 6.0, 0.0]], 37.25)
    """
    if len(slices) == 0:
        raise SketchInputError("`slices` is empty; the store holds no checkpoint slice to attribute with.")
    if len(lrs) != len(slices):
        raise SketchInputError(f"`lrs` must have one entry per slice ({len(slices)}), got {len(lrs)}.")
    shape = tuple(slices[0].shape)
    out = []
    for i, (s, lr) in enumerate(zip(slices, lrs)):
        _check_2d(f"slices[{i}]", s)
        if tuple(s.shape) != shape:
            raise SketchInputError(
                f"`slices[{i}]` has shape {tuple(s.shape)}, expected {shape} like slices[0]."
            )
        out.append(s * tracin_scale(lr, f"`lrs[{i}]`"))
    return torch.cat(out, dim=1)


def normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise every row of ``[R, F]`` (zero rows stay zero), for ``grad_cos``.

    Example:
        >>> normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)).tolist()
        [[0.6, 0.8], [0.0, 0.0]]
    """
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def dot_scores(queries: Tensor, train: Tensor) -> Tensor:
    """All inner products ``[Q, F] × [T, F] -> [Q, T]`` (the exact reference for every search).

    Raises:
        SketchInputError: when the feature dimensions differ.

    Example:
        >>> dot_scores(torch.eye(2), torch.tensor([[1.0, 2.0]])).tolist()
        [[1.0], [2.0]]
    """
    _check_2d("queries", queries)
    _check_2d("train", train)
    if queries.shape[1] != train.shape[1]:
        raise SketchInputError(
            f"Query features have dimension {queries.shape[1]} but stored features {train.shape[1]}; "
            f"compute the queries with the store's sketch and checkpoints."
        )
    return queries @ train.to(queries.dtype).T


def trak_preconditioner(grads: Tensor, damping: float) -> Tensor:
    """The TRAK kernel inverse (GᵀG + λI)⁻¹ as a ``[D, D]`` matrix, computed in float64.

    ``grads`` are the ``[T, D]`` stored sketched loss gradients of one checkpoint. For a
    cross-entropy loss with p the probability of the correct class and m = log p − log(1 − p) the
    TRAK margin, ∇ℓ = −(1 − p)∇m exactly, so the stored loss gradients already carry TRAK's (1 − p)
    weighting, and GᵀG is the (1 − p)²-weighted feature kernel (a Gauss–Newton / Fisher form).

    Raises:
        SketchInputError: if ``damping`` is negative, or zero with a singular GᵀG.

    Example:
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> [round(v, 6) for v in trak_preconditioner(g, 1.0).diagonal().tolist()]
        [0.2, 0.5]
    """
    _check_2d("grads", grads)
    if not math.isfinite(float(damping)) or damping < 0:
        raise SketchInputError(f"`damping` must be a finite value >= 0, got {damping!r}.")
    g = grads.to(torch.float64)
    kernel = g.T @ g
    kernel.diagonal().add_(float(damping))
    chol, info = torch.linalg.cholesky_ex(kernel)
    if int(info) != 0:
        raise SketchInputError(
            f"GᵀG + λI is singular with `damping`={damping} (T={g.shape[0]} rows, D={g.shape[1]}); "
            f"pass a positive damping or let the Attributor tune it."
        )
    return torch.cholesky_inverse(chol)


def damping_loo_errors(grads: Tensor, queries: Tensor, candidates: Sequence[float]) -> Tensor:
    """Leave-one-coordinate-out error of the TRAK ridge problem for each damping candidate: ``[L]``.

    TRAK's score vector τ(z) = G (GᵀG + λI)⁻¹ q is the ridge-regression solution of
    min_w ‖Gᵀw − q‖² + λ‖w‖², which explains the query's sketch q (``[D]``) by the training sketches.
    The D coordinates of a random sketch are exchangeable, so they act as D samples of that
    regression and the closed-form leave-one-out residual e_j / (1 − H_jj), with the hat matrix
    H = GᵀG (GᵀG + λI)⁻¹, measures on held-out coordinates how well a damping generalises. This is
    the cheap held-out proxy used to choose λ without retraining; it sums the squared LOO residuals
    over ``queries`` ``[Q, D]`` (each normalised to unit norm so no query dominates).

    Raises:
        SketchInputError: on shape mismatches or a non-positive candidate.

    Example:
        >>> g = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> err = damping_loo_errors(g, g[:5], [1e-3, 1e3])
        >>> bool(err[0] < err[1])  # queries in the training span: small damping explains them
        True
    """
    _check_2d("grads", grads)
    _check_2d("queries", queries)
    if grads.shape[1] != queries.shape[1]:
        raise SketchInputError(f"`queries` have D={queries.shape[1]} but `grads` have D={grads.shape[1]}.")
    if any((not math.isfinite(float(c))) or c <= 0 for c in candidates):
        raise SketchInputError(f"damping `candidates` must be finite and > 0, got {list(candidates)}.")
    g = grads.to(torch.float64)
    q = normalize_rows(queries.to(torch.float64))
    evals, evecs = torch.linalg.eigh(g.T @ g)
    evals = evals.clamp_min(0)
    qu = q @ evecs  # [Q, D] in the eigenbasis
    errs = []
    for lam in candidates:
        shrink = evals / (evals + float(lam))  # eigenvalues of H
        resid = q - (qu * shrink) @ evecs.T  # (I - H) q
        h_diag = (evecs**2 * shrink).sum(dim=1)  # diag(H)
        loo = resid / (1.0 - h_diag).clamp_min(1e-12)
        errs.append((loo**2).sum())
    return torch.stack(errs)


def arnoldi_features(sketches: Tensor, eigenvalues: Tensor, eigenvectors: Tensor) -> Tensor:
    """Project sketches on the top eigenvectors and scale by λ^{-1/2}: ``[R, D] -> [R, k]``.

    For eigenpairs (λ_i, u_i) of the sketched Hessian Φ H Φᵀ (u_i of dimension D), the inner
    product of two such rows is Σ_i λ_i⁻¹ ⟨u_i, a⟩⟨u_i, b⟩, the Arnoldi influence score
    (Schioppa et al. 2022, eq. 5) in the sketch space. Only strictly positive eigenvalues are used;
    pass them as ``eigenvalues`` ``[k]`` with ``eigenvectors`` ``[D, k]`` (columns).

    Raises:
        SpectrumError: if no eigenvalue is positive or the shapes disagree.

    Example:
        >>> u = torch.eye(3)[:, :2]
        >>> arnoldi_features(torch.tensor([[2.0, 3.0, 5.0]]), torch.tensor([4.0, 1.0]), u).tolist()
        [[1.0, 3.0]]
    """
    _check_2d("sketches", sketches)
    if eigenvectors.ndim != 2 or eigenvectors.shape[0] != sketches.shape[1]:
        raise SpectrumError(
            f"`eigenvectors` must be [D={sketches.shape[1]}, k] (columns), got {tuple(eigenvectors.shape)}; "
            f"they must come from the sketched Hessian of the store's sketch."
        )
    if eigenvalues.ndim != 1 or eigenvalues.shape[0] != eigenvectors.shape[1]:
        raise SpectrumError(
            f"`eigenvalues` must be [k={eigenvectors.shape[1]}], got {tuple(eigenvalues.shape)}."
        )
    keep = eigenvalues > 0
    if not bool(keep.any()):
        raise SpectrumError(
            f"No positive eigenvalue among {eigenvalues.tolist()}; arnoldi_if needs the top (largest "
            f"algebraic) eigenpairs of a Hessian with positive curvature."
        )
    lam = eigenvalues[keep].to(sketches.dtype)
    u = eigenvectors[:, keep].to(sketches.dtype)
    return (sketches @ u) / lam.sqrt()


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


def lds(scores: Tensor, masks: Tensor, outputs: Tensor) -> Tensor:
    """Linear datamodeling score per query (Park et al. 2023, Def. 2.3): ``[Q]``.

    Args:
        scores: ``[Q, T]`` attribution scores (positive = helpful).
        masks: ``[M, T]`` 0/1 subset membership of the M retrained models.
        outputs: ``[M, Q]`` the model output (margin) of each retrained model on each query.

    Returns:
        ``[Q]`` Spearman correlations between the predicted group effects ``masks @ scores.T`` and
        the actual outputs, per query (NaN where a column is constant).

    Example:
        >>> s = torch.tensor([[1.0, 0.0, -1.0]])
        >>> m = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
        >>> round(float(lds(s, m, torch.tensor([[3.0], [2.0], [1.0]]))[0]), 6)
        1.0
    """
    pred = masks.to(torch.float64) @ scores.to(torch.float64).T  # [M, Q]
    return _spearman_columns(pred, outputs.to(torch.float64))


def _rank(x: Tensor) -> Tensor:
    # Average ranks for ties, column-wise, [M, Q].
    order = x.argsort(dim=0)
    ranks = torch.empty_like(x)
    ar = torch.arange(x.shape[0], dtype=x.dtype)[:, None].expand_as(x)
    ranks.scatter_(0, order, ar)
    # ties: average ranks of equal values (rare for continuous outputs; handled exactly)
    for j in range(x.shape[1]):
        col = x[:, j]
        uniq, inv, counts = torch.unique(col, return_inverse=True, return_counts=True)
        if bool((counts > 1).any()):
            sums = torch.zeros_like(uniq).scatter_add_(0, inv, ranks[:, j])
            ranks[:, j] = (sums / counts.to(x.dtype))[inv]
    return ranks


def _spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    ra, rb = _rank(a), _rank(b)
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    denom = ra.norm(dim=0) * rb.norm(dim=0)
    return (ra * rb).sum(0) / denom
