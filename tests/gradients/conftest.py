"""Tiny float64 models for the gradient tests: an MLP and a one-block transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F


class TinyBlock(nn.Module):
    """Embedding + one pre-LN self-attention block (nn.MultiheadAttention) + MLP + mean-pooled head."""

    def __init__(self, vocab: int = 7, width: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


def xent(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, xent, (x, y)


@pytest.fixture
def block_case():
    torch.manual_seed(1)
    model = TinyBlock().double().eval()
    x = torch.randint(0, 7, (3, 4))
    y = torch.randint(0, 3, (3,))
    return model, xent, (x, y)


def buildable_sketches(dim, sketch_dim, seed=3, kinds=("identity", "dense", "affd", "qk", "afjl", "fjl")):
    """The kinds `make` can build right now (the structured kinds are landed by a teammate)."""
    from lightning_sketch.exceptions import SketchConfigError
    from lightning_sketch.sketches import make

    out = []
    for kind in kinds:
        try:
            out.append(make(kind, dim=dim, sketch_dim=dim if kind == "identity" else sketch_dim, seed=seed))
        except (ImportError, AttributeError, SketchConfigError):
            continue
    return out


@pytest.fixture
def sketches_for():
    """``sketches_for(case, dim, sketch_dim)``: every buildable kind for the MLP; for the slower
    transformer block, dense plus the first buildable structured kind."""

    def pick(case, dim, sketch_dim):
        if case == "mlp_case":
            return buildable_sketches(dim, sketch_dim)
        dense = buildable_sketches(dim, sketch_dim, kinds=("dense",))
        return dense + buildable_sketches(dim, sketch_dim, kinds=("affd", "qk", "afjl"))[:1]

    return pick
