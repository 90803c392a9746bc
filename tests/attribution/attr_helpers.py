"""Tiny models and data shared by the attribution and GradientSketch tests."""

from __future__ import annotations

import exact_refs
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import classification_margin
from lightning_sketch.data import IndexedDataset


def blobs(n: int = 48, d: int = 6, classes: int = 3, seed: int = 0, flip: float = 0.0, dtype=torch.float32):
    """Gaussian class clusters; ``flip`` of the labels flipped (returns x, y, flipped mask)."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.5 * torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, d, generator=g)
    flipped = torch.zeros(n, dtype=torch.bool)
    if flip:
        idx = torch.randperm(n, generator=g)[: int(flip * n)]
        y = y.clone()
        y[idx] = (y[idx] + 1 + torch.randint(0, classes - 1, (len(idx),), generator=g)) % classes
        flipped[idx] = True
    return x.to(dtype), y, flipped


class TinyClassifier(LightningModule):
    """MLP d → h → classes with the ``per_example_loss`` / ``per_example_margin`` conventions."""

    def __init__(self, d: int = 6, hidden: int = 12, classes: int = 3, lr: float = 0.1, decay_lr: bool = False,
                 nan_ids: tuple[int, ...] = ()):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.lr = lr
        self.decay_lr = decay_lr
        self.nan_ids = nan_ids

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        loss = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        if self.nan_ids:
            bad = sum(batch["index"] == i for i in self.nan_ids).bool()
            scale = torch.where(bad, float("nan"), 1.0)  # a constant: NaN gradients for these ids only
            loss = loss * scale
        return loss

    def per_example_margin(self, batch):
        return classification_margin(self(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.decay_lr:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.5 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(x, y, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size, shuffle=shuffle)


def full_batch(x, y) -> dict:
    return {"x": x, "y": y, "index": torch.arange(len(y))}


# The per-example gradient reference lives in tests/exact_refs.py (shared by every test package).
loop_grads = exact_refs.loop_grads
