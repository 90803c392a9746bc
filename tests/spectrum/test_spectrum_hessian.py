"""hessian_eigs and the Hessian operators against the exact Hessian of a float64 MLP."""

from __future__ import annotations

import pytest
import torch

from lightning_sketch.exceptions import SketchConfigError, SpectrumError
from lightning_sketch.sketches import make
from lightning_sketch.spectrum import hessian_eigs, hessian_operator, probe_gradient


def test_hessian_eigs_exact_top10(small_case):
    params_before = [p.detach().clone() for p in small_case.model.parameters()]
    res = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=10, num_iter=70)
    torch.testing.assert_close(res.eigenvalues, small_case.eigvals.flip(0)[:10], rtol=1e-8, atol=0)
    assert res.eigenvectors.shape == (10, small_case.hessian.shape[0])
    assert res.residuals.shape == (10,) and bool(res.converged.all())
    assert res.num_matvecs == 70 and res.seconds > 0 and res.sketch_spec is None
    assert all(p.grad is None for p in small_case.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, small_case.model.parameters()))


def test_hvp_methods_agree_on_operator(small_case):
    n = small_case.hessian.shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = small_case.hessian @ v
    for method in ("fwd_rev", "double_backward"):
        op = hessian_operator(small_case.model, small_case.loss_fn, small_case.batches, method=method)
        torch.testing.assert_close(op(v), ref, rtol=1e-10, atol=1e-12)
    op = hessian_operator(small_case.model, small_case.loss_fn, small_case.batches, method="finite_difference")
    assert float((op(v) - ref).norm() / ref.norm()) < 1e-6


def test_identity_sketch_equals_exact(small_case):
    n = small_case.hessian.shape[0]
    spec = {"kind": "identity", "dim": n, "sketch_dim": n, "seed": 0}
    exact = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=3, num_iter=30, seed=2)
    sk = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=3, num_iter=30, seed=2, sketch=spec)
    torch.testing.assert_close(sk.eigenvalues, exact.eigenvalues, rtol=1e-12, atol=0)
    assert sk.sketch_spec == spec


def test_sketched_operator_is_phi_h_phi_t(small_case):
    n = small_case.hessian.shape[0]
    sketch = make("dense", n, 40, seed=3)
    phi = sketch.to_dense()
    op = hessian_operator(small_case.model, small_case.loss_fn, small_case.batches, sketch)
    assert op.dim == 40
    v = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(op(v), phi @ (small_case.hessian @ (phi.T @ v)), rtol=1e-9, atol=1e-12)
    res = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=4, sketch=sketch, num_iter=40)
    small = torch.linalg.eigvalsh(phi @ small_case.hessian @ phi.T).flip(0)[:4]
    torch.testing.assert_close(res.eigenvalues, small, rtol=1e-8, atol=0)
    assert res.eigenvectors.shape == (4, 40)


def test_which_sa_gives_most_negative(small_case):
    res = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=2, which="SA", num_iter=30)
    torch.testing.assert_close(res.eigenvalues, small_case.eigvals[:2], rtol=1e-8, atol=0)


def test_probe_gradient(small_case):
    g = probe_gradient(small_case.model, small_case.loss_fn, small_case.batches)
    torch.testing.assert_close(g, small_case.grad, rtol=1e-10, atol=1e-12)
    sketch = make("dense", g.numel(), 16, seed=1)
    torch.testing.assert_close(
        probe_gradient(small_case.model, small_case.loss_fn, small_case.batches, sketch), sketch.apply(small_case.grad),
        rtol=1e-10, atol=1e-12,
    )


def test_reduce_is_applied(small_case):
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t

    res = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=1, num_iter=5, reduce=reduce)
    assert len(calls) == res.num_matvecs == 5


def test_errors(small_case):
    m, b = small_case.model, small_case.batches
    n = small_case.hessian.shape[0]
    with pytest.raises(SpectrumError, match="`k` must be <= `dim`"):
        hessian_eigs(m, small_case.loss_fn, b, k=20, sketch=make("dense", n, 8))
    with pytest.raises(SpectrumError, match="`which` must be one of"):
        hessian_eigs(m, small_case.loss_fn, b, k=2, which="XX")
    with pytest.raises(SpectrumError, match="`num_iter` must be an int"):
        hessian_eigs(m, small_case.loss_fn, b, k=5, num_iter=2)
    with pytest.raises(SpectrumError, match="`batches` must be a non-empty list"):
        hessian_eigs(m, small_case.loss_fn, [], k=2)
    with pytest.raises(SpectrumError, match="`batches` must be a non-empty list"):
        hessian_eigs(m, small_case.loss_fn, b[0][0], k=2)
    with pytest.raises(SketchConfigError, match="`sketch.dim` must equal"):
        hessian_eigs(m, small_case.loss_fn, b, k=2, sketch=make("dense", 100, 8))
    with pytest.raises(SketchConfigError, match="`sketch` must be None, a Sketch or a spec dict"):
        hessian_eigs(m, small_case.loss_fn, b, k=2, sketch="dense")


def test_cached_graph_operator_is_the_exact_hessian_and_is_released(small_case):
    """hessian_operator's default keeps the graph of ∇L (one build for many matvecs); its matvecs are the
    exact H (columns of the dense reference), and release() frees the graph (the next matvec rebuilds)."""
    n = small_case.hessian.shape[0]
    op = hessian_operator(small_case.model, small_case.loss_fn, small_case.batches)
    cols = torch.eye(n, dtype=torch.float64)[:40]
    got = torch.stack([op(c) for c in cols])
    torch.testing.assert_close(got, small_case.hessian[:40], rtol=1e-10, atol=1e-12)
    assert op.hvp is not None and op.hvp.graph is not None and op.hvp.graph.builds == 1
    op.release()
    op(cols[0])
    assert op.hvp.graph.builds == 2
    cold = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=4, num_iter=40, cache_graph=False)
    warm = hessian_eigs(small_case.model, small_case.loss_fn, small_case.batches, k=4, num_iter=40)
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)
