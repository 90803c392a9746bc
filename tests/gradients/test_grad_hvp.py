"""HVPs (three methods), make_hvp, loss_grad and sketched HVPs against torch.func.hessian in float64."""

from __future__ import annotations

import pytest
import torch
from exact_refs import dense_hessian
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import ParamLayout, hvp, loss_grad, make_hvp, sketched_hvp
from lightning_sketch.sketches import make

METHODS = ["fwd_rev", "double_backward", "finite_difference"]
# finite difference with eps = 1e-5 in float64: bias O(eps^2 * |third derivative|) + round-off
# O(1e-16 / 1e-5); 1e-6 leaves ample margin on these tiny models.
FD_TOL = 1e-6


def _flat_loss(model, loss_fn, batches, layout):
    others = {n: p.detach() for n, p in model.named_parameters() if n not in layout.names}

    def flat_loss(theta):
        params = {**others, **layout.unflatten(theta)}
        return torch.cat([loss_fn(_Bound(model, params), b) for b in batches]).mean()

    return flat_loss, layout.flatten(layout.params(model))


def ref_hvp(model, loss_fn, batches, layout, V):
    """Rows of ``V [K, N]`` times H, by plain-autograd double backward on the flat vector.

    The transformer block's reference: there torch 2.13's ``torch.func.hessian`` (and
    ``jacrev(jacrev)``) returns an asymmetric, wrong matrix in the embed x norm1.weight blocks (a vmap
    batching problem) while this loop, finite differences and our three methods agree to 1e-10.
    """
    flat_loss, theta0 = _flat_loss(model, loss_fn, batches, layout)
    with sdpa_kernel(SDPBackend.MATH):
        t = theta0.clone().requires_grad_(True)
        g = torch.autograd.grad(flat_loss(t), t, create_graph=True)[0]
        return torch.stack([torch.autograd.grad(g, t, row, retain_graph=True)[0] for row in V])


def test_reference_hvp_agrees_with_torch_func(mlp_case):
    model, loss_fn, batch = mlp_case
    layout = ParamLayout.from_module(model)
    H = dense_hessian(model, loss_fn, [batch], layout)
    eye = torch.eye(layout.dim, dtype=torch.float64)
    torch.testing.assert_close(ref_hvp(model, loss_fn, [batch], layout, eye), H, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(H, H.T, atol=1e-12, rtol=0)


class _Bound(nn.Module):
    """Calls `model` with substituted parameters (reference only)."""

    def __init__(self, model, params):
        super().__init__()
        self.m, self.p = [model], params

    def forward(self, x):
        return functional_call(self.m[0], self.p, (x,))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["mlp_case", "block_case"])
def test_hvp_matches_hessian(case, method, request):
    model, loss_fn, batch = request.getfixturevalue(case)
    layout = ParamLayout.from_module(model)
    v = torch.randn(2, layout.dim, dtype=torch.float64)
    ref = ref_hvp(model, loss_fn, [batch], layout, v)
    if case == "mlp_case":
        torch.testing.assert_close(
            ref, v @ dense_hessian(model, loss_fn, [batch], layout).T, atol=1e-12, rtol=1e-12
        )
    got = hvp(model, loss_fn, batch, v, method=method)
    tol = FD_TOL if method == "finite_difference" else 1e-10
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(hvp(model, loss_fn, batch, v[0], method=method), got[0], atol=tol, rtol=tol)


def test_least_squares_closed_form():
    torch.manual_seed(0)
    X = torch.randn(20, 4, dtype=torch.float64)
    t = torch.randn(20, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
    v = torch.randn(4, dtype=torch.float64)
    for method in METHODS:
        got = hvp(model, loss_fn, (X, t), v, method=method)
        torch.testing.assert_close(got, 2 * X.T @ X @ v / 20, atol=1e-8, rtol=1e-8)
    grad = loss_grad(model, loss_fn, [(X[:7], t[:7]), (X[7:], t[7:])])
    w = model.weight.detach()[0]
    torch.testing.assert_close(grad, 2 * X.T @ (X @ w - t) / 20, atol=1e-12, rtol=1e-12)


def test_make_hvp_averages_batches(mlp_case):
    model, loss_fn, (x, y) = mlp_case
    layout = ParamLayout.from_module(model)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]  # unequal sizes: weighted by size
    H = dense_hessian(model, loss_fn, batches, layout)
    v = torch.randn(layout.dim, dtype=torch.float64)
    op = make_hvp(model, loss_fn, batches, method="double_backward")
    torch.testing.assert_close(op(v), H @ v, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op(v), hvp(model, loss_fn, (x, y), v), atol=1e-10, rtol=1e-10)
    assert torch.equal(op(v), op(v))  # deterministic


