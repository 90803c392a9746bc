"""Lanczos / Arnoldi against exact eigen-decompositions (float64)."""

from __future__ import annotations

import pytest
import torch

from lightning_sketch.exceptions import SpectrumError
from lightning_sketch.spectrum import arnoldi, lanczos

REL = 1e-8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_top10_matches_eigvalsh_of_mlp_hessian(mlp_case, which):
    h, ev = mlp_case.hessian, mlp_case.eigvals
    res = lanczos(lambda v: h @ v, h.shape[0], 10, num_iter=120, which=which, generator=_gen())
    if which == "LA":
        exact = ev.flip(0)[:10]
    elif which == "SA":
        exact = ev[:10]
    else:
        exact = ev[torch.argsort(ev.abs(), descending=True)][:10]
    torch.testing.assert_close(res.eigenvalues, exact, rtol=REL, atol=0)
    assert bool(res.converged.all())
    assert res.num_matvecs == 120
    # Ritz vectors are unit eigenvectors: ‖H y − θ y‖ equals the reported residual (both ~0).
    resid = (res.eigenvectors @ h - res.eigenvalues[:, None] * res.eigenvectors).norm(dim=1)
    assert float(resid.max()) < 1e-8
    torch.testing.assert_close(res.eigenvectors.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_converged_flags_report_unconverged_pairs(mlp_case):
    h = mlp_case.hessian
    res = lanczos(lambda v: h @ v, h.shape[0], 10, num_iter=20, generator=_gen())
    exact = mlp_case.eigvals.flip(0)[:10]
    err = (res.eigenvalues - exact).abs() / exact.abs()
    assert not bool(res.converged.all())
    # every pair flagged converged really is accurate; residuals bound the eigenvalue error
    if bool(res.converged.any()):
        assert float(err[res.converged].max()) < 1e-6
    resid = (res.eigenvectors @ h - res.eigenvalues[:, None] * res.eigenvectors).norm(dim=1)
    torch.testing.assert_close(resid, res.residuals, rtol=1e-6, atol=1e-10)


def _outlier_operator(n: int = 1000):
    g = _gen(3)
    bulk = torch.rand(n - 3, generator=g, dtype=torch.float64)
    diag = torch.cat([torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64), bulk])
    return diag, (lambda v: diag * v)


def test_ghost_eigenvalues_without_reorthogonalisation():
    diag, op = _outlier_operator()
    plain = lanczos(op, diag.numel(), 5, num_iter=200, reorthogonalize=False, generator=_gen())
    full = lanczos(op, diag.numel(), 5, num_iter=200, reorthogonalize=True, generator=_gen())
    near_top = lambda r: int(((r.ritz_values - 100.0).abs() < 1e-6 * 100).sum())
    assert near_top(plain) >= 2  # ghost copies of the converged outlier
    assert near_top(full) == 1
    torch.testing.assert_close(full.eigenvalues[:3], torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64),
                               rtol=REL, atol=0)
    # the plain recurrence's top-3 repeats 100 instead of reporting 50 and 20
    assert abs(float(plain.eigenvalues[1]) - 100.0) < 1e-6


def test_multiple_eigenvalues_are_found_after_breakdown():
    diag = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    res = lanczos(lambda v: diag * v, 6, 4, num_iter=6, generator=_gen())
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=torch.float64))


def test_start_vector_reproducible_and_v0():
    diag, op = _outlier_operator(200)
    a = lanczos(op, 200, 3, generator=_gen(5))
    b = lanczos(op, 200, 3, generator=_gen(5))
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    v0 = torch.ones(200, dtype=torch.float64)
    c = lanczos(op, 200, 3, v0=v0)
    torch.testing.assert_close(c.eigenvalues, diag[:3], rtol=REL, atol=0)


def test_arnoldi_symmetric_agrees_with_lanczos(mlp_case):
    h = mlp_case.hessian
    a = arnoldi(lambda v: h @ v, h.shape[0], 5, num_iter=100, generator=_gen())
    torch.testing.assert_close(a.eigenvalues.real, mlp_case.eigvals.flip(0)[:5], rtol=REL, atol=0)
    assert float(a.eigenvalues.imag.abs().max()) < 1e-10


def test_arnoldi_nonsymmetric_operator():
    g = _gen(11)
    n = 60
    lam = torch.linspace(1.0, 10.0, n, dtype=torch.float64)
    p = torch.randn(n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64)
    a = p @ torch.diag(lam) @ torch.linalg.inv(p)
    res = arnoldi(lambda v: a @ v, n, 3, num_iter=n, generator=_gen())
    torch.testing.assert_close(res.eigenvalues.real, lam.flip(0)[:3], rtol=1e-7, atol=0)
    small = arnoldi(lambda v: a @ v, n, 2, num_iter=n, which="SA", generator=_gen())
    torch.testing.assert_close(small.eigenvalues.real, lam[:2], rtol=1e-7, atol=0)
    # a Ritz vector of the non-symmetric operator satisfies A y = λ y
    y = res.eigenvectors[0].real
    torch.testing.assert_close(a @ y, res.eigenvalues[0].real * y, rtol=1e-6, atol=1e-8)


