"""Every sketch kind against its materialised matrix, adjoint, determinism, spec round trip, dtypes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from sketch_cases import CASES, PARAMS, RANDOM_PARAMS

from lightning_sketch.sketches import make
from lightning_sketch.testing import assert_sketch, check_sketch

SIZES = [pytest.param(100, 12, id="N100-D12"), pytest.param(37, 37, id="N37-D37")]


def build(kind, n, d, seed=0, **opts):
    if kind == "identity":
        d = n
    if kind == "ffd" and d & (d - 1):
        d = 1 << (d.bit_length() - 1)
    return make(kind, n, d, seed=seed, **opts)


@pytest.mark.parametrize(("n", "d"), SIZES)
@pytest.mark.parametrize(("kind", "opts"), PARAMS)
def test_conformance(kind, opts, n, d):
    """Matrix equality (vs apply to the identity), adjoint, determinism, JSON spec round trip, dtypes."""
    sketch = build(kind, n, d, seed=3, **opts)
    results = check_sketch(sketch)
    assert all(results.values()), results
    assert_sketch(sketch)


@pytest.mark.parametrize(("kind", "opts"), RANDOM_PARAMS)
def test_different_seeds_differ(kind, opts):
    a, b = build(kind, 64, 16, seed=0, **opts), build(kind, 64, 16, seed=1, **opts)
    assert not torch.allclose(a.to_dense(), b.to_dense())
    assert a != b and a == build(kind, 64, 16, seed=0, **opts)


@pytest.mark.parametrize(("kind", "opts"), PARAMS)
def test_dtype_device_and_half_precision_follow_input(kind, opts):
    sketch = build(kind, 64, 16, **opts)
    x64 = torch.randn(5, 64, dtype=torch.float64)
    ref = sketch.apply(x64)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)]:
        out = sketch.apply(x64.to(dtype))
        assert out.dtype == dtype and out.device == x64.device
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        assert sketch.transpose(out).dtype == dtype


@pytest.mark.parametrize(("kind", "opts"), PARAMS)
def test_state_bytes_counts_state_tensors(kind, opts):
    sketch = build(kind, 64, 16, **opts)
    expected = sum(t.numel() * t.element_size() for t in sketch._state_tensors().values())
    assert sketch.state_bytes == expected
    assert all(t.device.type == "cpu" for t in sketch._state_tensors().values())


def test_structured_memory_independent_of_d():
    n = 2**14  # factors (16, 32, 32)
    factor_entries = 16**2 + 2 * 32**2
    for d in (2**6, 2**12):
        assert make("affd", n, d).state_bytes == 5 * n + 2 * 4 * factor_entries  # int8 B, fp32 G, 2 passes
        qk = make("qk", n, d)
        assert qk.state_bytes == 4 * sum(r * b for r, b in zip(qk.row_splits, (16, 32, 32)))
    assert make("dense", 2**12, 2**8).state_bytes == 2**8 * 2**12 * 4
    assert make("dense", n, 2**12, chunked=True).state_bytes == 0


@pytest.mark.parametrize("kind", ["affd", "afjl", "qk", "affd-kron_orthogonal"])
def test_chunked_fast_path_equals_autograd_path(kind):
    """N = 2^16 with 70 rows spans several row chunks of the buffered path."""
    opts = {"preconditioner": "kron_orthogonal"} if kind.endswith("kron_orthogonal") else {}
    sketch = make(kind.split("-")[0], 2**16 - 5, 300, seed=2, **opts)
    x = torch.randn(70, 2**16 - 5, dtype=torch.float64)
    fast = sketch.apply(x)
    slow = sketch.apply(x.clone().requires_grad_(True))
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-12)
    # the transpose's buffered path (several chunks of [N_p] rows) against its autograd path, and the
    # adjoint identity <Φx, y> = <x, Φᵀy> against the (checked) apply
    y = torch.randn(70, 300, dtype=torch.float64)
    fast_t = sketch.transpose(y)
    torch.testing.assert_close(fast_t, sketch.transpose(y.clone().requires_grad_(True)).detach(), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close((fast * y).sum(1), (x * fast_t).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["affd", "afjl", "affd-kron_orthogonal", "afjl-kron_orthogonal"])
def test_padding_skip_equals_the_full_transform(kind):
    """N = 20,000 pads to 2^15 = 32 x 32 x 32, so only 20 of the first axis's 32 slices hold data: the
    buffered apply/transpose skip the other 12 (kron_apply_into_lead). They must equal the out-of-place
    autograd path, which transforms the whole padded vector, over 150 rows (two row chunks)."""
    opts = {"preconditioner": "kron_orthogonal"} if kind.endswith("kron_orthogonal") else {}
    sketch = make(kind.split("-")[0], 20_000, 300, seed=5, **opts)
    assert sketch._lead() == 20
    x = torch.randn(150, 20_000, dtype=torch.float64)
    torch.testing.assert_close(sketch.apply(x), sketch.apply(x.clone().requires_grad_(True)).detach(),
                               rtol=1e-10, atol=1e-12)
    y = torch.randn(150, 300, dtype=torch.float64)
    torch.testing.assert_close(sketch.transpose(y), sketch.transpose(y.clone().requires_grad_(True)).detach(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "opts"), RANDOM_PARAMS)
def test_seed0_uncorrelated_with_global_manual_seed(kind, opts):
    """Seeds (docs/design.md, "Seeds"): seed=0 must not replay torch.manual_seed(0)'s stream."""
    n = 256
    torch.manual_seed(0)
    z = torch.randn(n, dtype=torch.float64)
    sketch = build(kind, n, 64, seed=0, **opts)
    mat = sketch.to_dense()
    rows = mat / mat.norm(dim=1, keepdim=True)
    corr = (rows @ (z / z.norm())).abs().max()
    # 64 rows against one vector: |corr| of independent directions is ~1/sqrt(N) each.
    assert float(corr) < 5 / math.sqrt(n)
    for name, t in sketch._state_tensors().items():
        if t.is_floating_point() and t.numel() >= 16:
            v = t.flatten()[:n].double()
            torch.manual_seed(0)
            w = torch.randn(v.numel(), dtype=torch.float64)
            c = torch.corrcoef(torch.stack([v, w]))[0, 1]
            assert abs(float(c)) < 5 / math.sqrt(v.numel()), name


SUBPROCESS = """
import json, sys, torch
from lightning_sketch.sketches import make
out = {}
for name, kind, opts in json.loads(sys.argv[1]):
    d = 100 if kind == "identity" else 16
    s = make(kind, 100, d, seed=11, **opts)
    x = torch.linspace(-1, 1, 300, dtype=torch.float64).reshape(3, 100)
    out[name] = s.apply(x).flatten().tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bit_identical_across_processes():
    """A fresh interpreter (different global RNG state, different import order) builds the same maps."""
    cases = [[name, kind, opts] for name, kind, opts in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    theirs = json.loads(proc.stdout)
    torch.manual_seed(999)
    x = torch.linspace(-1, 1, 300, dtype=torch.float64).reshape(3, 100)
    for name, kind, opts in CASES:
        d = 100 if kind == "identity" else 16
        ours = make(kind, 100, d, seed=11, **opts).apply(x).flatten().tolist()
        assert ours == theirs[name], name
