"""The report's query section: what each ranking means, the second view beside the first, statistics."""

from __future__ import annotations

from markupsafe import escape

from lightning_sketch.report import plots
from lightning_sketch.io.safeio import write_checked_json
from lightning_sketch.attribution.meaning import meaning
from lightning_sketch.report import build_report

SCRIPT = "<script>alert(1)</script>"
PIC = [[0.0, 1.0], [1.0, 0.0]]


def _entries(ids, labels, sign):
    return [{"id": i, "score": sign / (r + 1), "label": lab, "image": PIC}
            for r, (i, lab) in enumerate(zip(ids, labels))]


def _doc(n_queries=2, k=6, view_method="grad_cos"):
    """Query 0 (label 1, predicted 1) and query 1 (label 2, predicted 0): trak and a grad_cos view."""
    qs, vs = [], []
    for q in range(n_queries):
        label, pred = (1, 1) if q % 2 == 0 else (2, 0)
        qs.append({"query": q, "label": label, "prediction": pred, "image": PIC,
                   "proponents": _entries([10, 11 + q, 20 + q, 30, 40, 50][:k], [1, 2, 3, 1, 1, 1][:k], 1.0),
                   "opponents": _entries(range(100 + 10 * q, 100 + 10 * q + k), [4] * k, -1.0)})
        vs.append({"query": q,
                   "proponents": _entries(range(200 + 10 * q, 200 + 10 * q + k), [label] * k, 1.0),
                   "opponents": _entries(range(300 + 10 * q, 300 + 10 * q + k), [5] * k, -1.0)})
    return {"format": "lightning_sketch.query/v1", "method": "trak", "split": "test", "store": "s",
            "ckpt": "c",
            "k": k, "queries": qs, "damping": {"kernel": "margin", "rule": None}, "query_function": "margin",
            "second_view": {"method": view_method, "query_function": "loss", "queries": vs}}


def _section(text):
    return text.split('<section id="attribution">')[1].split("</section>")[0]


def test_both_rankings_their_meanings_and_statistics(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_checked_json(run / "query.json", _doc())
    drawn = []
    original = plots.attribution_figure
    monkeypatch.setattr(plots, "attribution_figure", lambda rows: drawn.append(rows) or original(rows))
    text = _section(build_report(run))
    for method, measure in (("trak", "margin"), ("grad_cos", "loss")):  # the library's own sentences
        m = meaning(method, measure)
        assert str(escape(m["proponent"])) in text and str(escape(m["opponent"])) in text
    assert "What this ranking means (counterfactual)" in text and "Second view (similarity)" in text
    # trak: both queries have proponent labels 1,2,3,1,1,1: 4 of 6 agree with query 0 (label 1), 1 of 6 with
    # query 1 (label 2) -> 5/12; the correctly classified query 0 alone: 4/6. Hubs: ids 10, 30, 40, 50.
    assert "trak: 41.7% of the top proponents share the query&#39;s label (2 labelled queries; 66.7%" in text
    assert "hubs): id 10 in 2 queries, id 30 in 2 queries, id 40 in 2 queries, id 50 in 2 queries" in text
    assert "grad_cos: 100.0% of the top proponents share" in text and "hubs): none; 12 distinct ids" in text
    # one row of pictures per query and ranking, each at most ten training examples, labelled by method
    assert [r["view"] for r in drawn[0]] == ["trak", "grad_cos", "trak", "grad_cos"]
    assert all(len(r["proponents"]) + len(r["opponents"]) <= 10 for r in drawn[0])
    assert [e["id"] for e in drawn[0][1]["proponents"]] == [200, 201, 202, 203, 204]
    # the table lists every example of both rankings, with their method
    assert text.count("<tr>") == 1 + 2 * 2 * 2 * 6
    assert text.count('<td class="l">grad_cos</td>') == 0 and text.count("<td>grad_cos</td>") == 2 * 2 * 6


def test_view_queries_are_capped_and_hostile_views_are_escaped_or_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_checked_json(run / "query.json", _doc(n_queries=5, k=2))
    text = _section(build_report(run))
    assert "show the first 3 of 5 queries" in text  # two rows of pictures per query: half as many queries
    write_checked_json(run / "query.json", _doc(view_method=SCRIPT))
    text = _section(build_report(run))
    assert "<script" not in text
    assert "Second view: no meaning is recorded for method <code>&lt;script&gt;" in text
    doc = _doc()
    doc["second_view"]["queries"].reverse()  # not in the order of the queries
    write_checked_json(run / "query.json", doc)
    text = _section(build_report(run))
    assert "is not a valid query result (its second_view is not a method with one record" in text
