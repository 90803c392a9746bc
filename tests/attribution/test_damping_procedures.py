"""The ground-truth-free damping criteria of ``benchmarks/damping_rules.py`` against dense references.

Kernel ridge regression of y on the rows of Φ ``[T, D]`` with the stored rows g_t = −y_t φ_t: the
benchmark computes GCV, the evidence and the leave-one-out error from K's eigenpairs, Σ_t g_t and the
rotated rows; here they are computed from the explicit hat matrix, the explicit covariance and explicit
leave-one-out refits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import damping_rules as DR  # noqa: E402


class _Run:
    def __init__(self, G: np.ndarray):
        self.G = G

    def iter_blocks(self, name):
        yield slice(0, len(self.G)), torch.tensor(self.G)


class _Att:
    """The two things ``slice_profile`` reads of an Attributor: the kernel's eigenpairs (through its
    scoring engine, ``_engine``: here the stand-in itself) and the rows."""

    def __init__(self, G: np.ndarray, K: np.ndarray):
        self.runs, self.K = [_Run(G)], K
        self._engine = self

    def _eigh(self, r, name):
        s, U = torch.linalg.eigh(torch.tensor(self.K))
        return s.clamp_min(0), U, float(np.trace(self.K)) / len(self.runs[0].G)


def _problem(T: int, D: int, seed: int):
    rng = np.random.default_rng(seed)
    Phi, y = rng.normal(size=(T, D)), rng.uniform(0.1, 1.0, size=T)
    return Phi, y, -y[:, None] * Phi, Phi.T @ Phi


@pytest.mark.parametrize("T,D", [(10, 25), (30, 12)])
def test_gcv_and_evidence_match_the_explicit_hat_matrix(T, D):
    Phi, y, G, K = _problem(T, D, 0)
    nus = np.array([0.01, 0.3, 2.0])
    p = DR.slice_profile(_Att(G, K), 0, "c", T, press=False)
    yy = DR.y_norm2(p)
    if T <= D:  # full row rank: ‖y‖² is recovered exactly from Σ g and K
        assert yy == pytest.approx(float(y @ y), rel=1e-9)
    gcv, ev = DR.criterion("gcv", p, nus), DR.criterion("evidence", p, nus)
    unit = np.trace(K) / T
    for k, nu in enumerate(nus):
        lam = nu * unit
        H = Phi @ np.linalg.solve(K + lam * np.eye(D), Phi.T)
        res = y - H @ y
        shift = yy - float(y @ y)  # the benchmark's ‖y‖² where it is an estimate (T > rank K)
        assert gcv[k] == pytest.approx(T * (res @ res + shift) / (T - np.trace(H)) ** 2, rel=1e-9)
        C = np.eye(T) + Phi @ Phi.T / lam
        ref = T * np.log(shift + y @ np.linalg.solve(C, y)) + np.linalg.slogdet(C)[1]
        assert ev[k] == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_press_is_the_explicit_leave_one_out_error_at_full_row_rank():
    T, D = 10, 25
    Phi, y, G, K = _problem(T, D, 1)
    nus = np.array([0.05, 0.5, 5.0])
    press = DR.slice_profile(_Att(G, K), 0, "c", T, press=True, nu_grid=nus)["press"]
    unit = np.trace(K) / T
    for k, nu in enumerate(nus):
        lam, ref = nu * unit, 0.0
        for t in range(T):
            keep = np.arange(T) != t
            w = np.linalg.solve(Phi[keep].T @ Phi[keep] + lam * np.eye(D), Phi[keep].T @ y[keep])
            ref += (y[t] - Phi[t] @ w) ** 2
        assert press[k] == pytest.approx(ref, rel=1e-8)
