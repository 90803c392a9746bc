"""Norm preservation and concentration over many seeds (arXiv 2402.03994: eq. 1, Thm 3.1 = Thm C.1).

Tolerances: with S seeds, the sample mean of ‖Φx‖² has standard error std/√S, and a sample
std has relative standard error ≈ √((κ-1)/(4S)) (κ the kurtosis; ≈ 1/√(2S) for Gaussian-like
spreads). With S = 100 the ratio of two independent stds is known to ≈ ±10-15%, so "halves when
D is multiplied by 4" is checked as a ratio in [1.4, 2.8]: about ±3 standard errors around 2,
and far from 1 (no concentration) and 4 (1/D).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sketch.sketches import make

SEEDS = 100
N = 2**14


def squared_norms(kind: str, n: int, d: int, x: torch.Tensor, seeds: int = SEEDS) -> torch.Tensor:
    return torch.stack([make(kind, n, d, seed=s).apply(x).pow(2).sum() for s in range(seeds)])


@pytest.fixture(scope="module")
def unit_x() -> torch.Tensor:
    x = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return x / x.norm()


@pytest.mark.parametrize("kind", ["dense", "affd", "afjl", "qk"])
def test_unbiased_and_spread_shrinks_like_inverse_sqrt_d(kind, unit_x):
    # dense: N = 2^11 keeps generating 100 Gaussian matrices cheap (its law does not depend on N).
    n, x = (2**11, unit_x[: 2**11] / unit_x[: 2**11].norm()) if kind == "dense" else (N, unit_x)
    stds = []
    for d in (2**6, 2**8):
        r = squared_norms(kind, n, d, x)
        std = float(r.std())
        assert abs(float(r.mean()) - 1.0) <= 5 * std / math.sqrt(SEEDS), (kind, d, float(r.mean()))
        stds.append(std)
    assert 1.4 <= stds[0] / stds[1] <= 2.8, (kind, stds)


@pytest.mark.parametrize("kind", ["fjl", "ffd"])
def test_baselines_are_unbiased_on_dense_input(kind, unit_x):
    r = squared_norms(kind, N, 2**8, unit_x)
    assert abs(float(r.mean()) - 1.0) <= 5 * float(r.std()) / math.sqrt(SEEDS)


def test_theorem_3_1_ffd_fails_on_the_bad_input_while_affd_concentrates():
    """x = first row of the orthonormal H_D in block 1 (the counterexample in the proof of Thm C.1, arXiv 2402.03994 App. C.4): H_D x_1 = e_1.

    For FFD ‖Φx‖² = g_1², a chi-square(1) draw with std √2 ≈ 1.41 for every D; for AFFD the
    spread shrinks (paper: 0.12 / 0.064 at D = 2^8 / 2^10, N = 2^14).
    """
    ffd_stds, affd_stds = [], []
    for d in (2**8, 2**10):
        bad = torch.zeros(N, dtype=torch.float64)
        bad[:d] = 1 / math.sqrt(d)
        ffd = squared_norms("ffd", N, d, bad, seeds=200)
        affd = squared_norms("affd", N, d, bad)
        # chi-square(1): std √2; its sample std over 200 draws has ~±25% error (kurtosis 15).
        assert float(ffd.std()) > 0.9, float(ffd.std())
        ffd_stds.append(float(ffd.std()))
        affd_stds.append(float(affd.std()))
    assert ffd_stds[0] / ffd_stds[1] < 1.3, ffd_stds  # no concentration with D
    assert affd_stds[0] / affd_stds[1] >= 1.4 and affd_stds[1] < 0.15, affd_stds


def test_preconditioner_matters_on_one_hot_input():
    """One-hot x at the last coordinate (the pre-conditioner H·B of eqs. 6-7, arXiv 2402.03994): AFFD and AFJL still concentrate."""
    x = torch.zeros(N, dtype=torch.float64)
    x[-1] = 1.0
    for kind, bound in (("affd", 0.12), ("afjl", 0.2)):
        r = squared_norms(kind, N, 2**10, x)
        assert abs(float(r.mean()) - 1.0) <= 5 * float(r.std()) / math.sqrt(SEEDS)
        assert float(r.std()) < bound, (kind, float(r.std()))
