"""Recurrent layers through one batched, unrolled recomputation (``gradients._capture_rnn``):
``hooked_sketch``'s rows (no check against autograd in between) equal a per-example loop of
``torch.autograd.grad`` for RNN/GRU/LSTM, stacked and bidirectional, batch-first or not, with an
initial state, reading the output sequence, the final hidden state or the LSTM's final cell."""

from __future__ import annotations

import pytest
import torch
from exact_refs import loop_grads
from torch import nn

from lightning_sketch.gradients import ParamLayout
from lightning_sketch.gradients._capture_rnn import rnn_terms
from lightning_sketch.gradients.capture import hooked_sketch
from lightning_sketch.sketches.per_layer import PerLayerSketch

B, T, F, H = 5, 4, 3, 6


class Net(nn.Module):
    def __init__(self, cell, read, batch_first, with_state, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(F, H, batch_first=batch_first, **kw)
        self.read, self.batch_first, self.with_state = read, batch_first, with_state
        dirs = 2 if kw.get("bidirectional") else 1
        self.layers = kw.get("num_layers", 1) * dirs
        if with_state:
            self.init = nn.Linear(F, H)
        width = kw.get("proj_size") or H
        self.head = nn.Linear(width * dirs if read == "out" else width, 2)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        hx = None
        if self.with_state:
            h0 = torch.tanh(self.init(x.mean(1))).unsqueeze(0).expand(self.layers, -1, -1).contiguous()
            hx = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        out, state = self.rnn(seq, hx)
        if self.read == "out":
            out = out if self.batch_first else out.transpose(0, 1)
            return self.head(out.mean(1))
        h_n = state[0] if isinstance(self.rnn, nn.LSTM) else state
        if self.read == "c":
            h_n = state[1]
        return self.head(h_n.sum(0))


def loss(model, batch):
    return model(batch[0]).pow(2).sum(-1)


CASES = [
    (nn.LSTM, "out", True, True, {}),
    (nn.LSTM, "h", False, False, {"num_layers": 2}),
    (nn.LSTM, "c", True, True, {"bidirectional": True}),
    (nn.GRU, "out", False, True, {"num_layers": 2, "bidirectional": True}),
    (nn.GRU, "h", True, False, {"bias": False}),
    (nn.RNN, "out", True, True, {"nonlinearity": "relu", "num_layers": 2}),
    (nn.RNN, "h", False, False, {}),
]


@pytest.mark.parametrize(("cell", "read", "batch_first", "with_state", "kw"), CASES)
def test_unrolled_rows_equal_the_loop(cell, read, batch_first, with_state, kw):
    model = Net(cell, read, batch_first, with_state, **kw).double().eval()
    x = (torch.randn(B, T, F, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),)
    layout = ParamLayout.from_module(model)
    got = hooked_sketch(model, loss, x, None, layout)
    want = loop_grads(model, loss, x, layout)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    sketch = PerLayerSketch.for_module(model, sketch_dim=40, seed=0)  # the factorised path too
    torch.testing.assert_close(hooked_sketch(model, loss, x, sketch, layout), sketch.apply(want),
                               rtol=1e-9, atol=1e-12)


def test_what_the_recomputation_leaves_to_the_loop():
    proj = nn.LSTM(F, H, proj_size=2)
    assert rnn_terms(proj, torch.randn(T, B, F), None, 0, torch.randn(T, B, 2)) is None
    drop = nn.GRU(F, H, num_layers=2, dropout=0.5).train()
    assert rnn_terms(drop, torch.randn(T, B, F), None, 0, torch.randn(T, B, H)) is None
    assert rnn_terms(drop.eval(), torch.randn(T, B, F), None, 0, torch.randn(T, B, H)) is not None
    model = Net(nn.LSTM, "out", True, False, proj_size=2).double().eval()  # the loop still serves it
    x = (torch.randn(B, T, F, dtype=torch.float64),)
    layout = ParamLayout.from_module(model)
    torch.testing.assert_close(hooked_sketch(model, loss, x, None, layout), loop_grads(model, loss, x, layout),
                               rtol=1e-9, atol=1e-12)
