"""Summary statistics against hand computations; snapshot files round trip and fail loudly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_sketch.exceptions import SpectrumError, StoreCorruptError, StoreFormatError, StoreNotFoundError
from lightning_sketch.spectrum import (
    alignment,
    load_index,
    load_snapshot,
    outlier_count,
    ratios,
    rneg,
    save_snapshot,
    spectrum_snapshot,
    summarize,
    top_eigenpairs_from_snapshot,
)


def test_statistics_against_hand_values():
    e = torch.tensor([10.0, 3.0, 1.5, -2.0], dtype=torch.float64)
    assert rneg(e) == pytest.approx(0.2)
    assert rneg(e, smallest=-5.0) == pytest.approx(0.5)
    assert rneg(torch.tensor([1.0, 0.5])) == 0.0
    assert np.isnan(rneg(torch.tensor([-1.0, -2.0])))
    torch.testing.assert_close(ratios(e), torch.tensor([1.0, 0.3, 0.15], dtype=torch.float64))
    assert outlier_count(e) == 2 and outlier_count(e, threshold=0.1) == 3


def test_alignment_is_share_of_squared_norm_in_outlier_span():
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q.T  # orthonormal rows
    coeffs = torch.randn(50, generator=g, dtype=torch.float64)
    grad = coeffs @ q
    expected = float((coeffs[:3] ** 2).sum() / (coeffs**2).sum())
    assert alignment(grad, q[:3]) == pytest.approx(expected, rel=1e-12)
    assert alignment(grad, q) == pytest.approx(1.0, rel=1e-12)
    assert alignment(torch.zeros(50, dtype=torch.float64), q[:3]) == 0.0
    s = summarize(torch.tensor([5.0, 4.0, 0.5], dtype=torch.float64), q[:3], grad, threshold=0.2)
    assert s.outliers == 2
    assert s.alignment == pytest.approx(float((coeffs[:2] ** 2).sum() / (coeffs**2).sum()), rel=1e-12)


def test_statistics_errors():
    with pytest.raises(SpectrumError, match="`eigenvalues` must be a non-empty 1-D tensor"):
        rneg(torch.zeros(0))
    with pytest.raises(SpectrumError, match="`threshold` must be in"):
        outlier_count(torch.ones(3), threshold=2.0)
    with pytest.raises(SpectrumError, match=r"`eigenvectors` must be \[k, 4\]"):
        alignment(torch.ones(4), torch.ones(2, 5))


def test_spectrum_snapshot_on_small_mlp(small_case):
    from lightning_sketch.sketches import make

    n = small_case.hessian.shape[0]
    sketch = make("dense", n, 30, seed=0)
    snap = spectrum_snapshot(small_case.model, small_case.loss_fn, small_case.batches, k=3, sketch=sketch,
                             num_iter=30, density_runs=2, density_iter=10, trace=True, trace_matvecs=12,
                             generator=torch.Generator().manual_seed(0))
    phi = sketch.to_dense()
    small = phi @ small_case.hessian @ phi.T
    ev = torch.linalg.eigvalsh(small)
    torch.testing.assert_close(snap.eigs.eigenvalues, ev.flip(0)[:3], rtol=1e-8, atol=0)
    assert snap.num_matvecs == 30 + 2 * 10 + 12
    assert snap.summary.rneg == pytest.approx(max(0.0, -float(ev[0])) / float(ev[-1]), rel=1e-8)
    gphi = phi @ small_case.grad
    n_out = snap.summary.outliers
    expected = alignment(gphi, snap.eigs.eigenvectors[:n_out])
    assert snap.summary.alignment == pytest.approx(expected, rel=1e-10)
    assert set(snap.scalars()) >= {"lambda_max", "rneg", "outliers", "alignment", "trace", "matvecs", "seconds"}


def test_snapshot_round_trip_and_index(tmp_path):
    vals = torch.tensor([3.0, 2.0], dtype=torch.float64)
    vecs = torch.eye(2, 8)
    spec = {"kind": "dense", "dim": 8, "sketch_dim": 2, "seed": 0}
    save_snapshot(tmp_path, 7, {"eigenvalues": vals, "eigenvectors": vecs, "converged": torch.tensor([True, False])},
                  {"sketch_spec": spec, "scalars": {"lambda_max": 3.0}})
    save_snapshot(tmp_path, 3, {"eigenvalues": vals + 1, "eigenvectors": vecs}, {"sketch_spec": spec})
    save_snapshot(tmp_path, 7, {"eigenvalues": vals * 2, "eigenvectors": vecs}, {"sketch_spec": spec})  # replaces
    idx = load_index(tmp_path)
    assert [e["step"] for e in idx] == [3, 7]
    snap = load_snapshot(tmp_path / idx[1]["file"])
    torch.testing.assert_close(snap["eigenvalues"], vals * 2)
    assert snap["meta"]["step"] == 7 and snap["meta"]["sketch_spec"] == spec
    v, e, s = top_eigenpairs_from_snapshot(tmp_path)
    torch.testing.assert_close(v, vals * 2)
    assert e.shape == (2, 8) and e.dtype == torch.float32 and s == spec
    assert not list(tmp_path.glob("*.tmp*"))


def test_snapshot_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        load_snapshot(tmp_path / "nope.npz")
    with pytest.raises(StoreNotFoundError, match="No spectrum snapshots"):
        top_eigenpairs_from_snapshot(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(StoreCorruptError, match="unreadable"):
        load_snapshot(tmp_path / "bad.npz")
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other/v9", "snapshots": []}))
    with pytest.raises(StoreFormatError, match="expected 'lightning_sketch.spectrum/v1'"):
        load_index(tmp_path)
