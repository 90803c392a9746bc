"""Hypothesis property tests: shapes and linearity of apply/transpose over random (N, D, batch)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sketch.sketches import make

KINDS = st.sampled_from(["affd", "afjl", "qk", "fjl", "dense"])


@settings(max_examples=25, deadline=None)
@given(
    kind=KINDS,
    n=st.integers(1, 300),
    frac=st.floats(0.01, 1.0),
    batch=st.integers(0, 4),
    seed=st.integers(0, 2**31),
)
def test_shapes_and_linearity(kind, n, frac, batch, seed):
    d = max(1, int(frac * n))
    s = make(kind, n, d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(batch, 2, n, generator=g, dtype=torch.float64)
    x2 = torch.randn(batch, 2, n, generator=g, dtype=torch.float64)
    a, b = 1.7, -0.3
    y = s.apply(a * x1 + b * x2)
    assert y.shape == (batch, 2, d)
    torch.testing.assert_close(y, a * s.apply(x1) + b * s.apply(x2), rtol=1e-10, atol=1e-10)
    back = s.transpose(y)
    assert back.shape == (batch, 2, n)
    z1 = torch.randn(batch, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(batch, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        s.transpose(a * z1 + b * z2), a * s.transpose(z1) + b * s.transpose(z2), rtol=1e-10, atol=1e-10
    )


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 200), d_exp=st.integers(0, 7), batch=st.integers(0, 3), seed=st.integers(0, 1000))
def test_ffd_shapes_for_power_of_two_d(n, d_exp, batch, seed):
    d = min(1 << d_exp, 1 << (n.bit_length() - 1))
    s = make("ffd", n, d, seed=seed)
    x = torch.randn(batch, n, dtype=torch.float64)
    assert s.apply(x).shape == (batch, d) and s.transpose(s.apply(x)).shape == (batch, n)
