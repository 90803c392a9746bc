"""A second view of the same queries (Attributor.view) from query sketches computed once.

References: an independent Attributor of the second method on its own (loss) query gradients, and the
identity ∇ℓ = −(1 − p)∇m between the cross-entropy and TRAK's margin, checked on exact autograd.
"""

from __future__ import annotations

import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch

from lightning_sketch.attribution import Attributor
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


def test_grad_cos_view_of_margin_sketches_equals_the_loss_cosine(run):
    path, model, batch = run
    trak = Attributor(path, model, method="trak")
    qs = trak.all_query_sketches(batch)
    view = trak.view("grad_cos")
    assert view.method == "grad_cos" and view.checkpoints == trak.checkpoints
    own = Attributor(path, model, method="grad_cos")  # its own query gradients: of the cross-entropy
    torch.testing.assert_close(view.scores(None, sketches=qs), own.scores(batch), rtol=1e-9, atol=1e-12)
    for opponents in (False, True):
        got = view.top_k(None, k=5, opponents=opponents, sketches=qs)
        want = own.top_k(batch, k=5, opponents=opponents)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)


def test_tracin_view_measures_the_margin_so_loss_scores_are_one_minus_p_times_it(run):
    path, model, batch = run
    trak = Attributor(path, model, method="trak")
    qs = trak.all_query_sketches(batch)
    view = trak.view("tracin").scores(None, sketches=qs)
    own = Attributor(path, model, method="tracin").scores(batch)
    with torch.no_grad():
        p = torch.softmax(model(batch["x"]), 1).gather(1, batch["y"][:, None])  # [Q, 1]
    torch.testing.assert_close(own, (1 - p) * view, rtol=1e-8, atol=1e-12)
    # the positive factor leaves every query's ranking unchanged
    assert torch.equal(own.argsort(1, descending=True)[:, :5], view.argsort(1, descending=True)[:, :5])


def test_precomputed_sketches_stand_for_the_batch_and_are_taken_once(run, monkeypatch):
    path, model, batch = run
    trak = Attributor(path, model, method="trak")
    want_pro, want_opp = trak.top_k(batch, k=4), trak.top_k(batch, k=4, opponents=True)
    want_info = trak.damping_info(batch, k=4)
    calls = []
    original = Attributor.query_sketches

    def spy(self, b, run=0):
        calls.append(run)
        return original(self, b, run=run)

    monkeypatch.setattr(Attributor, "query_sketches", spy)
    qs = trak.all_query_sketches(batch)
    pro, opp = trak.top_k(None, k=4, sketches=qs), trak.top_k(None, k=4, opponents=True, sketches=qs)
    info = trak.damping_info(None, k=4, sketches=qs)
    trak.view("grad_cos").top_k(None, k=4, sketches=qs)
    assert calls == [0]  # one run, one computation of the query gradients
    assert torch.equal(pro[0], want_pro[0]) and torch.equal(opp[0], want_opp[0])
    assert info["top_k_overlap"] == want_info["top_k_overlap"]


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
