"""The shared per-example gradient reference against a closed form (so the reference is itself pinned)."""

from __future__ import annotations

import torch
from exact_refs import loop_grads
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
