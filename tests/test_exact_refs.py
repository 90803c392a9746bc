"""The shared references (per-example gradients, dense Hessian) against closed forms, so they are pinned."""

from __future__ import annotations

import torch
from exact_refs import dense_hessian, loop_grads
from torch import nn

from lightning_sketch.layout import ParamLayout


def test_loop_grads_equal_the_closed_form_of_least_squares():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 1).double()
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):
        xb, yb = batch
        return 0.5 * (m(xb).squeeze(-1) - yb) ** 2

    r = (model(x).squeeze(-1) - y).detach()  # residuals; d/dw = r x, d/db = r
    want = torch.cat([r[:, None] * x, r[:, None]], dim=1)
    torch.testing.assert_close(loop_grads(model, loss_fn, (x, y)), want, rtol=1e-12, atol=1e-12)
    # a layout selects and orders the parameters; a dict batch works the same way
    layout = ParamLayout(("bias", "weight"), ((1,), (1, 5)))
    got = loop_grads(model, lambda m, b: loss_fn(m, (b["x"], b["y"])), {"x": x, "y": y}, layout)
    torch.testing.assert_close(got, torch.cat([r[:, None], r[:, None] * x], dim=1), rtol=1e-12, atol=1e-12)


def test_dense_hessian_equals_the_closed_form_of_least_squares():
    # ℓ_b = ½ (w·x_b + c − y_b)²: H = mean_b [x_b; 1][x_b; 1]ᵀ over the examples of every batch.
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 1).double()
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):
        xb, yb = batch
        return 0.5 * (m(xb).squeeze(-1) - yb) ** 2

    z = torch.cat([x, torch.ones(9, 1, dtype=torch.float64)], dim=1)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]  # unequal sizes: the mean is over examples
    torch.testing.assert_close(dense_hessian(model, loss_fn, batches), z.T @ z / 9, rtol=1e-12, atol=1e-12)
    # a layout selects θ; parameters outside it are held fixed
    layout = ParamLayout(("bias",), ((1,),))
    want = torch.ones(1, 1, dtype=torch.float64)
    torch.testing.assert_close(dense_hessian(model, loss_fn, batches, layout), want)
    assert all(p.grad is None for p in model.parameters())


def test_dense_hessian_sees_parameters_the_loss_reads_directly():
    # the loss may read a parameter off the module (not only through forward): ℓ = s² · (x·w)²
    model = nn.Linear(2, 1, bias=False).double()
    model.s = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    h = dense_hessian(model, lambda m, b: m.s**2 * m(b).squeeze(-1) ** 2, [x])
    # θ = (w1, w2, s), u = x·w = 3: ∂²/∂w² = 2 s² x xᵀ, ∂²/∂s² = 2 u², ∂²/∂w∂s = 4 s u x
    want = torch.tensor([[18.0, 18.0, 36.0], [18.0, 18.0, 36.0], [36.0, 36.0, 18.0]], dtype=torch.float64)
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
