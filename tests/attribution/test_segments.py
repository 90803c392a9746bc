"""Every method reads a slice committed in many segments block by block: the same scores and top-k
as the same rows in one segment, and no joined copy of the rows in memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch

from lightning_sketch.attribution import Attributor, _stored
from lightning_sketch.attribution.curvature import write_curvature
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore
from lightning_sketch.store import index as ix

METHODS = ("grad_dot", "tracin", "grad_cos", "trak", "fisher_if", "arnoldi_if")
NAMES = ("s0", "s1")


def _run(root, n: int, segments: int, D: int = 8, seed: int = 0):
    """A run directory: 2 slices of the same ``n`` rows (ids in a shuffled order), each slice committed
    in ``segments`` segments, with saved weights and a curvature kernel per slice."""
    torch.manual_seed(0)
    model = TinyClassifier(hidden=40).double()  # N = 403 parameters
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=3)
    store = SketchStore.create(root / "store", sketch.spec, layout=layout)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(NAMES):
        ids = rng.permutation(n)
        rows = rng.standard_normal((n, D)).astype(np.float32)
        store.add_checkpoint(name, step=i, lr=0.1 * (i + 1))
        bounds = np.linspace(0, n, segments + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            store.append(ids[a:b], rows[a:b], checkpoint=name)
            store.commit()
        store.save_weights(name, {k: t.detach().clone() for k, t in layout.params(model).items()},
                           root / "weights", layout.fingerprint())
        A = torch.from_numpy(rng.standard_normal((D, 2 * D)))
        write_curvature(root, name, A @ A.T, n, sketch.spec, "sampled", store=store)
        store.commit()
    assert len(store.manifest["segments"]) == len(NAMES) * segments
    store.close()
    return model, sketch


def _attributor(root, model, sketch, method):
    kw = {}
    if method == "arnoldi_if":
        U, _ = torch.linalg.qr(torch.randn(sketch.sketch_dim, 3, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64))
        kw["eigenpairs"] = (torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), U)
    return Attributor(root, model, method=method, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_many_segments_give_the_one_segment_answer(tmp_path, monkeypatch, method):
    # blocks smaller than a segment and not aligned with it: several blocks straddle two segments
    monkeypatch.setattr(_stored, "BLOCK_ROWS", 37)
    monkeypatch.setattr(ix, "BLOCK_BYTES", 4 * 8 * 41)
    model, sketch = _run(tmp_path / "one", 300, 1)
    _run(tmp_path / "many", 300, 7)
    x, y, _ = blobs(n=5, seed=4)
    q = full_batch(x.double(), y)
    one = _attributor(tmp_path / "one", model, sketch, method)
    many = _attributor(tmp_path / "many", model, sketch, method)
    assert torch.equal(one.ids, many.ids)
    assert torch.equal(one.scores(q), many.scores(q))
    for opponents in (False, True):
        i1, s1 = one.top_k(q, k=9, opponents=opponents)
        i2, s2 = many.top_k(q, k=9, opponents=opponents)
        assert torch.equal(i1, i2) and torch.equal(s1, s2)
    # the streamed top-k is the dense scores' own top-k (grad_dot's exact search runs in float32)
    ref = one.scores(q).topk(9, dim=1)
    i2, s2 = many.top_k(q, k=9)
    assert torch.equal(i2, one.ids[ref.indices])
    tol = 1e-5 if method == "grad_dot" else 0.0
    torch.testing.assert_close(s2, ref.values, rtol=tol, atol=tol)


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", METHODS)
def test_queries_over_many_segments_hold_no_joined_copy(tmp_path, monkeypatch, method):
    # numpy allocations are traced (torch's are not); the joined rows of one slice would be one
    # allocation of n·D·4 bytes, the streamed blocks are BLOCK_ROWS·D·8 bytes; ids, their argsort
    # and the score positions are int64 arrays of n entries (8 bytes per row against 4·D)
    monkeypatch.setattr(_stored, "BLOCK_ROWS", 512)
    n, D = 20_000, 128
    monkeypatch.setattr(ix, "BLOCK_BYTES", 512 * 4 * D)
    model, sketch = _run(tmp_path / "warm", 200, 3, D=D)
    x, y, _ = blobs(n=4, seed=4)
    q = full_batch(x.double(), y)
    _attributor(tmp_path / "warm", model, sketch, method).top_k(q, k=5)  # imports and first-use caches
    _run(tmp_path / "big", n, 10, D=D, seed=1)
    slice_bytes = n * D * 4

    store = SketchStore.open(tmp_path / "big" / "store")  # hashed here: 4 MiB read buffers, not rows

    def query():
        att = _attributor(store, model, sketch, method)
        att.top_k(q, k=5)
        att.top_k(q, k=5, opponents=True)

    peak = _traced_peak(query)
    assert peak < slice_bytes / 4, f"{method}: {peak} bytes traced against {slice_bytes} bytes per slice"
