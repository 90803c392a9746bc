"""The per-slice maths (scores.py) against dense float64 references written out here."""

from __future__ import annotations

import pytest
import torch

from lightning_sketch.attribution import scores as S
from lightning_sketch.exceptions import SketchInputError, SpectrumError

DT = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_identity_weight_is_the_lr_weighted_dot_product():
    q, g = _rand(3, 5, seed=1), _rand(4, 5, seed=2)
    w = S.SliceWeight.identity("c", 0.25)
    torch.testing.assert_close(S.block_scores(w.apply(q), g), 0.25 * q @ g.T)
    torch.testing.assert_close(w.quad(g), 0.25 * (g * g).sum(1))
    with pytest.raises(SketchInputError, match="dimension 5 but stored rows 6"):
        S.block_scores(q, _rand(2, 6))


def test_damped_inverse_is_the_dense_damped_kernel_inverse():
    G = _rand(40, 6)
    K = G.T @ G
    s, U, unit = S.kernel_eigh(K, 40)
    assert unit == pytest.approx(float((G * G).sum()) / 40)  # tr(K)/T
    w = S.SliceWeight.damped_inverse("c", s, U, lam=0.3, scale=0.5)
    M = 0.5 * torch.linalg.inv(K + 0.3 * torch.eye(6, dtype=DT))
    q, g = _rand(3, 6, seed=1), _rand(5, 6, seed=2)
    torch.testing.assert_close(S.block_scores(w.apply(q), g), q @ M @ g.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.quad(g), torch.einsum("bd,de,be->b", g, M, g), rtol=1e-10, atol=1e-12)
    # rank r keeps the top r eigen-directions only: U_r diag(1/(s_r + λ)) U_rᵀ
    evals, evecs = torch.linalg.eigh(K)
    top = evecs[:, -2:]
    Mr = top @ torch.diag(1 / (evals[-2:] + 0.3)) @ top.T
    wr = S.SliceWeight.damped_inverse("c", s, U, lam=0.3, rank=2)
    torch.testing.assert_close(wr.apply(q), q @ Mr, rtol=1e-10, atol=1e-12)
    with pytest.raises(SketchInputError, match="λ must be finite"):
        S.SliceWeight.damped_inverse("c", s, U, lam=-1.0)


def test_eigen_weight_is_the_arnoldi_sum_over_positive_eigenpairs():
    vecs = torch.linalg.qr(_rand(5, 5))[0]
    vals = torch.tensor([4.0, 2.0, -1.0], dtype=DT)
    w = S.SliceWeight.eigen("c", vals, vecs[:, :3])
    a, b = _rand(2, 5, seed=1), _rand(3, 5, seed=2)
    want = sum((a @ vecs[:, i])[:, None] * (b @ vecs[:, i])[None, :] / vals[i] for i in range(2))
    torch.testing.assert_close(S.block_scores(w.apply(a), b), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(SpectrumError, match="No positive eigenvalue"):
        S.SliceWeight.eigen("c", torch.tensor([-2.0], dtype=DT), vecs[:, :1])
    with pytest.raises(SpectrumError, match="values \\[k\\] and vectors \\[D, k\\]"):
        S.SliceWeight.eigen("c", vals[:2], vecs[:, :3])


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


