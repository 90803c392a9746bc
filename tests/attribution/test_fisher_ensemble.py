"""fisher_if, ensembles, streaming and the curvature files, against plain dense references."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attr_helpers import TinyClassifier, blobs, full_batch
from torch import nn

from lightning_sketch.attribution import DEFAULT_DAMPING_RATIO, Attributor, _stored
from lightning_sketch.attribution.curvature import (
    read_curvature,
    write_curvature,
)
from lightning_sketch.attribution.task import resolve_task
from lightning_sketch.exceptions import (
    SketchConfigError,
    SketchInputError,
    StoreCorruptError,
    StoreNotFoundError,
    UnsafeFileError,
)
from lightning_sketch.gradients import ParamLayout, sketch_gradients
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

D = 16


def loss_fn(m, b):
    return m.per_example_loss(b)


def _model(seed):
    torch.manual_seed(seed)
    x, y, _ = blobs(n=40, seed=seed, dtype=torch.float64)
    model = TinyClassifier().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        model.per_example_loss(full_batch(x, y)).mean().backward()
        opt.step()
    return model, x, y


def _run(root, model, x, y, ids=None, n_slices=2, curvature=True, sketch_seed=3):
    """A run directory as GradientSketch writes it: store/, weights/, curvature/ (current weights)."""
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=sketch_seed)
    store = SketchStore.create(root / "store", sketch.spec, layout=layout)
    ids = torch.arange(len(y)) if ids is None else ids
    rows = sketch_gradients(model, loss_fn, full_batch(x, y), sketch, layout=layout)
    Fs = []
    for c in range(n_slices):
        name = f"step-{c}"
        store.add_checkpoint(name, step=c, lr=0.1 * (c + 1))
        store.append(ids, rows * (c + 1), checkpoint=name)
        store.save_weights(name, {n: t.detach().clone() for n, t in layout.params(model).items()}, root / "weights",
                           layout.fingerprint())
        Fc = torch.randn(D, 3 * D, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
        Fc = Fc @ Fc.T
        Fs.append(Fc)
        if curvature:
            write_curvature(root, name, Fc, len(y), sketch.spec, "sampled", store=store)
    store.commit()
    store.close()
    return sketch, rows, Fs


def _dense(path):
    st = SketchStore.open(path / "store")
    out = [torch.from_numpy(np.asarray(st.vectors(n), dtype=np.float64)) for n in st.checkpoints]
    st.close()
    return out


@pytest.fixture(scope="module")
def two_models():
    return _model(0), _model(1)


def test_fisher_if_equals_dense_formula_and_is_the_default(tmp_path, two_models):
    (model, x, y), _ = two_models
    sketch, _, Fs = _run(tmp_path, model, x, y)
    att = Attributor(tmp_path, model)
    assert att.method == "fisher_if"
    q = full_batch(x[:5], y[:5])
    qs = sketch_gradients(model, lambda m, b: -m.per_example_margin(b), q, sketch)  # margin query
    G = _dense(tmp_path)
    want = 0
    for Fc, Gc in zip(Fs, G):
        lam = DEFAULT_DAMPING_RATIO * float(Fc.trace()) / len(y)  # ρ · tr(F)/T
        want = want + qs @ torch.linalg.inv(Fc + lam * torch.eye(D, dtype=torch.float64)) @ Gc.T / 2
    torch.testing.assert_close(att.scores(q), want, rtol=1e-6, atol=1e-9)
    # an absolute damping is used as given, for every slice
    want_abs = sum(qs @ torch.linalg.inv(Fc + 0.5 * torch.eye(D, dtype=torch.float64)) @ Gc.T / 2 for Fc, Gc in zip(Fs, G))
    torch.testing.assert_close(Attributor(tmp_path, model, damping=0.5).scores(q), want_abs, rtol=1e-6, atol=1e-9)
    # self-influence: g (F + λ)⁻¹ g averaged over slices
    _, si = att.self_influence()
    want_si = 0
    for Fc, Gc in zip(Fs, G):
        lam = DEFAULT_DAMPING_RATIO * float(Fc.trace()) / len(y)  # ρ · tr(F)/T
        want_si = want_si + ((Gc @ torch.linalg.inv(Fc + lam * torch.eye(D, dtype=torch.float64))) * Gc).sum(1) / 2
    torch.testing.assert_close(si, want_si, rtol=1e-6, atol=1e-9)


def test_default_without_curvature_is_trak_and_fisher_if_says_what_is_missing(tmp_path, two_models):
    (model, x, y), _ = two_models
    _run(tmp_path, model, x, y, curvature=False)
    assert Attributor(tmp_path, model).method == "trak"
    with pytest.raises(StoreNotFoundError, match="curvature='fisher'"):
        Attributor(tmp_path, model, method="fisher_if")


def test_streaming_in_small_blocks_equals_one_block(tmp_path, two_models, monkeypatch):
    (model, x, y), _ = two_models
    _run(tmp_path, model, x, y)
    q = full_batch(x[:3], y[:3])
    ref = {m: Attributor(tmp_path, model, method=m).scores(q) for m in ("tracin", "grad_cos", "trak", "fisher_if")}
    monkeypatch.setattr(_stored, "BLOCK_ROWS", 7)
    for m, want in ref.items():
        att = Attributor(tmp_path, model, method=m)
        torch.testing.assert_close(att.scores(q), want, rtol=1e-9, atol=1e-12)
        ids, s = att.top_k(q, 4)
        top, pos = want.topk(4, dim=1)
        assert torch.equal(ids, att.ids[pos]), m
        torch.testing.assert_close(s, top)


def test_ensemble_is_the_mean_of_single_runs_aligned_by_id(tmp_path, two_models):
    (m0, x0, y0), (m1, x1, y1) = two_models
    # run 1 holds the same training ids in another order
    perm = torch.randperm(len(y0), generator=torch.Generator().manual_seed(5))
    _run(tmp_path / "r0", m0, x0, y0)
    (tmp_path / "r1").mkdir()
    _run(tmp_path / "r1", m1, x0[perm], y0[perm], ids=perm)
    q = full_batch(x0[:4], y0[:4])
    for method in ("tracin", "trak", "fisher_if", "grad_cos"):
        singles = [Attributor(tmp_path / r, m, method=method) for r, m in (("r0", m0), ("r1", m1))]
        want = (singles[0].scores(q) + singles[1].scores(q)) / 2
        assert torch.equal(singles[0].ids, singles[1].ids)
        # one model per run, or one architecture whose weights are loaded from each run's weights/
        for models in ([m0, m1], TinyClassifier().double()):
            ens = Attributor([tmp_path / "r0", tmp_path / "r1"], models, method=method)
            torch.testing.assert_close(ens.scores(q), want, rtol=1e-9, atol=1e-12)
        ids, s = ens.top_k(q, 3, opponents=True)
        low, pos = want.topk(3, dim=1, largest=False)
        assert torch.equal(ids, ens.ids[pos])
        torch.testing.assert_close(s, low)


def test_ensemble_of_runs_with_different_sketch_seeds_pairs_each_run_with_its_own_sketch(tmp_path, two_models):
    (m0, x0, y0), (m1, _, _) = two_models
    _run(tmp_path / "a", m0, x0, y0)
    (tmp_path / "b").mkdir()
    _run(tmp_path / "b", m1, x0, y0, sketch_seed=4)
    q = full_batch(x0[:3], y0[:3])
    want = (Attributor(tmp_path / "a", m0).scores(q) + Attributor(tmp_path / "b", m1).scores(q)) / 2
    ens = Attributor([tmp_path / "a", tmp_path / "b"], [m0, m1])
    assert ens.sketches[0].spec != ens.sketches[1].spec
    torch.testing.assert_close(ens.scores(q), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(SketchConfigError, match="arnoldi_if' takes one run"):
        Attributor([tmp_path / "a", tmp_path / "b"], m0, method="arnoldi_if", eigenpairs=(torch.ones(1), torch.ones(D, 1)))


def test_non_finite_query_is_a_typed_error(tmp_path, two_models):
    (model, x, y), _ = two_models
    _run(tmp_path, model, x, y)
    bad = full_batch(x[:2].clone(), y[:2])
    bad["x"][1, 0] = float("nan")
    for method in ("grad_dot", "tracin", "fisher_if"):
        att = Attributor(tmp_path, model, method=method)
        with pytest.raises(SketchInputError, match=r"queries \[1\] are NaN or infinite"):
            att.top_k(bad, 3)


def test_curvature_files_are_verified(tmp_path, two_models):
    (model, x, y), _ = two_models
    sketch, _, Fs = _run(tmp_path, model, x, y)
    m, meta = read_curvature(tmp_path, "step-0", sketch.spec)
    torch.testing.assert_close(m, 0.5 * (Fs[0] + Fs[0].T))
    assert meta["count"] == len(y) and meta["estimator"] == "sampled"
    recorded = SketchStore.open(tmp_path / "store").manifest["curvature"]
    npy = tmp_path / recorded["step-0"]["matrix"]["file"]
    data = bytearray(npy.read_bytes())
    data[-9] ^= 0x01
    npy.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="SHA-256"):
        read_curvature(tmp_path, "step-0", sketch.spec)
    with pytest.raises(StoreCorruptError, match="another run"):
        read_curvature(tmp_path, "step-1", {**sketch.spec, "seed": 99})
    with pytest.raises(StoreCorruptError, match="Invalid curvature slice name"):
        read_curvature(tmp_path, "../step-1", sketch.spec)
    side = tmp_path / recorded["step-1"]["sidecar"]["file"]
    meta1 = json.loads(side.read_text())
    side.unlink()
    outside = Path(tempfile.mkdtemp()) / "elsewhere.json"  # a valid sidecar, outside the run directory
    outside.write_text(json.dumps(meta1))
    side.symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="outside the run directory"):
        read_curvature(tmp_path, "step-1", sketch.spec)


def test_sampled_labels_give_the_gauss_newton_matrix(two_models):
    """E_ŷ[ĝĝᵀ] = Jᵀ(diag p − ppᵀ)J for the cross-entropy: a Monte-Carlo check against the exact GGN."""
    (model, x, y), _ = two_models
    xb = x[:3]
    batch = full_batch(xb, y[:3])
    task = resolve_task(model, batch, loss_fn).as_fisher()
    assert task.kernel == "sampled"
    layout = ParamLayout.from_module(model)
    ident = make("identity", layout.dim, layout.dim, seed=0)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    acc = torch.zeros(layout.dim, layout.dim, dtype=torch.float64)
    for _ in range(n // 3):
        ((fn, drawn, w),) = task.kernel_terms(model, batch, gen)
        g = sketch_gradients(model, fn, drawn, ident, layout=layout)
        acc += w * g.T @ g
    acc /= n // 3
    # exact GGN: Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b
    params = layout.flatten(layout.params(model))

    def logits(vec):
        return torch.func.functional_call(model, layout.unflatten(vec), (xb,))

    J = torch.func.jacrev(logits)(params)  # [B, K, N]
    p = torch.softmax(logits(params), -1)
    ggn = sum(J[b].T @ (torch.diag(p[b]) - torch.outer(p[b], p[b])) @ J[b] for b in range(3))
    rel = float((acc - ggn).norm() / ggn.norm())
    assert rel < 0.1, rel


def test_models_outside_the_conventions_fall_back_with_a_reason():
    class NotCE(TinyClassifier):
        per_example_margin = None

        def per_example_loss(self, batch):
            return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none") ** 2

    xb, yb, _ = blobs(n=6)
    task = resolve_task(NotCE(), full_batch(xb, yb), loss_fn)
    assert task.kernel == "empirical" and task.kernel_terms is None
    assert "cross-entropy" in task.reason and "per_example_margin" in task.reason
    task = resolve_task(NotCE(), {"x": xb}, loss_fn=lambda m, b: m(b["x"]).sum(1))
    assert task.kernel == "empirical" and "no targets" in task.reason


def test_rank_keeps_the_top_curvature_directions(tmp_path, two_models):
    (model, x, y), _ = two_models
    sketch, _, Fs = _run(tmp_path, model, x, y)
    q = full_batch(x[:3], y[:3])
    qs = sketch_gradients(model, lambda m, b: -m.per_example_margin(b), q, sketch)
    want = 0
    for Fc, Gc in zip(Fs, _dense(tmp_path)):
        s, U = torch.linalg.eigh(Fc)
        s, U = s[-5:], U[:, -5:]  # the 5 largest eigenpairs, projected (complement dropped)
        lam = DEFAULT_DAMPING_RATIO * float(Fc.trace()) / len(y)
        want = want + (qs @ U / (s + lam)) @ (Gc @ U).T / 2
    torch.testing.assert_close(Attributor(tmp_path, model, rank=5).scores(q), want, rtol=1e-6, atol=1e-9)
    with pytest.raises(SketchConfigError, match="`rank` must be a positive int"):
        Attributor(tmp_path, model, rank=0)
