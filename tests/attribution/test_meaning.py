"""The meaning table and the per-run proponent statistics against hand computations."""

from __future__ import annotations

import pytest

from lightning_sketch.attribution import METHODS
from lightning_sketch.attribution.meaning import (
    MEASURES,
    METHOD_MEANINGS,
    default_second_view,
    meaning,
    proponent_summary,
)
from lightning_sketch.exceptions import SketchConfigError


def test_every_method_has_one_meaning_and_the_measure_follows_the_kernel():
    assert set(METHOD_MEANINGS) == set(METHODS)
    for m in METHODS:
        for measure in MEASURES:
            text = meaning(m, measure)
            assert text["method"] == m and all(text[f] for f in ("score", "proponent", "opponent"))
            assert "{" not in " ".join(text.values())  # every placeholder filled
    assert "margin" in meaning("trak", "margin")["proponent"]
    assert "loss" in meaning("trak")["proponent"] and "query_loss_fn" in meaning("trak", "given")["proponent"]
    assert meaning("trak")["family"] == "counterfactual" and meaning("grad_cos")["family"] == "similarity"
    assert [default_second_view(m) for m in METHODS] == [
        None if m in ("grad_dot", "tracin", "grad_cos") else "grad_cos" for m in METHODS]
    with pytest.raises(SketchConfigError, match="No meaning is recorded for method 'nope'"):
        meaning("nope")
    with pytest.raises(SketchConfigError, match="`measure` must be one of"):
        meaning("trak", "gradients")


def test_proponent_summary_against_a_hand_count():
    ids = [[10, 11, 12], [10, 13, 14], [10, 11, 15], [16, 17, 18]]
    labels = [[1, 1, 2], [0, 2, None], [3, 3, 3], [4, 4, 4]]
    query_labels = [1, 2, 3, None]  # the last query's label is unknown: not counted
    preds = [1, 0, 3, 4]  # query 1 is misclassified
    s = proponent_summary(ids, labels, query_labels, preds)
    # query 0: 2 of 3 agree; query 1: 1 of the 2 known; query 2: 3 of 3  ->  6 of 8
    assert s["label_agreement"] == 6 / 8 and s["label_agreement_queries"] == 3
    # correctly classified: queries 0 and 2  ->  5 of 6
    assert s["label_agreement_correct"] == 5 / 6 and s["correct_queries"] == 2
    assert s["hubs"] == [{"id": 10, "queries": 3}, {"id": 11, "queries": 2}]
    assert s["distinct"] == 9 and s["pairs"] == 12
    # without class labels (regression), only the hubs are counted
    bare = proponent_summary(ids)
    assert bare["label_agreement"] is None and bare["label_agreement_correct"] is None
    assert bare["hubs"] == s["hubs"]
    assert proponent_summary(ids, hubs=1)["hubs"] == [{"id": 10, "queries": 3}]
    with pytest.raises(SketchConfigError, match="`query_labels` has 2 entries for 4 queries"):
        proponent_summary(ids, labels, [1, 2])
    with pytest.raises(SketchConfigError, match="one label per proponent id"):
        proponent_summary(ids, [[1], [2], [3], [4]], query_labels)
