"""Balanced restrictions of the Kronecker-Haar sketches (QK, and AFFD/AFJL with ``kron_orthogonal``).

Thm 3.3 of arXiv 2402.03994 bounds a Kronecker sketch's error through each factor's row count D_i.
Keeping the row-major first D coordinates keeps ONE row of the leading factors; these sketches keep
a balanced product set instead, ordered so that every power-of-two prefix is balanced too.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_sketch.sketches import make
from lightning_sketch.sketches._kron import balanced_order, balanced_split


@pytest.mark.parametrize("shapes", [(4, 4), (2, 32, 32), (16, 32, 32), (8, 8, 8, 8)])
def test_every_power_of_two_prefix_is_a_balanced_product(shapes):
    d_max = math.prod(shapes)
    order = balanced_order(shapes, d_max)
    assert sorted(order.tolist()) == list(range(d_max))  # a permutation of all rows
    tails = [math.prod(shapes[i + 1 :]) for i in range(len(shapes))]
    for m in range(int(math.log2(d_max)) + 1):
        d = 1 << m
        split = balanced_split(shapes, d)
        want = {sum(r * t for r, t in zip(rows, tails)) for rows in itertools.product(*(range(s) for s in split))}
        assert set(order[:d].tolist()) == want, (d, split)
        # balanced: every factor holds all its rows or at least half as many as the largest D_i
        assert all(s == b or 2 * s >= max(split) for s, b in zip(split, shapes)), split


@pytest.mark.parametrize("seed", [0, 1])
def test_qk_prefix_is_the_fresh_qk_of_that_dimension(seed):
    """The first d coordinates of a QK at D_max equal, up to √(D_max/d), the d-dimensional QK of the same seed."""
    n, d_max = 5000, 1024
    big = make("qk", n, d_max, seed=seed)
    x = torch.randn(6, n, dtype=torch.float64)
    full = big.apply(x)
    for d in (4, 16, 64, 256):
        fresh = make("qk", n, d, seed=seed)
        torch.testing.assert_close(full[:, :d] * math.sqrt(d_max / d), fresh.apply(x), rtol=1e-12, atol=1e-14)


def _one_hot_spread(kind: str, n: int, d: int, seeds: int, **opts) -> float:
    g = torch.Generator().manual_seed(0)
    cols = torch.randperm(n, generator=g)[:64]
    x = torch.zeros(64, n, dtype=torch.float64)
    x[torch.arange(64), cols] = 1.0
    vals = torch.cat([(make(kind, n, d, seed=s, **opts).apply(x) ** 2).sum(1) for s in range(seeds)])
    return float(vals.std() / vals.mean())


def test_affd_kron_orthogonal_spread_on_one_hot_inputs():
    """With one row of the leading Haar factor the spread was 0.70 here (Hadamard: 0.095); balanced it is ~0.23."""
    n, d = 2**12, 2**8
    had = _one_hot_spread("affd", n, d, 8)
    kron = _one_hot_spread("affd", n, d, 8, preconditioner="kron_orthogonal")
    assert had < 0.15
    assert kron < 0.4, kron
