"""Pure score functions against exact references (float64)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from lightning_sketch.attribution import scores as S
from lightning_sketch.exceptions import SketchInputError, SpectrumError

DT = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_tracin_features_inner_product_is_lr_weighted_sum():
    a = [_rand(3, 5, seed=1), _rand(3, 5, seed=2), _rand(3, 5, seed=3)]
    b = [_rand(4, 5, seed=4), _rand(4, 5, seed=5), _rand(4, 5, seed=6)]
    lrs = [0.5, 0.1, 0.02]
    got = S.dot_scores(S.tracin_features(a, lrs), S.tracin_features(b, lrs))
    want = sum(lr * at @ bt.T for lr, at, bt in zip(lrs, a, b))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_tracin_features_errors():
    with pytest.raises(SketchInputError, match="`slices` is empty"):
        S.tracin_features([], [])
    with pytest.raises(SketchInputError, match="one entry per slice"):
        S.tracin_features([_rand(2, 3)], [0.1, 0.2])
    with pytest.raises(SketchInputError, match="expected"):
        S.tracin_features([_rand(2, 3), _rand(2, 4)], [0.1, 0.2])
    with pytest.raises(SketchInputError, match="finite learning rate"):
        S.tracin_features([_rand(2, 3)], [-1.0])
    with pytest.raises(SketchInputError, match="2-D floating"):
        S.tracin_features([torch.zeros(3, dtype=torch.long)], [1.0])


def test_dot_scores_dimension_mismatch():
    with pytest.raises(SketchInputError, match="Query features have dimension 3"):
        S.dot_scores(_rand(2, 3), _rand(4, 5))


def test_normalize_rows_gives_cosine():
    a, b = _rand(3, 7, seed=1), _rand(5, 7, seed=2)
    got = S.dot_scores(S.normalize_rows(a), S.normalize_rows(b))
    want = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(got, want)


def test_trak_preconditioner_is_damped_kernel_inverse():
    g = _rand(40, 6)
    got = S.trak_preconditioner(g, 0.3)
    want = torch.linalg.inv(g.T @ g + 0.3 * torch.eye(6, dtype=DT))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(SketchInputError, match="`damping` must be"):
        S.trak_preconditioner(g, -1.0)
    with pytest.raises(SketchInputError, match="singular"):
        S.trak_preconditioner(torch.zeros(5, 3, dtype=DT), 0.0)


def test_damping_loo_errors_match_brute_force_refits():
    g, q = _rand(12, 7, seed=1), _rand(2, 7, seed=2)
    lams = [0.05, 1.0, 20.0]
    got = S.damping_loo_errors(g, q, lams)
    qn = S.normalize_rows(q)
    for li, lam in enumerate(lams):
        total = 0.0
        for qi in qn:
            for j in range(7):  # refit the ridge problem without coordinate j, predict it
                keep = [c for c in range(7) if c != j]
                X, y = g.T[keep], qi[keep]  # [D-1, T]
                w = torch.linalg.solve(X.T @ X + lam * torch.eye(12, dtype=DT), X.T @ y)
                total += float((qi[j] - g.T[j] @ w) ** 2)
        assert got[li].item() == pytest.approx(total, rel=1e-8)
    with pytest.raises(SketchInputError, match="candidates"):
        S.damping_loo_errors(g, q, [0.0])
    with pytest.raises(SketchInputError, match="D=5"):
        S.damping_loo_errors(g, _rand(2, 5), [1.0])


def test_arnoldi_features_match_eigen_sum():
    a, b = _rand(3, 6, seed=1), _rand(4, 6, seed=2)
    m = _rand(6, 6, seed=3)
    vals, vecs = torch.linalg.eigh(m @ m.T)
    vals, vecs = vals.flip(0)[:4], vecs.flip(1)[:, :4]
    got = S.dot_scores(S.arnoldi_features(a, vals, vecs), S.arnoldi_features(b, vals, vecs))
    want = torch.zeros(3, 4, dtype=DT)
    for i in range(4):
        want += torch.outer(a @ vecs[:, i], b @ vecs[:, i]) / vals[i]
    torch.testing.assert_close(got, want)
    # non-positive eigenvalues are dropped
    f = S.arnoldi_features(a, torch.tensor([2.0, -1.0], dtype=DT), vecs[:, :2])
    assert f.shape == (3, 1)
    with pytest.raises(SpectrumError, match="No positive eigenvalue"):
        S.arnoldi_features(a, torch.tensor([-2.0], dtype=DT), vecs[:, :1])
    with pytest.raises(SpectrumError, match="must be \\[D=6, k\\]"):
        S.arnoldi_features(a, vals, vecs.T[:, :3])
    with pytest.raises(SpectrumError, match="`eigenvalues` must be"):
        S.arnoldi_features(a, vals[:2], vecs)


def test_classification_margin_is_log_odds():
    logits, y = _rand(5, 4), torch.tensor([0, 3, 1, 2, 2])
    p = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(S.classification_margin(logits, y), torch.log(p) - torch.log1p(-p))
    with pytest.raises(SketchInputError, match="`logits` must be"):
        S.classification_margin(logits, y[:2])


def test_loss_gradient_is_minus_one_minus_p_times_margin_gradient():
    # The identity behind TRAK's (1 - p) weighting on stored loss gradients.
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).double()
    x, y = _rand(1, 4), torch.tensor([1])
    logits = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    g_loss = torch.autograd.grad(loss, net.weight, retain_graph=True)[0]
    g_margin = torch.autograd.grad(S.classification_margin(logits, y).sum(), net.weight)[0]
    p = logits.softmax(-1)[0, 1]
    torch.testing.assert_close(g_loss, -(1 - p) * g_margin)


def test_lds_matches_scipy_spearman():
    scores = _rand(4, 20, seed=1)
    masks = (torch.rand(15, 20, generator=torch.Generator().manual_seed(2)) < 0.5).to(DT)
    outputs = _rand(15, 4, seed=3)
    got = S.lds(scores, masks, outputs)
    pred = masks @ scores.T
    for j in range(4):
        assert got[j].item() == pytest.approx(spearmanr(pred[:, j], outputs[:, j])[0], abs=1e-12)
    # ties are averaged as scipy does
    tied = torch.tensor([[1.0, 1.0, 2.0]], dtype=DT)
    m = torch.eye(3, dtype=DT)
    out = torch.tensor([[1.0], [2.0], [3.0]], dtype=DT)
    assert S.lds(tied, m, out)[0].item() == pytest.approx(spearmanr([1, 1, 2], [1, 2, 3])[0])