def _eye_op(v):
    return v


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 5, "k": 6}, "`k` must be <= `dim`"),
        ({"dim": 5, "k": 0}, "`k` must be a positive int"),
        ({"dim": 5, "k": 2, "which": "BE"}, "`which` must be one of"),
        ({"dim": 5, "k": 2, "num_iter": 1}, r"`num_iter` must be an int in \[2, 5\]"),
        ({"dim": 5, "k": 2, "num_iter": 9}, "`num_iter` must be an int"),
        ({"dim": 5, "k": 2, "v0": torch.zeros(5, dtype=torch.float64)}, "`v0` must be finite and non-zero"),
        ({"dim": 5, "k": 2, "v0": torch.ones(4)}, r"`v0` must be a tensor of shape \(5,\)"),
    ],
)
@pytest.mark.parametrize("solver", [lanczos, arnoldi])
def test_argument_errors(solver, kwargs, match):
    with pytest.raises(SpectrumError, match=match):
        solver(_eye_op, **kwargs)


def test_matvec_errors():
    with pytest.raises(SpectrumError, match="must map a \\[5\\] tensor"):
        lanczos(lambda v: v[:3], 5, 1, num_iter=2)
    with pytest.raises(SpectrumError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 5, 1, num_iter=2)


def _sym_with_spectrum(lam: torch.Tensor, seed: int = 11) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=_gen(seed), dtype=torch.float64))
    a = q @ torch.diag(lam) @ q.T
    return 0.5 * (a + a.T)


def test_stop_early_on_well_separated_top_spectrum():
    n, k = 200, 3
    bulk = torch.rand(n - k, generator=_gen(5), dtype=torch.float64)
    a = _sym_with_spectrum(torch.cat([torch.tensor([50.0, 30.0, 15.0], dtype=torch.float64), bulk]))
    exact = torch.linalg.eigvalsh(a).flip(0)[:k]
    calls = []

    def op(v):
        calls.append(1)
        return a @ v

    full = lanczos(lambda v: a @ v, n, k, num_iter=80, generator=_gen(), tol=1e-8, tol_scale="norm")
    res = lanczos(op, n, k, num_iter=80, generator=_gen(), tol=1e-8, tol_scale="norm", stop_early=True)
    assert res.num_matvecs == len(calls) < 80
    assert bool(res.converged.all())
    torch.testing.assert_close(res.eigenvalues, exact, rtol=0, atol=1e-6)
    assert float(res.residuals.max()) <= 1e-8 * 50.0 * (1 + 1e-12)
    # the early stop is a prefix of the full run: the Ritz values agree with it too
    torch.testing.assert_close(res.eigenvalues, full.eigenvalues, rtol=0, atol=1e-6)


def test_stop_early_runs_to_the_maximum_on_a_clustered_top():
    n, k = 300, 5
    top = 10.0 + 1e-4 * torch.arange(k + 5, dtype=torch.float64)  # ten eigenvalues within 1e-3
    a = _sym_with_spectrum(torch.cat([top, torch.linspace(0.0, 9.9, n - k - 5, dtype=torch.float64)]), seed=3)
    full = lanczos(lambda v: a @ v, n, k, num_iter=30, generator=_gen(), tol=1e-6, tol_scale="norm")
    res = lanczos(lambda v: a @ v, n, k, num_iter=30, generator=_gen(), tol=1e-6, tol_scale="norm",
                  stop_early=True)
    assert not bool(res.converged.all())
    assert res.num_matvecs == full.num_matvecs == 30
    # not converged: bit-for-bit the fixed-step result
    assert torch.equal(res.eigenvalues, full.eigenvalues) and torch.equal(res.residuals, full.residuals)
    assert torch.equal(res.eigenvectors, full.eigenvectors)


def test_tol_scale_norm_flags_against_the_largest_ritz_value(mlp_case):
    h = mlp_case.hessian
    res = lanczos(lambda v: h @ v, h.shape[0], 10, num_iter=20, generator=_gen(), tol=1e-3, tol_scale="norm")
    scale = res.ritz_values.abs().max()
    assert torch.equal(res.converged, res.residuals <= 1e-3 * scale)


@pytest.mark.parametrize("kw", [{"tol_scale": "max"}, {"check_every": 0}, {"check_every": True}])
def test_stop_arguments_are_checked(kw):
    with pytest.raises(SpectrumError):
        lanczos(lambda v: v, 10, 2, **kw)
