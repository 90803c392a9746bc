"""What a score, a proponent and an opponent mean for each attribution method, and per-run statistics.

The one source of the sentences that ``lightning-sketch query`` prints in its table header, stores in
its JSON (``"meaning"``) and that ``lightning-sketch report`` shows beside each ranking. Pure Python:
no torch, no FAISS.

Two families rank differently, and a user reading a top-k list has to know which one it is:

- **counterfactual** (``trak``, ``fisher_if``, ``arnoldi_if``): the score estimates how much the
  query's measurement would change if the example were removed from training; the inverse curvature
  discounts directions that many training examples share, so the strongest proponents need not look
  like the query (they may even carry another label).
- **similarity** (``grad_cos``, and in part ``grad_dot``/``tracin``): the score compares the query's
  gradient with the example's; proponents are look-alikes in gradient space, usually of the query's
  own label.

:func:`proponent_summary` measures the difference on a run: the fraction of top-k proponents that
share the query's label, and the "hubs" that are top proponents of many queries.

Example:
    >>> m = meaning("trak", measure="margin")
    >>> m["family"], m["proponent"].split(" (")[0]
    ('counterfactual', "removing it from training would lower this query's margin the most")
    >>> s = proponent_summary([[3, 4], [3, 5]], [[1, 2], [1, 1]], query_labels=[1, 1])
    >>> s["label_agreement"], s["hubs"]
    (0.75, [{'id': 3, 'queries': 2}])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lightning_sketch.exceptions import SketchConfigError

__all__ = ["MEASURES", "METHOD_MEANINGS", "default_second_view", "meaning", "proponent_summary"]

#: method -> (family, what the score approximates, what a proponent is, what an opponent is).
#: ``{gain}``/``{undo}`` are filled by :func:`meaning` with the query's measurement: "raise this query's
#: margin"/"lower this query's margin" where the queries measure their margin (``trak`` and
#: ``fisher_if`` on classifiers), "lower this query's loss"/"raise this query's loss" where they measure
#: their loss.
METHOD_MEANINGS: dict[str, tuple[str, str, str, str]] = {
    "trak": (
        "counterfactual",
        "TRAK: how much training on the example made the {gain_noun}, through the inverse of the "
        "damped kernel (K + λI) of the training gradients, averaged over checkpoints",
        "removing it from training would {undo} the most (counterfactual influence); proponents need "
        "not look like the query, since directions shared by many training examples are discounted",
        "removing it from training would {gain} the most",
    ),
    "fisher_if": (
        "counterfactual",
        "an influence function: how much up-weighting the example would {gain}, through the inverse "
        "of the damped sampled-label Fisher, averaged over checkpoints",
        "removing it from training would {undo} the most (counterfactual influence); proponents need "
        "not look like the query, since directions shared by many training examples are discounted",
        "removing it from training would {gain} the most",
    ),
    "arnoldi_if": (
        "counterfactual",
        "an influence function restricted to the top Hessian eigen-directions at the last checkpoint",
        "removing it from training would {undo} the most along the sharpest directions of the loss "
        "(counterfactual influence); proponents need not look like the query",
        "removing it from training would {gain} the most along those directions",
    ),
    "tracin": (
        "training path",
        "TracIn: the sum over checkpoints of lr · (query gradient · example gradient), the first-order "
        "change of the query's measurement by the SGD steps taken on the example",
        "the steps taken on it during training did the most to {gain} (its gradient is large and "
        "points the query's way: look-alikes and hard examples)",
        "the steps taken on it did the most to {undo}",
    ),
    "grad_dot": (
        "similarity",
        "the dot product of the query's and the example's gradients at the last checkpoint (one step "
        "of TracIn)",
        "one step on it would {gain} the most (a large gradient pointing the query's way)",
        "one step on it would {undo} the most",
    ),
    "grad_cos": (
        "similarity",
        "the cosine between the query's and the example's gradients over the checkpoints (the "
        "similarity view: gradient norms do not count)",
        "its loss gradient points the same way as the query's, usually a look-alike of the query's "
        "own label",
        "its gradient points the opposite way: training on it pushes against this query",
    ),
}

_MEASURES = {
    "margin": {"gain": "raise this query's margin", "undo": "lower this query's margin",
               "gain_noun": "query's margin higher"},
    "loss": {"gain": "lower this query's loss", "undo": "raise this query's loss",
             "gain_noun": "query's loss lower"},
    "given": {"gain": "lower this query's query_loss_fn", "undo": "raise this query's query_loss_fn",
              "gain_noun": "query's query_loss_fn lower"},
}
#: what :func:`meaning` accepts as ``measure`` (:attr:`Attributor.query_function`).
MEASURES = tuple(_MEASURES)


def meaning(method: str, measure: str = "loss") -> dict[str, str]:
    """What ``method``'s score, proponents and opponents mean (JSON-ready strings).

    Args:
        method: one of :data:`~lightning_sketch.attribution.METHODS`.
        measure: what the queries measure, one of :data:`MEASURES`: the Attributor's
            :attr:`~lightning_sketch.attribution.Attributor.query_function` (``"margin"``,
            ``"loss"``, or ``"given"`` for a ``query_loss_fn``).

    Returns:
        ``{"method", "family", "measure", "score", "proponent", "opponent"}``: ``family`` is
        ``"counterfactual"``, ``"training path"`` or ``"similarity"``.

    Raises:
        SketchConfigError: for a method without an entry in :data:`METHOD_MEANINGS`, or an unknown
            ``measure``.
    """
    if method not in METHOD_MEANINGS:
        raise SketchConfigError(f"No meaning is recorded for method {method!r}; pass one of "
                                f"{sorted(METHOD_MEANINGS)}.")
    if measure not in _MEASURES:
        raise SketchConfigError(f"`measure` must be one of {MEASURES}, got {measure!r}.")
    family, score, pro, opp = METHOD_MEANINGS[method]
    words = _MEASURES[measure]
    return {"method": method, "family": family, "measure": measure, "score": score.format(**words),
            "proponent": pro.format(**words), "opponent": opp.format(**words)}


def default_second_view(method: str) -> str | None:
    """The view shown beside ``method`` by default: ``"grad_cos"`` beside the counterfactual methods
    (whose proponents need not resemble the query), ``None`` beside the others (``grad_cos``,
    ``grad_dot`` and ``tracin`` already rank by gradient alignment).

    Example:
        >>> default_second_view("trak"), default_second_view("tracin")
        ('grad_cos', None)
    """
    if method not in METHOD_MEANINGS:
        raise SketchConfigError(f"Unknown method {method!r}; pass one of {sorted(METHOD_MEANINGS)}.")
    return "grad_cos" if METHOD_MEANINGS[method][0] == "counterfactual" else None


def proponent_summary(
    proponent_ids: Sequence[Sequence[int]],
    proponent_labels: Sequence[Sequence[int | None]] | None = None,
    query_labels: Sequence[int | None] | None = None,
    predictions: Sequence[int | None] | None = None,
    hubs: int = 5,
) -> dict[str, Any]:
    """Label agreement and hubs of a run's top-k proponents (JSON-ready).

    Args:
        proponent_ids: per query, the ids of its top-k proponents (``Q`` lists).
        proponent_labels: per query, the class labels of those proponents (``None`` where unknown);
            ``None`` when the task has no class labels.
        query_labels: the queries' class labels (``None`` where unknown).
        predictions: the model's predicted classes of the queries, to restrict the agreement to
            correctly classified queries.
        hubs: how many of the most frequent proponents to list.

    Returns:
        ``label_agreement``: the fraction of (query, proponent) pairs with both labels known whose
        labels are equal, over queries with a known label (``None`` without labels);
        ``label_agreement_queries``: those queries; ``label_agreement_correct`` and
        ``correct_queries``: the same over queries whose prediction equals their label;
        ``hubs``: up to ``hubs`` ids that are proponents of at least two queries, as
        ``{"id", "queries"}`` (most queries first, then smaller id); ``distinct``: distinct proponent
        ids; ``pairs``: (query, proponent) pairs in all.

    Raises:
        SketchConfigError: if the per-query sequences do not have one entry per query.
    """
    Q = len(proponent_ids)
    for name, seq in (("proponent_labels", proponent_labels), ("query_labels", query_labels),
                      ("predictions", predictions)):
        if seq is not None and len(seq) != Q:
            raise SketchConfigError(f"`{name}` has {len(seq)} entries for {Q} queries; pass one per query.")
    per_query = zip(proponent_ids, proponent_labels or [])
    if proponent_labels is not None and any(len(i) != len(lab) for i, lab in per_query):
        raise SketchConfigError("`proponent_labels` must list one label per proponent id of each query.")

    def agreement(keep: Sequence[bool]) -> tuple[float | None, int]:
        if proponent_labels is None or query_labels is None:
            return None, 0
        same = total = queries = 0
        for q in range(Q):
            y = query_labels[q]
            if y is None or not keep[q]:
                continue
            known = [lab for lab in proponent_labels[q] if lab is not None]
            if not known:
                continue
            queries += 1
            total += len(known)
            same += sum(lab == y for lab in known)
        return (same / total if total else None), queries

    everyone = [True] * Q
    correct = ([p is not None and query_labels is not None and p == query_labels[q]
                for q, p in enumerate(predictions)] if predictions is not None else None)
    agree, n_agree = agreement(everyone)
    agree_c, n_c = agreement(correct) if correct is not None else (None, 0)
    counts = Counter(int(i) for ids in proponent_ids for i in set(ids))
    ranked = sorted(((c, i) for i, c in counts.items() if c >= 2), key=lambda t: (-t[0], t[1]))
    return {
        "label_agreement": agree, "label_agreement_queries": n_agree,
        "label_agreement_correct": agree_c, "correct_queries": n_c,
        "hubs": [{"id": i, "queries": c} for c, i in ranked[:hubs]],
        "distinct": len(counts), "pairs": sum(len(ids) for ids in proponent_ids),
    }
