"""PerLayerSketch: the common sketch contract plus its block structure and allocation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch

SHAPES = [[7, 5], [7], [3, 7], [3], [2, 3, 2, 2], []]
N = sum(math.prod(s) for s in SHAPES)  # 35 + 7 + 21 + 3 + 24 + 1 = 91


@pytest.mark.parametrize("inner", ["qk", "dense"])
@pytest.mark.parametrize("sketch_dim", [6, 17, 40, N])
def test_contract(inner, sketch_dim):
    s = make("per_layer", N, sketch_dim, seed=2, shapes=SHAPES, inner=inner)
    P = s.to_dense()
    assert P.shape == (sketch_dim, N)
    x = torch.randn(4, N, dtype=torch.float64)
    y = torch.randn(4, sketch_dim, dtype=torch.float64)
    torch.testing.assert_close(s.apply(x), x @ P.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((s.apply(x) * y).sum(), (x * s.transpose(y)).sum(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s.transpose(y), y @ P, atol=1e-12, rtol=1e-12)
    spec = json.loads(json.dumps(s.spec))
    rebuilt = make(**spec)
    assert rebuilt == s and torch.equal(rebuilt.to_dense(), P)
    assert not torch.equal(make("per_layer", N, sketch_dim, seed=3, shapes=SHAPES, inner=inner).to_dense(), P)
    # Block structure: every output column reads only its own tensor's entries.
    for b in s.blocks:
        sub = P[b.out_offset : b.out_offset + b.out_dim]
        outside = torch.cat([sub[:, : b.in_offset], sub[:, b.in_offset + b.numel :]], dim=1)
        assert torch.count_nonzero(outside) == 0
    assert sum(b.out_dim for b in s.blocks) + s.zero_columns == sketch_dim
    assert torch.count_nonzero(P[sketch_dim - s.zero_columns :]) == 0
    assert s.state_bytes == 4 * sum(b.L.numel() + (0 if b.R is None else b.R.numel()) for b in s.blocks)


@pytest.mark.parametrize("inner", ["qk", "dense"])
def test_public_conformance_suite(inner):
    from lightning_sketch.testing import check_sketch

    results = check_sketch(make("per_layer", N, 20, seed=7, shapes=SHAPES, inner=inner))
    assert all(results.values()), results


def test_kronecker_form():
    s = make("per_layer", 35 + 7, 12, seed=0, shapes=[[7, 5], [7]])
    b = s.blocks[0]
    assert b.is_matrix and b.L.shape == (b.d_o, 7) and b.R.shape == (b.d_i, 5)
    G = torch.randn(7, 5, dtype=torch.float64)
    x = torch.cat([G.reshape(-1), torch.zeros(7, dtype=torch.float64)])
    L, R = s.factors(b, x)
    torch.testing.assert_close(s.apply(x)[: b.out_dim], (L @ G @ R.T).reshape(-1), atol=1e-12, rtol=0)


def test_qk_factors_are_scaled_haar_rows():
    s = make("per_layer", 64 * 32, 64, seed=5, shapes=[[64, 32]], inner="qk")
    b = s.blocks[0]
    L = b.L.double()
    torch.testing.assert_close(
        L @ L.T, torch.eye(b.d_o, dtype=torch.float64) * 64 / b.d_o, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("inner", ["qk", "dense"])
def test_norm_preserved_in_expectation(inner):
    # E||Φx||² = ||x||²: the mean over 60 seeds of a fixed unit x lies within 4 standard errors of 1.
    shapes = [[16, 12], [16], [4, 16]]
    n = sum(math.prod(s) for s in shapes)
    x = torch.randn(n, dtype=torch.float64)
    x /= x.norm()
    norms = torch.stack(
        [
            make("per_layer", n, 32, seed=k, shapes=shapes, inner=inner).apply(x).pow(2).sum()
            for k in range(60)
        ]
    )
    stderr = norms.std().item() / math.sqrt(len(norms))
    assert 0 < stderr < 0.1
    assert abs(norms.mean().item() - 1.0) < 4 * stderr


def test_for_module_and_default_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    layout = ParamLayout.from_module(model)
    s = PerLayerSketch.for_module(model, 8, seed=1, inner="dense")
    assert s.dim == layout.dim and s.options["shapes"] == [[3, 4], [3], [3], [3]]
    assert len(make("per_layer", 50, 10).blocks) == 1


def test_errors():
    with pytest.raises(SketchConfigError, match="numels summing to `dim` = 10, got 12"):
        make("per_layer", 10, 4, shapes=[[3, 4]])
    with pytest.raises(SketchConfigError, match="`sketch_dim` must be >= the number of tensors"):
        make("per_layer", 12, 1, shapes=[[2, 4], [4]])
    with pytest.raises(SketchConfigError, match="`inner` must be 'qk' or 'dense'"):
        make("per_layer", 12, 4, shapes=[[3, 4]], inner="fft")
    with pytest.raises(SketchConfigError, match="`shapes` must be a non-empty list"):
        make("per_layer", 12, 4, shapes=[[3, -4]])


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 9), min_size=0, max_size=3),
        min_size=1,
        max_size=5,
    ),
    frac=st.floats(0.0, 1.0),
)
def test_allocation_invariants(shapes, frac):
    n = sum(math.prod(s) for s in shapes)
    d = len(shapes) + round(frac * (n - len(shapes)))
    s = make("per_layer", n, d, seed=0, shapes=shapes, inner="dense")
    out = 0
    for b in s.blocks:
        assert b.out_offset == out and 1 <= b.out_dim <= b.numel
        if b.is_matrix:
            assert 1 <= b.d_o <= b.rows and 1 <= b.d_i <= b.cols
        out += b.out_dim
    assert out + s.zero_columns == d and s.zero_columns >= 0
