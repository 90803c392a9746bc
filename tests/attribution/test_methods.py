"""Method objects (``Trak(...)``, ``FisherIF(...)``, ...): their checks, the string and keyword
shorthands, and proponents with opponents from one pass over the stored rows."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from attr_helpers import full_batch
from test_fisher_ensemble import _model, _run

from lightning_sketch.attribution import (
    METHODS,
    ArnoldiIF,
    Attributor,
    FisherIF,
    GradCos,
    GradDot,
    TracIn,
    Trak,
    _stored,
)
from lightning_sketch.attribution.methods import method_from_name
from lightning_sketch.exceptions import SketchConfigError

OBJECTS = {"grad_dot": GradDot, "tracin": TracIn, "grad_cos": GradCos, "trak": Trak, "fisher_if": FisherIF,
           "arnoldi_if": ArnoldiIF}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-slice run directory with weights and a sampled-label Fisher per slice, and its model."""
    model, x, y = _model(0)
    root = tmp_path_factory.mktemp("run")
    _run(root, model, x, y)
    return root, model, x, y


def test_every_method_name_has_one_object():
    assert {c.name for c in OBJECTS.values()} == set(METHODS)
    for name, cls in OBJECTS.items():
        assert OBJECTS[cls.name] is cls and name == cls.name
        if cls is not ArnoldiIF:  # ArnoldiIF compares by identity (it may hold tensors)
            assert method_from_name(name) == cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Trak().damping = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("build, word", [
    (lambda: Trak(damping=-1.0), "`damping`"),
    (lambda: Trak(damping=0), "`damping`"),
    (lambda: Trak(damping=math.nan), "`damping`"),
    (lambda: Trak(damping=math.inf), "`damping`"),
    (lambda: Trak(damping=True), "`damping`"),
    (lambda: Trak(damping="0.1"), "`damping`"),
    (lambda: FisherIF(damping_ratio=-0.3), "`damping_ratio`"),
    (lambda: FisherIF(damping_ratio=False), "`damping_ratio`"),
    (lambda: FisherIF(damping=0.1, damping_ratio=0.3), "not both"),
    (lambda: Trak(rank=0), "`rank`"),
    (lambda: Trak(rank=2.0), "`rank`"),
    (lambda: FisherIF(rank=True), "`rank`"),
    (lambda: GradDot(index="lsh"), "`index`"),
    (lambda: GradDot(index=None), "`index`"),
    (lambda: ArnoldiIF(k=0), "`k`"),
    (lambda: ArnoldiIF(k=2.5), "`k`"),
    (lambda: ArnoldiIF(k=True), "`k`"),
    (lambda: ArnoldiIF(eigenpairs=torch.ones(3)), "`eigenpairs`"),
    (lambda: ArnoldiIF(snapshot=3), "`snapshot`"),
    (lambda: ArnoldiIF(hessian_batches={"x": torch.ones(2)}), "`hessian_batches`"),
    (lambda: ArnoldiIF(hessian_batches=[]), "`hessian_batches`"),
    (lambda: ArnoldiIF(eigenpairs=(torch.ones(1), torch.ones(4, 1)), snapshot="s"), "one source"),
])
def test_method_objects_refuse_bad_arguments(build, word):
    with pytest.raises(SketchConfigError, match=word):
        build()


def test_good_arguments_are_kept():
    assert Trak(damping=2).damping == 2 and FisherIF(damping_ratio=0.1, rank=3).rank == 3
    assert GradDot("hnsw").index == "hnsw"
    batches = [{"x": torch.ones(2)}]
    assert ArnoldiIF(k=3, hessian_batches=batches).hessian_batches == tuple(batches)


