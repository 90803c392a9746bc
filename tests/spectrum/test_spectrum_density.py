"""SLQ density against the exact broadened density; trace estimators against the exact trace."""

from __future__ import annotations

import pytest
import torch

from lightning_sketch.exceptions import SpectrumError
from lightning_sketch.spectrum import gaussian_density, hutchinson, hutchpp, slq_density


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.slow
def test_slq_density_matches_exact_density(mlp_case):
    h, ev = mlp_case.hessian, mlp_case.eigvals
    n = h.shape[0]
    sigma = float(ev.max() - ev.min()) / 50
    grid = torch.linspace(float(ev.min()) - 5 * sigma, float(ev.max()) + 5 * sigma, 2000, dtype=torch.float64)
    d = slq_density(lambda v: h @ v, n, num_runs=10, num_iter=80, grid=grid, sigma=sigma, generator=_gen())
    exact = gaussian_density(ev, torch.full_like(ev, 1.0 / n), grid, sigma)
    l1 = float(torch.trapezoid((d.density - exact).abs(), grid))
    assert l1 <= 0.05
    assert abs(float(torch.trapezoid(d.density, grid)) - 1.0) < 1e-3
    torch.testing.assert_close(d.weights.sum(1), torch.ones(10, dtype=torch.float64))
    assert d.num_matvecs == 800


def test_slq_density_default_grid_integrates_to_one():
    diag = torch.cat([torch.tensor([10.0, 7.0]), torch.linspace(-1, 1, 300)]).double()
    d = slq_density(lambda v: diag * v, diag.numel(), num_runs=3, num_iter=40, generator=_gen())
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-3
    assert float(d.grid.min()) < -1 and float(d.grid.max()) > 10


@pytest.mark.parametrize("seed", [0, 1])
def test_trace_estimates_within_three_standard_errors(mlp_case, seed):
    h = mlp_case.hessian
    exact = float(torch.trace(h))
    hut = hutchinson(lambda v: h @ v, h.shape[0], 150, generator=_gen(seed))
    hpp = hutchpp(lambda v: h @ v, h.shape[0], 150, generator=_gen(seed))
    assert hut.num_matvecs == 150 and hpp.num_matvecs == 150
    assert abs(hut.trace - exact) <= 3 * hut.stderr
    assert abs(hpp.trace - exact) <= 3 * hpp.stderr
    # the standard errors are real spreads, not zero (the estimators are stochastic here)
    assert hut.stderr > 0 and hpp.stderr > 0


def test_hutchpp_exact_for_low_rank():
    g = _gen(4)
    u = torch.randn(100, 5, generator=g, dtype=torch.float64)
    a = u @ u.T
    est = hutchpp(lambda v: a @ v, 100, 30, generator=_gen())
    assert abs(est.trace - float(torch.trace(a))) < 1e-8


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: slq_density(lambda v: v, 10, num_runs=0), "`num_runs` must be a positive int"),
        (lambda: slq_density(lambda v: v, 10, num_iter=0), "`num_iter` must be a positive int"),
        (lambda: slq_density(lambda v: v, 10, sigma=-1.0), "`sigma` must be > 0 or None"),
        (lambda: slq_density(lambda v: v, 10, num_points=1), "`num_points` must be an int >= 2"),
        (lambda: hutchinson(lambda v: v, 10, 1), "`num_matvecs` must be an int >= 2"),
        (lambda: hutchpp(lambda v: v, 10, 5), "`num_matvecs` must be an int >= 6"),
        (lambda: gaussian_density(torch.zeros(1), torch.ones(1), torch.zeros(3), 0.0), "`sigma` must be > 0"),
    ],
)
def test_errors(call, match):
    with pytest.raises(SpectrumError, match=match):
        call()
