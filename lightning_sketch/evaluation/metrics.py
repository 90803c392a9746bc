"""Attribution quality metrics: linear datamodeling score and mislabel detection.

Shapes: ``Q`` queries, ``T`` training examples, ``S`` retrained subsets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.regression import spearman_corrcoef

from lightning_sketch.exceptions import SketchInputError

__all__ = ["lds", "mislabel_auroc", "mislabel_detection_curve"]


def _as_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SketchInputError(
                f"`{name}` must be a tensor (or array-like), got {type(x).__name__}."
            ) from err
    return x


def _finite(name: str, x: Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise SketchInputError(f"`{name}` holds {bad} NaN/inf value(s); remove or replace them first.")


def _masks(masks: Tensor, t: int) -> Tensor:
    if masks.ndim != 2 or masks.shape[1] != t:
        raise SketchInputError(
            f"`masks` must be [S, T] with T = {t} (the columns of `scores`), got {tuple(masks.shape)}."
        )
    if masks.dtype != torch.bool:
        _finite("masks", masks)
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise SketchInputError("`masks` must be boolean or hold only 0 and 1 (subset membership).")
    return masks.to(torch.float64)


def lds(
    scores: Tensor,
    masks: Tensor,
    outputs: Tensor,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Linear datamodeling score (Park et al. 2023, "TRAK", Def. 2.3).

    For retraining subset ``s`` and query ``q`` the attribution predicts the output as
    ``Σ_{t ∈ s} scores[q, t]``; ``LDS_q`` is the Spearman rank correlation, over the ``S`` subsets,
    between these predictions and the measured ``outputs[:, q]``. Ties get average ranks, as in
    ``scipy.stats.spearmanr``; the correlation comes from ``torchmetrics``'
    :func:`~torchmetrics.functional.spearman_corrcoef` (float32 ranks, so about 1e-6 accuracy).
    A query whose predictions or outputs are constant over the subsets has no rank correlation:
    its entry is NaN (as scipy's), and ``reduction="mean"`` averages the other queries with a warning.

    Args:
        scores: ``[Q, T]`` attribution scores, positive = training on ``t`` raises query ``q``'s output.
        masks: ``[S, T]`` bool (or 0/1): which training examples each retrained model saw.
        outputs: ``[S, Q]`` the measured output (e.g. the margin, averaged over seeds) of query ``q``
            under the model retrained on subset ``s``.
        reduction: ``"mean"`` (a scalar, the mean over queries) or ``"none"`` (the ``[Q]`` vector).

    Returns:
        A float64 scalar tensor (``"mean"``) or ``[Q]`` float64 tensor (``"none"``).

    Raises:
        SketchInputError: on mismatched shapes, NaN/inf inputs, non-0/1 masks, fewer than 3 subsets,
            or an unknown ``reduction``.

    Example:
        >>> scores = torch.tensor([[1.0, 0.0, -1.0]])          # Q = 1 query, T = 3 examples
        >>> masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
        >>> outputs = torch.tensor([[2.0], [-3.0], [0.5]])      # S = 3 retrained models
        >>> round(float(lds(scores, masks, outputs)), 4)        # predictions 1, -1, 0: same order
        1.0
    """
    if reduction not in ("mean", "none"):
        raise SketchInputError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    scores, masks, outputs = (
        _as_tensor(n, v) for n, v in (("scores", scores), ("masks", masks), ("outputs", outputs))
    )
    if scores.ndim != 2:
        raise SketchInputError(f"`scores` must be [Q, T], got shape {tuple(scores.shape)}.")
    q, t = scores.shape
    m = _masks(masks, t)
    s = m.shape[0]
    if outputs.ndim != 2 or tuple(outputs.shape) != (s, q):
        raise SketchInputError(
            f"`outputs` must be [S, Q] = [{s}, {q}] (one row per subset of `masks`, one column per query "
            f"of `scores`), got {tuple(outputs.shape)}."
        )
    if s < 3:
        raise SketchInputError(f"LDS needs at least 3 retrained subsets for a rank correlation, got {s}.")
    _finite("scores", scores)
    _finite("outputs", outputs)
    pred = m @ scores.to(torch.float64).T  # [S, Q]
    out = outputs.to(torch.float64)
    rho = spearman_corrcoef(pred, out).to(torch.float64).reshape(q)
    constant = (pred == pred[:1]).all(0) | (out == out[:1]).all(0)
    rho = torch.where(constant, torch.full_like(rho, float("nan")), rho)
    if reduction == "none":
        return rho
    n_const = int(constant.sum())
    if n_const == q:
        warnings.warn("LDS is undefined for every query (constant predictions or outputs); returning NaN.",
                      stacklevel=2)
        return torch.tensor(float("nan"), dtype=torch.float64)
    if n_const:
        warnings.warn(
            f"{n_const} of {q} queries have constant predictions or outputs over the subsets (no rank "
            f"correlation); the mean LDS is over the other {q - n_const}.",
            stacklevel=2,
        )
    return rho[~constant].mean()


