"""Kronecker machinery: shapes, Sylvester Hadamard, Haar factors, row restriction, the real FFT isometry."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sketch.sketches._common import rfft_real, rfft_real_t
from lightning_sketch.sketches._kron import (
    haar_orthogonal,
    hadamard,
    kron_apply,
    kron_apply_into,
    kron_shapes,
    prefix_rows,
)
from lightning_sketch.sketches.qk import balanced_split


def sylvester(n: int) -> torch.Tensor:
    """Reference Sylvester construction by the block recursion [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize(
    ("n", "block", "expected"),
    [(2048, 32, (2, 32, 32)), (1024, 32, (32, 32)), (2, 32, (2,)), (1, 32, ()), (2**20, 64, (4, 64, 64, 64))],
)
def test_kron_shapes_remainder_first(n, block, expected):
    assert kron_shapes(n, block) == expected
    assert math.prod(expected) == n


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_sylvester(n):
    assert torch.equal(hadamard(n, torch.float64), sylvester(n))


@pytest.mark.parametrize(
    ("n", "block"), [(256, 4), (512, 32), (2048, 32)], ids=["256/4", "512/32", "2048/32"]
)
def test_unpermuted_kron_hadamard_equals_sylvester(n, block):
    factors = [hadamard(s, torch.float64) for s in kron_shapes(n, block)]
    got = kron_apply(torch.eye(n, dtype=torch.float64), factors) / math.sqrt(n)
    torch.testing.assert_close(got, sylvester(n) / math.sqrt(n), rtol=0, atol=1e-15)


def test_kron_apply_matches_torch_kron_and_buffer_path():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(r, c, generator=g, dtype=torch.float64) for r, c in [(2, 3), (4, 4), (1, 5)]]
    x = torch.randn(7, 60, generator=g, dtype=torch.float64)
    full = torch.kron(torch.kron(fs[0], fs[1]), fs[2])
    torch.testing.assert_close(kron_apply(x, fs), x @ full.T)
    work = (torch.empty(7 * 60, dtype=torch.float64), torch.empty(7 * 60, dtype=torch.float64))
    torch.testing.assert_close(kron_apply_into(x, fs, work), x @ full.T)


@pytest.mark.parametrize("d", [1, 3, 31, 32, 33, 100, 1024, 2048])
def test_prefix_rows_keep_the_first_rows(d):
    shapes = (2, 32, 32)
    rows = prefix_rows(shapes, d)
    assert math.prod(rows) >= d and all(1 <= r <= s for r, s in zip(rows, shapes))
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(s, s, generator=g, dtype=torch.float64) for s in shapes]
    x = torch.randn(3, 2048, generator=g, dtype=torch.float64)
    restricted = kron_apply(x, [f[:r] for f, r in zip(fs, rows)])[:, :d]
    torch.testing.assert_close(restricted, kron_apply(x, fs)[:, :d])


def test_haar_is_orthogonal_and_sign_corrected():
    q = haar_orthogonal(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(16, dtype=torch.float64))
    # Sign correction: Q is the unique QR factor of the drawn Gaussian A with diag(R) > 0,
    # i.e. R = Qᵀ A is upper triangular with a positive diagonal.
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = q.T @ a
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros_like(r), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(r) > 0).all())


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
def test_rfft_real_is_an_isometry_with_exact_transpose(n):
    mat = rfft_real(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(mat @ mat.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(rfft_real_t(torch.eye(n, dtype=torch.float64)), mat.T)


@pytest.mark.parametrize(
    ("shapes", "d", "expected"),
    [
        ((16, 32, 32), 1024, (8, 8, 16)),
        ((16, 32, 32), 4096, (16, 16, 16)),
        ((2, 32, 32), 4, (1, 2, 2)),
        ((32, 32), 1024, (32, 32)),
    ],
)
def test_balanced_split(shapes, d, expected):
    assert balanced_split(shapes, d) == expected