@pytest.mark.parametrize("kw, match", [
    ({"method": Trak(), "damping": 0.1}, "beside the method object"),
    ({"method": GradDot(), "index": "flat"}, "beside the method object"),
    ({"method": "tracin", "damping": 0.1}, r"does not use \['damping'\]"),
    ({"method": "trak", "arnoldi_k": 5}, r"does not use \['arnoldi_k'\]"),
    ({"method": "arnoldi_if", "index": "ivf"}, r"does not use \['index'\]"),
    ({"method": "grad_dot", "rank": 2}, r"does not use \['rank'\]"),
    ({"snapshot": "spec"}, "method='auto'"),
    ({"arnoldi_k": 2.5}, "`arnoldi_k`"),
    ({"method": "trak", "damping": 0.1, "damping_ratio": 0.3}, "not both"),
    ({"method": Trak}, "method object"),
    ({"method": 3}, "`method` must be"),
])
def test_shorthand_conflicts_are_refused_before_any_run_is_opened(kw, match):
    with pytest.raises(SketchConfigError, match=match):
        Attributor("/nonexistent-run", torch.nn.Linear(2, 2), **kw)


def test_a_name_is_its_object_with_defaults(run):
    root, model, x, _ = run
    q = full_batch(x[:4], run[3][:4])
    auto = Attributor(root, model)
    assert auto.method == "fisher_if" and auto.method_spec == FisherIF()
    for name in ("grad_dot", "tracin", "grad_cos", "trak", "fisher_if"):
        by_name = Attributor(root, model, method=name)
        by_object = Attributor(root, model, method=OBJECTS[name]())
        assert by_name.method == by_object.method == name
        assert by_name.method_spec == by_object.method_spec == OBJECTS[name]()
        assert torch.equal(by_name.scores(q), by_object.scores(q)), name


def test_keywords_are_shorthand_for_the_objects_arguments(run):
    root, model, x, y = run
    q = full_batch(x[:4], y[:4])
    pairs = [
        ({"method": "trak", "damping": 0.5}, Trak(damping=0.5)),
        ({"method": "fisher_if", "damping_ratio": 0.1, "rank": 5}, FisherIF(damping_ratio=0.1, rank=5)),
        ({"rank": 5}, FisherIF(rank=5)),  # "auto" resolves to fisher_if on this run
        ({"method": "grad_dot", "index": "flat"}, GradDot(index="flat")),
    ]
    for kw, obj in pairs:
        short, full = Attributor(root, model, **kw), Attributor(root, model, method=obj)
        assert short.method_spec == obj
        assert torch.equal(short.scores(q), full.scores(q)), kw
    # the arguments reach the engine: an absolute damping is λ for every slice, a rank bounds M's rank
    assert all(Attributor(root, model, method=Trak(damping=0.5)).slice_damping(0, n) == 0.5
               for n in ("step-0", "step-1"))
    D = Attributor(root, model).sketch.sketch_dim
    pairs_ = (torch.tensor([3.0, 1.0], dtype=torch.float64), torch.eye(D, dtype=torch.float64)[:, :2])
    short = Attributor(root, model, method="arnoldi_if", eigenpairs=pairs_, arnoldi_k=2)
    full = Attributor(root, model, method=ArnoldiIF(k=2, eigenpairs=pairs_))
    assert short.method_spec.k == 2 and torch.equal(short.scores(q), full.scores(q))
    # arnoldi_if against its formula: Σ_i λ_i⁻¹ (u_iᵀq)(u_iᵀg) at the last slice, u_i = e_i
    qs = full.query_sketches(q)[0]
    G = torch.from_numpy(np.asarray(full.store.vectors("step-1"), dtype=np.float64))
    want = qs[:, 0:1] * G[:, 0][None] / 3.0 + qs[:, 1:2] * G[:, 1][None] / 1.0
    torch.testing.assert_close(full.scores(q), want, rtol=1e-12, atol=1e-12)