def _self_influence_and_labels(self_influence: Tensor, is_flipped: Tensor) -> tuple[Tensor, Tensor]:
    si = _as_tensor("self_influence", self_influence)
    fl = _as_tensor("is_flipped", is_flipped)
    if si.ndim != 1 or fl.ndim != 1 or si.shape[0] != fl.shape[0]:
        raise SketchInputError(
            f"`self_influence` and `is_flipped` must both be [T] with the same T, got {tuple(si.shape)} and "
            f"{tuple(fl.shape)}."
        )
    if not si.is_floating_point():
        si = si.to(torch.float64)
    _finite("self_influence", si)
    if fl.dtype != torch.bool:
        if not bool(((fl == 0) | (fl == 1)).all()):
            raise SketchInputError("`is_flipped` must be boolean or hold only 0 and 1.")
        fl = fl.bool()
    n_flip = int(fl.sum())
    if n_flip == 0 or n_flip == fl.numel():
        raise SketchInputError(
            f"`is_flipped` must mark some but not all examples as flipped, got {n_flip} of {fl.numel()}."
        )
    return si, fl


def mislabel_auroc(self_influence: Tensor, is_flipped: Tensor) -> Tensor:
    """AUROC of ranking the flipped-label examples first by self-influence (Koh & Liang 2017, Sec. 5.4).

    The probability that a random flipped example has a higher self-influence than a random clean
    one (ties count one half), computed by ``torchmetrics``'
    :func:`~torchmetrics.functional.classification.binary_auroc`. The scores are passed as their
    average ranks scaled into (0, 1], which leaves the AUROC unchanged and keeps torchmetrics from
    squashing large self-influence values through a sigmoid (which would create false ties).

    Args:
        self_influence: ``[T]`` score per training example (higher = more suspicious).
        is_flipped: ``[T]`` bool (or 0/1), True where the label was corrupted.

    Returns:
        A float64 scalar tensor in [0, 1] (0.5 = chance).

    Raises:
        SketchInputError: on mismatched shapes, NaN/inf scores, or labels that are all or none flipped.

    Example:
        >>> si = torch.tensor([5.0, 0.1, 3.0, 0.2])
        >>> flipped = torch.tensor([True, False, False, True])
        >>> float(mislabel_auroc(si, flipped))  # pairs (flipped > clean): 5>0.1, 5>3, 0.2>0.1 -> 3 of 4
        0.75
    """
    si, fl = _self_influence_and_labels(self_influence, is_flipped)
    ranks = _average_ranks(si.to(torch.float64))
    preds = ranks / si.numel()  # in (0, 1]: no sigmoid inside torchmetrics
    return binary_auroc(preds, fl.long()).to(torch.float64)


def mislabel_detection_curve(
    self_influence: Tensor, is_flipped: Tensor, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
) -> Tensor:
    """Fraction of the flipped examples found when inspecting the top ``x`` of examples by self-influence.

    The standard "fraction of mislabels found vs fraction of data checked" curve (Koh & Liang 2017,
    Fig. 6). Inspecting ``x`` of the data means the ``round(x·T)`` examples with the largest
    self-influence (ties broken by position, earlier first).

    Args:
        self_influence: ``[T]`` score per training example.
        is_flipped: ``[T]`` bool (or 0/1).
        fractions: the inspected fractions, each in [0, 1].

    Returns:
        ``[len(fractions)]`` float64, the recall of flipped examples at each fraction.

    Raises:
        SketchInputError: as :func:`mislabel_auroc`, or for a fraction outside [0, 1].

    Example:
        >>> si = torch.tensor([5.0, 0.1, 3.0, 0.2])
        >>> flipped = torch.tensor([True, False, False, True])
        >>> mislabel_detection_curve(si, flipped, fractions=(0.25, 0.5, 1.0)).tolist()
        [0.5, 0.5, 1.0]
    """
    si, fl = _self_influence_and_labels(self_influence, is_flipped)
    fr = [float(f) for f in fractions]
    if not fr or any(not (0.0 <= f <= 1.0) for f in fr):
        raise SketchInputError(
            f"`fractions` must be a non-empty sequence of values in [0, 1], got {list(fractions)}."
        )
    order = torch.argsort(-si.to(torch.float64), stable=True)
    found = torch.cumsum(fl[order].to(torch.float64), 0)
    found = torch.cat([torch.zeros(1, dtype=torch.float64), found])
    t = si.numel()
    return torch.stack([found[round(f * t)] for f in fr]) / float(fl.sum())


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (scipy's ``rankdata``)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=x.dtype).scatter_add_(0, inv, ranks)
    return (sums / counts.to(x.dtype))[inv]
