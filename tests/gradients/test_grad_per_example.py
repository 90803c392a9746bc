"""per_example_grads and sketch_gradients against exact float64 references."""

from __future__ import annotations

import pytest
import torch
from exact_refs import loop_grads
from torch import nn
from torch.nn import functional as F

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import ParamLayout, finite_mask, per_example_grads, sketch_gradients
from lightning_sketch.sketches import make

ATOL = 1e-10  # float64; the computations are a handful of fused ops deep


@pytest.mark.parametrize("case", ["mlp_case", "block_case"])
def test_per_example_equals_loop(case, request):
    model, loss_fn, batch = request.getfixturevalue(case)
    layout = ParamLayout.from_module(model)
    expected = loop_grads(model, loss_fn, batch, layout)
    torch.testing.assert_close(per_example_grads(model, loss_fn, batch), expected, atol=ATOL, rtol=0)


def test_chunking_invariance_and_subset_layout(mlp_case):
    model, loss_fn, batch = mlp_case
    layout = ParamLayout.from_module(model, exclude=["*.bias"])
    full = per_example_grads(model, loss_fn, batch, layout=layout)
    # Batched matmuls of another batch size may block differently in BLAS: equal up to float64 rounding.
    torch.testing.assert_close(
        per_example_grads(model, loss_fn, batch, layout=layout, chunk_size=4), full, atol=1e-14, rtol=0
    )
    assert full.shape == (6, layout.dim)
    torch.testing.assert_close(full, loop_grads(model, loss_fn, batch, layout), atol=ATOL, rtol=0)


def test_dict_batch_and_buffers_pass_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    batch = {
        "x": torch.randn(5, 3, dtype=torch.float64),
        "t": torch.randn(5, dtype=torch.float64),
        "tag": "keep",
    }

    def loss_fn(m, b):
        assert b["tag"] == "keep"
        return (m(b["x"]).squeeze(-1) - b["t"]) ** 2

    g = per_example_grads(model, loss_fn, batch)
    layout = ParamLayout.from_module(model)
    params = [dict(model.named_parameters())[n] for n in layout.names]
    for b in range(5):
        one = {"x": batch["x"][b : b + 1], "t": batch["t"][b : b + 1], "tag": "keep"}
        ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model, one)[0], params)])
        torch.testing.assert_close(g[b], ref, atol=ATOL, rtol=0)


def test_batchnorm_train_mode_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm.*model.eval\(\).*GroupNorm"):
        per_example_grads(model, lambda m, b: m(b).sum(-1), torch.randn(4, 3, dtype=torch.float64))


def test_dropout_train_mode_draws_independent_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(8, 4).contiguous()
    g = per_example_grads(model, lambda m, b: m(b).squeeze(-1), x)
    # Identical inputs: with "different" randomness the rows differ (masks differ) ...
    assert not torch.allclose(g[0], g[1])
    model.eval()
    ge = per_example_grads(model, lambda m, b: m(b).squeeze(-1), x)
    # ... and in eval mode they are identical.
    torch.testing.assert_close(ge, ge[:1].expand_as(ge), atol=0, rtol=0)
    assert model.training is False


def test_non_finite_returned_and_masked(mlp_case):
    model, _, (x, y) = mlp_case
    x = x.clone()
    x[2] = float("nan")
    g = per_example_grads(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (x, y))
    mask = finite_mask(g)
    assert mask.tolist() == [True, True, False, True, True, True]


def test_loss_fn_must_return_per_example(mlp_case):
    model, _, batch = mlp_case
    with pytest.raises(SketchInputError, match=r"per-example losses of shape \[B\]"):
        per_example_grads(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch)


def test_bad_batch_and_chunk_size(mlp_case):
    model, loss_fn, (x, y) = mlp_case
    with pytest.raises(SketchInputError, match="leading"):
        per_example_grads(model, loss_fn, (x, y[:3]))
    with pytest.raises(SketchConfigError, match="chunk_size"):
        per_example_grads(model, loss_fn, (x, y), chunk_size=0)
    with pytest.raises(SketchInputError, match="empty"):
        per_example_grads(model, loss_fn, (x[:0], y[:0]))
    with pytest.raises(SketchInputError, match="must be a Tensor, a dict"):
        per_example_grads(model, loss_fn, 3.0)


@pytest.mark.parametrize("case", ["mlp_case", "block_case"])
def test_implicit_equals_explicit_equals_reference(case, request, sketches_for):
    model, loss_fn, batch = request.getfixturevalue(case)
    layout = ParamLayout.from_module(model)
    exact = loop_grads(model, loss_fn, batch, layout)
    kinds = sketches_for(case, layout.dim, 16)
    assert "dense" in {s.kind for s in kinds}
    for sketch in kinds:
        ref = exact @ sketch.to_dense().T
        explicit = sketch_gradients(model, loss_fn, batch, sketch, mode="explicit", chunk_size=3)
        implicit = sketch_gradients(model, loss_fn, batch, sketch, mode="implicit", chunk_size=3)
        torch.testing.assert_close(explicit, ref, atol=1e-9, rtol=1e-9, msg=sketch.kind)
        torch.testing.assert_close(implicit, ref, atol=1e-9, rtol=1e-9, msg=sketch.kind)


def test_sketch_dim_mismatch_and_bad_mode(mlp_case):
    model, loss_fn, batch = mlp_case
    wrong = make("dense", dim=10, sketch_dim=4)
    with pytest.raises(SketchConfigError, match=r"`sketch.dim` must equal .* N = 66, got 10"):
        sketch_gradients(model, loss_fn, batch, wrong)
    right = make("dense", dim=66, sketch_dim=4)
    with pytest.raises(SketchConfigError, match="`mode` must be"):
        sketch_gradients(model, loss_fn, batch, right, mode="fast")
    with pytest.raises(SketchConfigError, match="`sketch` must be"):
        sketch_gradients(model, loss_fn, batch, "dense")


def test_model_untouched(block_case):
    model, loss_fn, batch = block_case
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    sketch = make("dense", dim=ParamLayout.from_module(model).dim, sketch_dim=8)
    per_example_grads(model, loss_fn, batch)
    sketch_gradients(model, loss_fn, batch, sketch, mode="implicit")
    assert model.training and all(m.training for m in model.modules())
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_model_and_layout_type_errors(mlp_case):
    model, loss_fn, batch = mlp_case
    with pytest.raises(SketchInputError, match="`model` must be a torch.nn.Module"):
        per_example_grads(lambda x: x, loss_fn, batch)
    with pytest.raises(SketchConfigError, match="`layout` must be a ParamLayout"):
        per_example_grads(model, loss_fn, batch, layout=["0.weight"])
