"""Position embeddings shared by the batch (nanoGPT's ``wpe(arange(T))``, Hugging Face's
``[1, T]`` ids): the hooked per-example gradients equal the loop reference, T = B included."""

from __future__ import annotations

import pytest
import torch
from exact_refs import loop_grads
from torch import nn
from torch.nn import functional as F

from lightning_sketch.exceptions import UnsupportedModelError
from lightning_sketch.gradients import GradientCapture, ParamLayout, sketch_gradients
from lightning_sketch.gradients.capture import hooked_sketch
from lightning_sketch.sketches.per_layer import PerLayerSketch


class TinyGPT(nn.Module):
    """Token + position embeddings, one causal attention block, a tied or untied head."""

    def __init__(self, vocab=11, block=6, d=8, form="arange", tied=True):
        super().__init__()
        self.form = form
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln = nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)  # [T]: nanoGPT
        if self.form == "hf":
            pos = pos.unsqueeze(0)  # [1, T]: Hugging Face GPT-2's position_ids
        x = self.wte(idx) + self.wpe(pos)
        q, k, v = self.c_attn(self.ln(x)).split(x.shape[-1], dim=-1)
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(x)


def lm_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)


def _data(size, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (size, length), generator=g)
    return x, torch.randint(0, 11, (size, length), generator=g)


def _rel(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("form", ["arange", "hf"])
@pytest.mark.parametrize(("size", "length", "tied"), [(3, 5, True), (4, 4, False), (5, 4, True)])
def test_position_embedding_rows_equal_loop(form, size, length, tied):
    """T != B, T = B (1-D ids of length B are positions, not one id per example) and a chunk of
    one example left over (chunk_size=2 on B=5)."""
    torch.manual_seed(0)
    model = TinyGPT(block=length, form=form, tied=tied).double()
    batch = _data(size, length)
    layout = ParamLayout.from_module(model)
    want = loop_grads(model, lm_loss, batch, layout)
    for chunk in (None, 2):
        got = hooked_sketch(model, lm_loss, batch, None, layout, chunk_size=chunk)
        assert _rel(got, want) < 1e-10, (chunk, _rel(got, want))


def test_position_embedding_per_layer_sketch_equals_sketched_loop():
    torch.manual_seed(1)
    model = TinyGPT(block=4).double()
    batch = _data(4, 4, seed=1)
    layout = ParamLayout.from_module(model)
    sketch = PerLayerSketch.for_module(model, sketch_dim=24, layout=layout, seed=0)
    got = sketch_gradients(model, lm_loss, batch, sketch, mode="auto", layout=layout)
    want = sketch.apply(loop_grads(model, lm_loss, batch, layout))
    assert _rel(got, want) < 1e-10


class ClassConditioned(nn.Module):
    """``emb(c)`` with one class id per example (1-D ids of length B): not shared."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(6, 5), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x, c):
        return self.out(torch.tanh(self.lin(x) + self.emb(c)))


def test_one_id_per_example_stays_per_example():
    torch.manual_seed(2)
    model = ClassConditioned().double()
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3])  # ids that look like arange(B)
    y = torch.randint(0, 2, (4,))

    def loss(m, b):
        return F.cross_entropy(m(b[0], b[1]), b[2], reduction="none")

    layout = ParamLayout.from_module(model)
    got = hooked_sketch(model, loss, (x, c, y), None, layout)
    assert _rel(got, loop_grads(model, loss, (x, c, y), layout)) < 1e-10


class NotBroadcast(TinyGPT):
    """Reduces the position embedding over positions: feeding it [B, T] ids would change the loss."""

    def forward(self, idx):
        pos = self.wpe(torch.arange(idx.shape[1], device=idx.device)).sum(0)  # [C]
        return self.head(self.wte(idx) + pos)


def test_position_embedding_used_otherwise_is_refused_before_any_row():
    model = NotBroadcast(block=5).double()
    cap = GradientCapture(model, None, loss_scale="sum")
    with pytest.raises(UnsupportedModelError, match=r"\['wpe'\].*exclude"):
        cap.probe(lm_loss, _data(3, 5))
    assert cap._buffer is None