@pytest.mark.parametrize("case", ["mlp_case", "block_case"])
def test_sketched_hvp_implicit_equals_explicit(case, request, sketches_for):
    model, loss_fn, batch = request.getfixturevalue(case)
    layout = ParamLayout.from_module(model)
    # Every buildable kind is checked for gradients in test_grad_per_example.py; for the (slower)
    # sketched HVPs the MLP runs identity, dense and the first two structured kinds.
    sketches = sketches_for(case, layout.dim, 12)
    if case == "mlp_case":
        sketches = [s for s in sketches if s.kind in ("identity", "dense")] + [
            s for s in sketches if s.kind not in ("identity", "dense")
        ][:2]
    for sketch in sketches:
        P = sketch.to_dense()
        v = torch.randn(2, sketch.sketch_dim, dtype=torch.float64)
        ref = ref_hvp(model, loss_fn, [batch], layout, v @ P) @ P.T
        for mode in ("explicit", "implicit"):
            got = sketched_hvp(model, loss_fn, batch, sketch, v, mode=mode)
            torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9, msg=f"{sketch.kind} {mode}")
        one = sketched_hvp(model, loss_fn, batch, sketch, v[1], mode="implicit")
        torch.testing.assert_close(one, ref[1], atol=1e-9, rtol=1e-9)


def test_hvp_leaves_model_untouched(block_case):
    model, loss_fn, batch = block_case
    layout = ParamLayout.from_module(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    v = torch.randn(layout.dim, dtype=torch.float64)
    for method in METHODS:
        hvp(model, loss_fn, batch, v, method=method)
    loss_grad(model, loss_fn, [batch])
    sketch = make("dense", dim=layout.dim, sketch_dim=5)
    sketched_hvp(model, loss_fn, batch, sketch, torch.randn(5, dtype=torch.float64), mode="implicit")
    assert not model.training
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_hvp_errors(mlp_case):
    model, loss_fn, batch = mlp_case
    v = torch.randn(66, dtype=torch.float64)
    with pytest.raises(SketchConfigError, match="`method` must be one of"):
        hvp(model, loss_fn, batch, v, method="magic")
    with pytest.raises(SketchInputError, match=r"`v` must be .* N = 66, got \(5,\)"):
        hvp(model, loss_fn, batch, v[:5])
    with pytest.raises(SketchInputError, match="wrap a single batch"):
        make_hvp(model, loss_fn, batch[0])
    with pytest.raises(SketchInputError, match="`batches` is empty"):
        loss_grad(model, loss_fn, [])
    sketch = make("dense", dim=66, sketch_dim=4)
    with pytest.raises(SketchInputError, match=r"`v` must be .* D = 4"):
        sketched_hvp(model, loss_fn, batch, sketch, v)
    with pytest.raises(SketchConfigError, match="`mode` must be 'explicit' or 'implicit'"):
        sketched_hvp(model, loss_fn, batch, sketch, v[:4], mode="factorized")
    with pytest.raises(SketchConfigError, match="`sketch.dim` must equal"):
        sketched_hvp(model, loss_fn, batch, make("dense", dim=9, sketch_dim=4), v[:4])
    bn = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).double()
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        hvp(
            bn,
            lambda m, b: m(b).sum(-1),
            torch.randn(4, 5, dtype=torch.float64),
            torch.randn(24, dtype=torch.float64),
        )


def test_finite_difference_zero_vector(mlp_case):
    model, loss_fn, batch = mlp_case
    z = torch.zeros(66, dtype=torch.float64)
    assert torch.equal(hvp(model, loss_fn, batch, z, method="finite_difference"), z)


def test_sketched_hvp_methods_agree():
    """sketched_hvp(method=...) lifts, takes the exact HVP with that method, and projects back."""
    import torch

    from lightning_sketch.gradients import sketched_hvp
    from lightning_sketch.sketches import make

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    s = make("dense", dim=26, sketch_dim=5, seed=1)
    v = torch.randn(2, 5, dtype=torch.float64)
    a = sketched_hvp(model, loss_fn, (x, y), s, v, method="fwd_rev")
    b = sketched_hvp(model, loss_fn, (x, y), s, v, method="double_backward")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(SketchConfigError, match="implicit"):
        sketched_hvp(model, loss_fn, (x, y), s, v, mode="implicit", method="double_backward")


