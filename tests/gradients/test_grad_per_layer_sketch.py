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
from lightning_sketch.sketches.per_layer import LATEST_SPLIT_VERSION, PerLayerSketch, _factor_pair

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


@pytest.mark.parametrize("split_version", [1, 2])
@pytest.mark.parametrize("inner", ["qk", "dense"])
def test_public_conformance_suite(inner, split_version):
    from lightning_sketch.testing import check_sketch

    sketch = make("per_layer", N, 20, seed=7, shapes=SHAPES, inner=inner, split_version=split_version)
    results = check_sketch(sketch)
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


# ------------------------------------------------------------------ split_version
# Recorded from the version-1 rule (the only rule before `split_version`); a version-1 spec, which
# has no `split_version` field, must rebuild these maps bit for bit.
GOLDEN_V1 = [
    (
        {"kind": "per_layer", "dim": 91, "sketch_dim": 17, "seed": 2, "shapes": SHAPES, "inner": "qk"},
        [(1, 5), (2, 1), (2, 2), (1, 1), (2, 2), (1, 1)],
        [-1.051208841923569, -4.748938590849747, 0.9903827499746509, 1.2762216089810794,
         0.6783473727697708, -0.9304546694033853],
        -10.640424881303584,
    ),
    (
        {"kind": "per_layer", "dim": 91, "sketch_dim": 40, "seed": 2, "shapes": SHAPES, "inner": "dense"},
        [(7, 2), (4, 1), (3, 3), (2, 1), (2, 5), (1, 1)],
        [0.06163684831538361, -0.40931478498006046, -0.06663906819759256, 0.13872168110815697,
         -0.08914489690493278, -0.48546320236796653],
        -3.906684568310542,
    ),
]


@pytest.mark.parametrize(("spec", "pairs", "head", "total"), GOLDEN_V1)
def test_version_1_spec_rebuilds_the_recorded_map(spec, pairs, head, total):
    s = make(**json.loads(json.dumps(spec)))
    assert s.options["split_version"] == 1 and s.spec == spec  # the field stays out of the spec
    assert [(b.d_o, b.d_i) for b in s.blocks] == pairs
    y = s.apply(torch.arange(N, dtype=torch.float64).sin())
    assert y[:6].tolist() == head and y.sum().item() == total
    assert torch.equal(make(**spec, split_version=1).to_dense(), s.to_dense())


def test_version_1_prime_split_is_kept():
    spec = {"kind": "per_layer", "dim": 61 * 32, "sketch_dim": 61, "seed": 0, "shapes": [[61, 32]],
            "inner": "qk"}
    s = make(**spec)
    assert [(b.d_o, b.d_i) for b in s.blocks] == [(61, 1)]
    y = s.apply(torch.arange(61 * 32, dtype=torch.float64).cos())
    assert y[:4].tolist() == [-0.19343852313774101, 0.6850999334299919, 0.9971381447988419,
                              0.32796492905251207]
    assert y.sum().item() == 25.669988678804863


def test_version_2_spec_records_the_field_and_round_trips():
    s = make("per_layer", 61 * 32, 61, seed=0, shapes=[[61, 32]], split_version=2)
    assert s.spec["split_version"] == 2 and [(b.d_o, b.d_i) for b in s.blocks] == [(6, 10)]
    assert s.zero_columns == 1
    rebuilt = make(**json.loads(json.dumps(s.spec)))
    assert rebuilt == s and torch.equal(rebuilt.to_dense(), s.to_dense())
    assert rebuilt != make("per_layer", 61 * 32, 61, seed=0, shapes=[[61, 32]])


def test_layout_builders_use_the_latest_split():
    model = nn.Sequential(nn.Linear(64, 61, bias=False))
    layout = ParamLayout.from_module(model)
    want = {"shapes": [[61, 64]], "split_version": LATEST_SPLIT_VERSION}
    assert PerLayerSketch.layout_options(layout) == want
    s = PerLayerSketch.for_module(model, 61)
    assert s.options["split_version"] == LATEST_SPLIT_VERSION == 2
    assert [(b.d_o, b.d_i) for b in s.blocks] == [(6, 10)]


@pytest.mark.parametrize(
    ("target", "rows", "cols", "v1", "v2"),
    [
        (61, 64, 64, (1, 61), (6, 10)),
        (60, 64, 64, (6, 10), (6, 10)),
        (5, 8, 8, (1, 5), (2, 2)),
        (7, 8, 8, (7, 1), (2, 3)),
        (97, 128, 128, (1, 97), (8, 12)),
        (1000, 4096, 4096, (25, 40), (25, 40)),
        (1021, 10, 4096, (1, 1021), (10, 102)),  # few rows: the floor is the row count
        (61, 1, 64, (1, 61), (1, 61)),  # a single row cannot be split
        (3, 8, 8, (1, 3), (1, 3)),
    ],
)
def test_factor_pair_rules(target, rows, cols, v1, v2):
    assert _factor_pair(target, rows, cols, 1) == v1
    assert _factor_pair(target, rows, cols, 2) == v2


@settings(max_examples=200, deadline=None)
@given(target=st.integers(1, 5000), rows=st.integers(1, 300), cols=st.integers(1, 300))
def test_version_2_split_is_feasible_and_never_degenerate(target, rows, cols):
    d_o, d_i = _factor_pair(target, rows, cols, 2)
    assert 1 <= d_o <= rows and 1 <= d_i <= cols and d_o * d_i <= target
    if target >= 4 and rows >= 2 and cols >= 2:
        assert d_o >= 2 and d_i >= 2


def _rank_one_spread(shapes, sketch_dim, version, seeds=200):
    """std/mean of ‖Φg‖² over seeds for a Linear layer's per-example gradient g = (δxᵀ, δ)."""
    rows, cols = shapes[0]
    n = sum(math.prod(s) for s in shapes)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(rows, generator=g, dtype=torch.float64)
    x = torch.randn(cols, generator=g, dtype=torch.float64)
    v = torch.cat([torch.outer(delta, x).reshape(-1), delta[: n - rows * cols]])
    vals = torch.stack([
        make("per_layer", n, sketch_dim, seed=k, shapes=shapes, split_version=version).apply(v).pow(2).sum()
        for k in range(seeds)
    ])
    return (vals.std() / vals.mean()).item()


@pytest.mark.parametrize("shapes", [[[64, 64]], [[40, 32], [40]]])
def test_version_2_spread_at_a_prime_width_matches_its_neighbour(shapes):
    # Over 200 seeds the relative spread of ‖Φg‖² for rank-one g at D = 61 stays within 1.2x of D = 60.
    assert _rank_one_spread(shapes, 61, 2) < 1.2 * _rank_one_spread(shapes, 60, 2)


def test_version_1_spread_at_a_prime_width_is_the_defect():
    # The check above fails for the version-1 rule (1 x 61 against 6 x 10: about 1.4 against 0.7).
    assert _rank_one_spread([[64, 64]], 61, 1) > 1.5 * _rank_one_spread([[64, 64]], 60, 1)


def test_bad_split_version():
    for bad in (0, 3, True, "2", None):
        with pytest.raises(SketchConfigError, match="`split_version` must be one of"):
            make("per_layer", 12, 4, shapes=[[3, 4]], split_version=bad)