def test_view_takes_a_method_object_or_keeps_this_ones_arguments(run):
    root, model, x, y = run
    q = full_batch(x[:3], y[:3])
    trak = Attributor(root, model, method=Trak(damping=0.5, rank=4))
    fis = trak.view("fisher_if")  # the damping and rank carry over between the damped methods
    assert fis.method_spec == FisherIF(damping=0.5, rank=4)
    assert torch.equal(fis.scores(q), Attributor(root, model, method=FisherIF(damping=0.5, rank=4)).scores(q))
    other = trak.view(FisherIF(damping_ratio=0.1))
    assert other.method_spec == FisherIF(damping_ratio=0.1)
    assert torch.equal(other.scores(q), Attributor(root, model, method=FisherIF(damping_ratio=0.1)).scores(q))
    assert trak.view("tracin").method_spec == TracIn()
    with pytest.raises(SketchConfigError, match="eigenpairs"):
        trak.view("arnoldi_if")


def _spy_blocks(att, monkeypatch):
    """Count the calls of each run's ``iter_blocks`` (one call = one pass over a slice's rows)."""
    calls: list[tuple[int, str]] = []
    for r, rn in enumerate(att.runs):
        orig = rn.iter_blocks

        def counted(name, block=None, _r=r, _orig=orig):
            calls.append((_r, name))
            return _orig(name, block)

        monkeypatch.setattr(rn, "iter_blocks", counted)
    return calls


@pytest.mark.parametrize("method", ["trak", "fisher_if", "tracin", "grad_cos", "grad_dot"])
def test_proponents_and_opponents_in_one_pass_equal_two_top_k_calls(run, method, monkeypatch):
    root, model, x, y = run
    monkeypatch.setattr(_stored, "BLOCK_ROWS", 7)  # several blocks per slice
    q = full_batch(x[:5], y[:5])
    att = Attributor(root, model, method=method)
    qs = att.all_query_sketches(q)
    pro_ref, opp_ref = att.top_k(None, k=6, sketches=qs), att.top_k(None, k=6, opponents=True, sketches=qs)
    calls = _spy_blocks(att, monkeypatch)
    att.top_k(None, k=6, sketches=qs)
    one_top_k = list(calls)
    calls.clear()
    (pro_ids, pro_s), (opp_ids, opp_s) = att.proponents_opponents(None, k=6, sketches=qs)
    assert torch.equal(pro_ids, pro_ref[0]) and torch.equal(pro_s, pro_ref[1])
    assert torch.equal(opp_ids, opp_ref[0]) and torch.equal(opp_s, opp_ref[1])
    # both ends from the rows read once: the calls of a single top_k, each slice in use once
    if method != "grad_dot":  # grad_dot searches the store's FAISS index instead of streaming
        assert calls == one_top_k and sorted(calls) == sorted({(0, n) for n in att.checkpoints})
    # against the dense scores: the largest and the most negative
    dense = att.scores(None, sketches=qs)
    top, pos = dense.topk(6, dim=1)
    bottom, bpos = (-dense).topk(6, dim=1)
    torch.testing.assert_close(pro_s, top, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opp_s, -bottom, rtol=1e-5, atol=1e-6)
    assert (opp_s <= pro_s[:, -1:]).all()
    if method != "grad_dot":
        assert torch.equal(pro_ids, att.ids[pos]) and torch.equal(opp_ids, att.ids[bpos])


def test_proponents_opponents_of_an_ensemble_and_its_k_check(tmp_path):
    (m0, x, y), (m1, _, _) = _model(0), _model(1)
    _run(tmp_path / "a", m0, x, y)
    _run(tmp_path / "b", m1, x, y, sketch_seed=4)
    ens = Attributor([tmp_path / "a", tmp_path / "b"], [m0, m1], method=FisherIF(damping_ratio=0.1))
    q = full_batch(x[:3], y[:3])
    (pi, ps), (oi, os_) = ens.proponents_opponents(q, k=4)
    assert torch.equal(pi, ens.top_k(q, k=4)[0]) and torch.equal(ps, ens.top_k(q, k=4)[1])
    assert torch.equal(oi, ens.top_k(q, k=4, opponents=True)[0])
    assert torch.equal(os_, ens.top_k(q, k=4, opponents=True)[1])
    for bad in (0, len(y) + 1, 2.0, True):
        with pytest.raises(SketchConfigError, match="`k` must be"):
            ens.proponents_opponents(q, k=bad)
