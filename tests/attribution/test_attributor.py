"""Attributor queries against exact references (for-loop gradients, brute-force top-k)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch, loop_grads
from exact_refs import dense_hessian
from torch import nn

from lightning_sketch.attribution import DEFAULT_DAMPING_RATIO, Attributor, negative_margin
from lightning_sketch.evaluation import lds
from lightning_sketch.exceptions import LayoutMismatchError, SketchConfigError, SpectrumError, StoreCorruptError, StoreNotFoundError
from lightning_sketch.gradients import ParamLayout, sketch_gradients
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore


def loss_fn(m, b):
    return m.per_example_loss(b)


def _trained(seed=0, flip=0.0, steps=60, dtype=torch.float64, n=48):
    torch.manual_seed(seed)
    x, y, flipped = blobs(n=n, flip=flip, seed=seed, dtype=dtype)
    model = TinyClassifier().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        model.per_example_loss(full_batch(x, y)).mean().backward()
        opt.step()
    return model, x, y, flipped


def _store(tmp_path, model, x, y, kind="identity", sketch_dim=None, lrs=(0.1,), name="s"):
    layout = ParamLayout.from_module(model)
    sketch = make(kind, layout.dim, sketch_dim or layout.dim, seed=3)
    store = SketchStore.create(tmp_path / name, sketch.spec, layout=layout)
    rows = sketch_gradients(model, loss_fn, full_batch(x, y), sketch, layout=layout)
    for i, lr in enumerate(lrs):
        store.add_checkpoint(f"c{i}", step=i, lr=lr)
        store.append(torch.arange(len(y)), rows, checkpoint=f"c{i}")
    store.commit()
    store.close()
    return tmp_path / name, sketch


@pytest.fixture(scope="module")
def trained():
    return _trained()


def test_identity_sketch_scores_equal_exact_gradient_dot_products(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y)
    att = Attributor(path, model, method="grad_dot")
    q = full_batch(x[:5], y[:5])
    exact = loop_grads(model, loss_fn, q) @ loop_grads(model, loss_fn, full_batch(x, y)).T
    # rows are stored in float32: agreement to float32 rounding of the stored gradients
    torch.testing.assert_close(att.scores(q), exact, rtol=1e-5, atol=1e-6)
    assert att.ids.tolist() == list(range(len(y)))


def test_affd_scores_correlate_with_exact(tmp_path, trained):
    model, x, y, _ = trained
    n = ParamLayout.from_module(model).dim  # 123 parameters
    path, _ = _store(tmp_path, model, x, y, kind="affd", sketch_dim=64)
    att = Attributor(path, model, method="grad_dot")
    q = full_batch(x[:8], y[:8])
    exact = loop_grads(model, loss_fn, q) @ loop_grads(model, loss_fn, full_batch(x, y)).T
    r = np.corrcoef(att.scores(q).flatten().numpy(), exact.flatten().numpy())[0, 1]
    assert n == 123 and r >= 0.9, r


def test_top_k_flat_equals_brute_force_and_opponents_are_most_negative(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y, kind="affd", sketch_dim=64)
    q = full_batch(x[:6], y[:6])
    for method in ("grad_dot", "tracin", "grad_cos", "trak"):
        att = Attributor(path, model, method=method, damping=1e-3 if method == "trak" else None, current_weights=True)
        dense = att.scores(q)
        ids, s = att.top_k(q, 5)
        want_s, want_pos = dense.topk(5, dim=1)
        assert torch.equal(ids, att.ids[want_pos]), method
        torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-7)
        ids_o, s_o = att.top_k(q, 5, opponents=True)
        low_s, low_pos = dense.topk(5, dim=1, largest=False)
        assert torch.equal(ids_o, att.ids[low_pos]), method
        torch.testing.assert_close(s_o, low_s, rtol=1e-5, atol=1e-7)
        assert bool((s_o <= s[:, -1:]).all())
    with pytest.raises(SketchConfigError, match="`k` must be an int in \\[1, 48\\]"):
        att.top_k(q, 0)


def test_tracin_is_lr_weighted_sum_over_checkpoints(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y, lrs=(0.5, 0.125))
    with pytest.raises(StoreNotFoundError, match="No saved weights for checkpoint 'c0'"):
        Attributor(path, model, method="tracin").scores(full_batch(x[:1], y[:1]))
    att = Attributor(path, model, method="tracin", current_weights=True)
    q = full_batch(x[:3], y[:3])
    exact = loop_grads(model, loss_fn, q) @ loop_grads(model, loss_fn, full_batch(x, y)).T
    torch.testing.assert_close(att.scores(q), (0.5 + 0.125) * exact, rtol=1e-5, atol=1e-6)
    cos = Attributor(path, model, method="grad_cos", current_weights=True).scores(q)
    assert float(cos.abs().max()) <= 1 + 1e-9


def _stored_rows(path):
    store = SketchStore.open(path)
    G = torch.from_numpy(np.asarray(store.vectors("c0"), dtype=np.float64))
    store.close()
    return G


def test_trak_scores_and_damping(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y, kind="affd", sketch_dim=32)
    margin_loss = negative_margin(lambda m, b: (m(b["x"]), b["y"]))
    att = Attributor(path, model, method="trak", damping=0.01, query_loss_fn=margin_loss)
    q = full_batch(x[:4], y[:4])
    G = _stored_rows(path)
    qs = sketch_gradients(model, margin_loss, q, att.sketch)
    want = qs @ torch.linalg.inv(G.T @ G + 0.01 * torch.eye(32, dtype=G.dtype)) @ G.T
    torch.testing.assert_close(att.scores(q), want, rtol=1e-6, atol=1e-8)
    # the model's per_example_margin is picked up automatically for trak
    auto = Attributor(path, model, method="trak", damping=0.01)
    torch.testing.assert_close(auto.scores(q), want, rtol=1e-6, atol=1e-8)
    # automatic damping: λ = ρ · tr(GᵀG)/T with the default ratio
    lam = DEFAULT_DAMPING_RATIO * float((G * G).sum()) / G.shape[0]  # ρ · tr(GᵀG)/T
    want_auto = qs @ torch.linalg.inv(G.T @ G + lam * torch.eye(32, dtype=G.dtype)) @ G.T
    torch.testing.assert_close(Attributor(path, model, method="trak").scores(q), want_auto, rtol=1e-6, atol=1e-8)
    # an objective on validation queries picks its argmax over the candidate ratios
    tuned = Attributor(path, model, method="trak")
    best = tuned.tune_damping([q], candidates=[1e-4, 100.0], objective=lambda s: -float(s.abs().sum()))
    assert best == 100.0 and tuned.damping_ratio == 100.0  # heavier damping shrinks scores
    with pytest.raises(SketchConfigError, match="needs `val_batches` and an `objective`"):
        tuned.tune_damping(candidates=[1.0], objective=lambda s: 0.0)
    with pytest.raises(SketchConfigError, match="applies to method='trak' or 'fisher_if'"):
        Attributor(path, model, method="grad_dot").tune_damping()


def test_arnoldi_if_matches_exact_hessian_eigenpairs(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y)
    probe = full_batch(x, y)
    att = Attributor(path, model, method="arnoldi_if", hessian_batches=[probe], arnoldi_k=5)
    H = dense_hessian(model, loss_fn, [probe])
    vals, vecs = torch.linalg.eigh(H)
    vals, vecs = vals.flip(0)[:5], vecs.flip(1)[:, :5]
    torch.testing.assert_close(att._eig[0].to(torch.float64), vals, rtol=1e-6, atol=1e-8)
    q = full_batch(x[:3], y[:3])
    gq, gt = loop_grads(model, loss_fn, q), loop_grads(model, loss_fn, full_batch(x, y))
    want = (gq @ vecs) / vals @ (gt @ vecs).T
    torch.testing.assert_close(att.scores(q), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(SpectrumError, match="needs `eigenpairs`"):
        Attributor(path, model, method="arnoldi_if")
    with pytest.raises(SpectrumError, match="D=123"):
        Attributor(path, model, method="arnoldi_if", eigenpairs=(torch.ones(2), torch.ones(7, 2)))


def test_arnoldi_if_snapshot_from_another_step_warns_once(tmp_path, trained):
    import warnings

    from lightning_sketch.spectrum.snapshot import save_snapshot

    model, x, y, _ = trained
    path, sketch = _store(tmp_path, model, x, y, lrs=(0.1, 0.1))  # slices c0 (step 0), c1 (step 1)
    D = sketch.sketch_dim
    pairs = {"eigenvalues": torch.tensor([2.0, 1.0]), "eigenvectors": torch.eye(D)[:2]}
    spec = dict(sketch.spec)
    save_snapshot(tmp_path / "spec", 7, pairs, {"sketch_spec": spec})
    with pytest.warns(UserWarning) as rec:
        att = Attributor(path, model, method="arnoldi_if", snapshot=tmp_path / "spec")
    msgs = [str(w.message) for w in rec if "spectrum snapshot" in str(w.message)]
    assert len(msgs) == 1
    assert "step 7" in msgs[0] and "step 1" in msgs[0] and "at_steps=[1]" in msgs[0]
    assert att._eig[0].tolist() == [2.0, 1.0]  # still used
    assert att.scores(full_batch(x[:2], y[:2])).shape == (2, len(y))
    save_snapshot(tmp_path / "spec2", 1, pairs, {"sketch_spec": spec})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Attributor(path, model, method="arnoldi_if", snapshot=tmp_path / "spec2")
    assert not [w for w in rec if "spectrum snapshot" in str(w.message)]  # same step: silent


def test_self_influence_ranks_flipped_labels_high(tmp_path):
    model, x, y, flipped = _trained(seed=1, flip=0.1, steps=100, n=90)
    path, _ = _store(tmp_path, model, x, y, kind="affd", sketch_dim=64)
    ids, si = Attributor(path, model, method="grad_dot").self_influence()
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(flipped[ids].numpy(), si.numpy())
    assert auc >= 0.9, auc


def test_layout_mismatch_raises(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y)
    other = TinyClassifier(hidden=7).double()
    with pytest.raises(LayoutMismatchError, match="layouts differ|layout"):
        Attributor(path, other)
    renamed = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    with pytest.raises(LayoutMismatchError):
        Attributor(path, renamed, loss_fn=lambda m, b: m(b["x"]).sum(1))


def test_corrupted_store_raises(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y)
    seg = next(p for p in path.iterdir() if p.name.startswith("seg-") and p.name.endswith(".npy") and ".ids" not in p.name)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=seg.name):
        Attributor(path, model)


def test_bad_arguments_raise(tmp_path, trained):
    model, x, y, _ = trained
    path, _ = _store(tmp_path, model, x, y)
    with pytest.raises(SketchConfigError, match="`method` must be .auto. or one of"):
        Attributor(path, model, method="magic")
    with pytest.raises(SketchConfigError, match="`damping` must be a number > 0"):
        Attributor(path, model, method="trak", damping=-1.0)
    with pytest.raises(SketchConfigError, match="not all in the store"):
        Attributor(path, model, checkpoints=["nope"])
    with pytest.raises(SketchConfigError, match="has no `per_example_loss"):
        Attributor(path, nn.Linear(2, 2))


def test_lds_of_exact_grad_dot_is_positive_on_a_linear_model():
    # LDS sanity: for a linear regression output, the group effect is additive, so the exact
    # leave-in attribution of a ridge model scores a clearly positive LDS.
    g = torch.Generator().manual_seed(0)
    X, w = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    yv = X @ w + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    xq = torch.randn(4, 3, generator=g, dtype=torch.float64)
    masks = (torch.rand(40, 30, generator=g) < 0.5).to(torch.float64)
    outs = []
    for m in masks:
        A = X[m.bool()]
        wm = torch.linalg.solve(A.T @ A + 1e-3 * torch.eye(3, dtype=torch.float64), A.T @ yv[m.bool()])
        outs.append(xq @ wm)
    outs = torch.stack(outs)
    # influence of adding example i on f(z) = z^T w: z^T (X^T X)^-1 x_i r_i (one-step Newton)
    wf = torch.linalg.solve(X.T @ X, X.T @ yv)
    resid = yv - X @ wf
    scores = xq @ torch.linalg.inv(X.T @ X) @ (X * resid[:, None]).T
    assert float(lds(scores, masks, outs)) > 0.5
