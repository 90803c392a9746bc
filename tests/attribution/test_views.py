"""A second view of the same queries (Attributor.view), with query sketches computed once per function.

References: an independent Attributor of the second method with its own query gradients, and the
identity ∇ℓ = −(1 − p)∇m between the cross-entropy and TRAK's margin (why a margin-measuring default and
a loss-measuring view cannot share sketches over several slices).
"""

from __future__ import annotations

import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch

from lightning_sketch.attribution import Attributor, negative_margin_of
from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients import ParamLayout, sketch_gradients
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore


def _loss(m, b):
    return m.per_example_loss(b)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained TinyClassifier (float64) and a one-slice affd store of its training gradients."""
    torch.manual_seed(0)
    x, y, _ = blobs(n=48, seed=0, dtype=torch.float64)
    model = TinyClassifier().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(40):
        opt.zero_grad()
        model.per_example_loss(full_batch(x, y)).mean().backward()
        opt.step()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, 24, seed=3)
    path = tmp_path_factory.mktemp("views") / "s"
    store = SketchStore.create(path, sketch.spec, layout=layout)
    store.add_checkpoint("c0", step=0, lr=0.1)
    rows = sketch_gradients(model, _loss, full_batch(x, y), sketch, layout=layout)
    store.append(torch.arange(len(y)), rows, checkpoint="c0")
    store.commit()
    store.close()
    bx, by, _ = blobs(n=9, seed=5, dtype=torch.float64)
    return path, model, full_batch(bx, by)


def _counting(monkeypatch):
    calls = []
    original = Attributor.query_sketches

    def spy(self, b, run=0):
        calls.append(self.method)
        return original(self, b, run=run)

    monkeypatch.setattr(Attributor, "query_sketches", spy)
    return calls


def test_a_view_is_the_method_itself_and_shares_sketches_of_the_same_function(run, monkeypatch):
    path, model, batch = run
    want = {m: (Attributor(path, model, method=m).top_k(batch, k=5), Attributor(path, model, method=m).top_k(
        batch, k=5, opponents=True)) for m in ("grad_cos", "tracin")}
    calls = _counting(monkeypatch)
    cos = Attributor(path, model, method="grad_cos")
    qs = cos.all_query_sketches(batch)
    view = cos.view("tracin")  # both measure the loss: one computation of the query gradients
    assert view.method == "tracin" and view.checkpoints == cos.checkpoints and view.shares_queries(cos)
    for att in (cos, view):
        got = att.top_k(None, k=5, sketches=qs), att.top_k(None, k=5, opponents=True, sketches=qs)
        for g, w in zip(got, want[att.method]):
            assert torch.equal(g[0], w[0])
            torch.testing.assert_close(g[1], w[1], rtol=1e-9, atol=1e-12)
    assert calls == ["grad_cos"]


def test_a_loss_view_beside_a_margin_default_takes_its_own_sketches_once(run, monkeypatch):
    path, model, batch = run
    want_pro = Attributor(path, model, method="trak").top_k(batch, k=4)
    want_info = Attributor(path, model, method="trak").damping_info(batch, k=4)
    want_cos = Attributor(path, model, method="grad_cos").top_k(batch, k=4)
    calls = _counting(monkeypatch)
    trak = Attributor(path, model, method="trak")
    qs = trak.all_query_sketches(batch)
    pro, opp = trak.top_k(None, k=4, sketches=qs), trak.top_k(None, k=4, opponents=True, sketches=qs)
    info = trak.damping_info(None, k=4, sketches=qs)
    view = trak.view("grad_cos")
    assert (trak.query_function, view.query_function) == ("margin", "loss") and not view.shares_queries(trak)
    vqs = view.all_query_sketches(batch)
    got_cos = view.top_k(None, k=4, sketches=vqs)
    view.top_k(None, k=4, opponents=True, sketches=vqs)
    assert calls == ["trak", "grad_cos"]  # one computation per query function
    assert torch.equal(pro[0], want_pro[0]) and info["top_k_overlap"] == want_info["top_k_overlap"]
    assert torch.equal(got_cos[0], want_cos[0]) and opp[1].max() <= pro[1].min()
    # an explicit query function is kept by the view, whose sketches are then shared
    given = Attributor(path, model, method="trak", query_loss_fn=negative_margin_of(model))
    assert given.view("grad_cos").shares_queries(given) and not given.view("grad_cos").shares_queries(trak)


def test_loss_scores_are_one_minus_p_times_margin_scores_on_one_slice(run):
    """Per slice the loss and margin query gradients are parallel; over several slices the factors
    1 − p_c differ, which is why a loss view does not reuse margin sketches."""
    path, model, batch = run
    margin = Attributor(path, model, method="tracin", query_loss_fn=negative_margin_of(model)).scores(batch)
    loss = Attributor(path, model, method="tracin").scores(batch)
    with torch.no_grad():
        p = torch.softmax(model(batch["x"]), 1).gather(1, batch["y"][:, None])  # [Q, 1]
    torch.testing.assert_close(loss, (1 - p) * margin, rtol=1e-8, atol=1e-12)


def test_sketches_that_do_not_fit_the_runs_are_refused(run):
    path, model, batch = run
    trak = Attributor(path, model, method="trak")
    (q,) = trak.all_query_sketches(batch)[0]
    for bad in ([[q[:, :5]]], [[q], [q]], [[q, q]], [q], [[q.flatten()]]):
        with pytest.raises(SketchConfigError, match="`sketches` must be 1 run"):
            trak.top_k(None, k=3, sketches=bad)
    with pytest.raises(SketchConfigError, match="Pass a query batch"):
        trak.scores(None)
    with pytest.raises(SketchConfigError, match="cannot use method='arnoldi_if'"):
        trak.view("arnoldi_if")