class _Unused(nn.Module):
    """A pooler the loss never uses (Hugging Face's BertPooler under a mean-pooling head) and a
    shift that enters the loss linearly (constant gradient, zero Hessian rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.pooler = nn.Linear(2, 2)
        self.shift = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev", "kept_graph"])
def test_hvp_with_unused_and_linear_parameters(method):
    """Every method (and the kept graph of make_hvp(cache_graph=True)) returns zeros for the unused/linear
    parameters' entries and the exact H v elsewhere, leaving .grad untouched."""
    torch.manual_seed(0)
    model = _Unused().double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss_fn(m, b):
        return m(b).pow(2).sum(-1) + m.shift

    layout = ParamLayout.from_module(model)
    v = torch.randn(layout.dim, dtype=torch.float64)
    H = dense_hessian(model, loss_fn, [x], layout)
    if method == "kept_graph":
        got = make_hvp(model, loss_fn, [x], method="double_backward", cache_graph=True)(v)
    else:
        got = hvp(model, loss_fn, x, v, method=method)
    torch.testing.assert_close(got, H @ v, atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    pooler = layout.unflatten(got)
    assert not pooler["pooler.weight"].any() and not pooler["pooler.bias"].any() and not pooler["shift"].any()


# --------------------------------------------------------------------------- cached graph of ∇L
@pytest.mark.parametrize("case", ["mlp_case", "block_case"])
def test_cached_graph_equals_exact_hessian(case, request):
    """cache_graph=True gives H v (and H V) equal to the torch.func / plain-autograd reference, on two
    batches of unequal size, built once for every call at the same parameters."""
    model, loss_fn, (x, y) = request.getfixturevalue(case)
    layout = ParamLayout.from_module(model)
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    V = torch.randn(3, layout.dim, dtype=torch.float64)
    ref = ref_hvp(model, loss_fn, batches, layout, V)
    op = make_hvp(model, loss_fn, batches, method="double_backward", cache_graph=True)
    torch.testing.assert_close(op(V), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op(V[1]), ref[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op(V.float()), ref.float(), atol=1e-5, rtol=1e-4)  # any float dtype in, same out
    assert op(V.float()).dtype == torch.float32
    assert op.graph is not None and op.graph.builds == 1


def test_cached_graph_rebuilds_when_parameters_buffers_or_mode_change(mlp_case):
    """An in-place parameter update (an optimizer step), load_state_dict and a mode flip each rebuild the
    graph, so the cached operator is always the Hessian at the current parameters."""
    model, loss_fn, batch = mlp_case
    layout = ParamLayout.from_module(model)
    op = make_hvp(model, loss_fn, [batch], method="double_backward", cache_graph=True)
    v = torch.randn(layout.dim, dtype=torch.float64)
    before = op(v)
    torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = op(v)
    assert op.graph.builds == 2 and not torch.allclose(before, after)
    torch.testing.assert_close(after, ref_hvp(model, loss_fn, [batch], layout, v[None])[0], atol=1e-10, rtol=1e-10)
    state = {k: t.clone() * 0.5 for k, t in model.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(op(v), ref_hvp(model, loss_fn, [batch], layout, v[None])[0], atol=1e-10, rtol=1e-10)
    assert op.graph.builds == 3
    model.eval()
    op(v)
    assert op.graph.builds == 4
    op.clear()
    op(v)
    assert op.graph.builds == 5


def test_cache_graph_is_ignored_by_other_methods(mlp_case):
    model, loss_fn, batch = mlp_case
    assert make_hvp(model, loss_fn, [batch], method="fwd_rev", cache_graph=True).graph is None
    assert make_hvp(model, loss_fn, [batch], method="double_backward").graph is None


def test_cached_graph_out_of_device_memory_falls_back_to_recomputing(mlp_case, monkeypatch):
    """When building the kept graph raises the allocator's OutOfMemoryError, the operator warns once, drops
    the cache and keeps returning the exact H v by recomputing the graph per HVP."""
    from lightning_sketch.gradients._hvp_graph import GraphHVP

    model, loss_fn, batch = mlp_case
    layout = ParamLayout.from_module(model)
    op = make_hvp(model, loss_fn, [batch], method="double_backward", cache_graph=True)

    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(GraphHVP, "_build", no_memory)
    v = torch.randn(layout.dim, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="does not fit in device memory"):
        got = op(v)
    assert op.graph is None
    ref = ref_hvp(model, loss_fn, [batch], layout, v[None])[0]
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op(v), ref, atol=1e-10, rtol=1e-10)


def test_cached_graph_rebuilds_when_a_probe_batch_changes_in_place():
    """The kept graph is keyed on the batch tensors too: editing a target in place (not saved by autograd)
    must not leave a stale H, and editing an input that autograd saved must not break later calls."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)

    def loss_fn(m, b):
        return (m(b[0]).squeeze(-1) - b[1]) ** 4

    layout = ParamLayout.from_module(model)
    op = make_hvp(model, loss_fn, [(x, y)], method="double_backward", cache_graph=True)
    v = torch.randn(layout.dim, dtype=torch.float64)
    op(v)
    y.add_(1.0)
    torch.testing.assert_close(op(v), ref_hvp(model, loss_fn, [(x, y)], layout, v[None])[0], atol=1e-10, rtol=1e-10)
    x.mul_(0.5)
    torch.testing.assert_close(op(v), ref_hvp(model, loss_fn, [(x, y)], layout, v[None])[0], atol=1e-10, rtol=1e-10)
    assert op.graph.builds == 3
