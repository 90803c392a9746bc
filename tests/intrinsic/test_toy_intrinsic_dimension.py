"""Li et al.'s toy problem with an exactly known intrinsic dimension (Li, Farkhoor, Liu & Yosinski 2018, Sec. 2),
and a linear regression whose exact fit needs d >= n.

θ ∈ R^1000 must make each of 10 groups of 100 coordinates sum to a target: the solution set is a
990-dimensional affine manifold, so the intrinsic dimension is exactly 10. In a generic random
subspace the problem is solvable (loss ~ 0) iff d >= 10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sketch.intrinsic import Subspace

N, GROUPS, D_MAX = 1000, 10, 32


KINDS = ["dense", "ffd", "affd", "qk"]


class GroupSums(nn.Module):
    """θ ↦ the 10 group sums; loss = ‖A θ − t‖²."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.theta = nn.Parameter(torch.randn(N, generator=g, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.theta.view(GROUPS, N // GROUPS).sum(dim=1)


TARGET = torch.randn(GROUPS, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 10


def _loss(model: GroupSums) -> torch.Tensor:
    return ((model() - TARGET) ** 2).sum()


def _lstsq_losses(kind: str, ds: tuple[int, ...]) -> list[float]:
    """Exact least squares over the first d coordinates of ω, for each d, evaluated through the
    reparametrised module, relative to the loss at ω = 0."""
    model = GroupSums()
    sub = Subspace.attach(model, kind=kind, sketch_dim=D_MAX, seed=11)
    out = []
    with torch.no_grad():
        base = model()
        cols = []
        for j in range(max(ds)):  # column j of the map ω -> Aθ, read off the module at ω = e_j
            sub.omega.zero_()
            sub.omega[j] = 1.0
            cols.append(model() - base)
        jac = torch.stack(cols, dim=1)  # [10, max(ds)]
        for d in ds:
            sub.set_active(d)
            sol = torch.linalg.lstsq(jac[:, :d], (TARGET - base).unsqueeze(1), driver="gelsd").solution.squeeze(1)
            sub.omega.zero_()
            sub.omega[:d] = sol
            out.append(float(_loss(model)) / float(((base - TARGET) ** 2).sum()))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_solved_iff_d_at_least_true_dimension(kind):
    # Below the true dimension the residual is the part of a random 10-vector outside a random
    # 9-dim subspace (a chi-square(1) share of the loss): far from 0, but not bounded below by a
    # fixed fraction, so the bar is 1e-6 of the starting loss against <= 1e-20 when solvable.
    below, at, above = _lstsq_losses(kind, (9, 10, 16))
    assert below >= 1e-6
    assert at <= 1e-20 and above <= 1e-20


@pytest.mark.parametrize("d, solved", [(9, False), (10, True)])
def test_lbfgs_training_in_masked_subspace(d, solved):
    """Training ω (all D_MAX coordinates present, the ones beyond d masked) reaches the exact answer iff d >= 10."""
    model = GroupSums()
    sub = Subspace.attach(model, kind="dense", sketch_dim=D_MAX, seed=11)
    sub.set_active(d)
    with torch.no_grad():
        start = float(_loss(model))
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    with torch.no_grad():
        rel = float(_loss(model)) / start
    assert torch.all(sub.omega[d:] == 0)
    assert (rel <= 1e-14) if solved else (rel >= 1e-6)


def test_linear_regression_exact_fit_iff_d_at_least_n_points():
    """C12: a linear model with 500 parameters fits 40 generic points exactly iff d >= 40."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 500, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    for d, solved in ((39, False), (40, True)):
        lin = nn.Linear(500, 1, bias=False).double()
        sub = Subspace.attach(lin, kind="dense", sketch_dim=64, seed=0)
        sub.set_active(d)
        with torch.no_grad():
            base = lin(x).squeeze(1)
            cols = []
            for j in range(d):
                sub.omega.zero_()
                sub.omega[j] = 1.0
                cols.append(lin(x).squeeze(1) - base)
            sol = torch.linalg.lstsq(torch.stack(cols, 1), (y - base).unsqueeze(1), driver="gelsd").solution
            sub.omega.zero_()
            sub.omega[:d] = sol.squeeze(1)
            mse = float(((lin(x).squeeze(1) - y) ** 2).mean())
        assert (mse <= 1e-20) if solved else (mse >= 1e-3)
