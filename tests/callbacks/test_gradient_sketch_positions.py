"""GradientSketch on a nanoGPT-style LM whose position embedding is ``wpe(arange(T))`` (and Hugging
Face's ``[1, T]`` ids), T = B: rows in both modes equal the per-example loop reference, and an
Attributor over the run scores queries of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.data import IndexedDataset
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

T = B = 4  # T = B: 1-D position ids of length B


class PosLM(LightningModule):
    def __init__(self, form="arange", vocab=7, d=6):
        super().__init__()
        self.form = form
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh())
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos if self.form == "arange" else pos[None])
        return self.head(x + self.mlp(x))

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]).transpose(1, 2), batch["y"], reduction="none").mean(1)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 7, (n, T), generator=g)


def _loader():
    x, y = _data()
    return DataLoader(IndexedDataset(TensorDataset(x, y), names=("x", "y")), batch_size=B)


def _loop(module, x, y, layout):
    own = dict(module.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = module.per_example_loss({"x": x[i : i + 1], "y": y[i : i + 1]}).sum()
        rows.append(layout.flatten(list(torch.autograd.grad(loss, [own[n] for n in layout.names]))))
    return torch.stack(rows)


def _rows(path, name):
    store = SketchStore.open(path)
    ids, vecs = store.ids(name), np.asarray(store.vectors(name))
    return torch.from_numpy(vecs[np.argsort(ids)])


class Params(Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _fit(tmp_path, module, callbacks):
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=callbacks, max_epochs=1)
    trainer.fit(module, _loader())


@pytest.mark.parametrize("form", ["arange", "hf"])
def test_position_embedding_rows_both_modes_and_attributor(tmp_path, form):
    seed_everything(0)
    module, rec = PosLM(form), Params()
    ck = GradientSketch(dirpath=str(tmp_path / "ck"), sketch_kind="dense", sketch_dim=30, mode="checkpoint")
    inl = GradientSketch(dirpath=str(tmp_path / "in"), sketch_kind="dense", sketch_dim=30, mode="inline")
    _fit(tmp_path, module, [rec, ck, inl])
    layout = ParamLayout.from_module(module)
    x, y = _data()
    module.eval()
    sketch = make(**SketchStore.open(tmp_path / "ck" / "store").spec)
    want = sketch.apply(_loop(module, x, y, layout))
    got = _rows(tmp_path / "ck" / "store", SketchStore.open(tmp_path / "ck" / "store").checkpoints[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    ref = PosLM(form)  # inline: each batch at the weights its step started from, times lr = 0.1
    inline = make(**SketchStore.open(tmp_path / "in" / "store").spec)
    parts = []
    for step, params in enumerate(rec.params):
        ref.load_state_dict(params, strict=False)
        sl = slice(step * B, (step + 1) * B)
        parts.append(0.1 * inline.apply(_loop(ref, x[sl], y[sl], layout)))
    got = _rows(tmp_path / "in" / "store", "epoch-0")
    torch.testing.assert_close(got, torch.cat(parts), rtol=1e-5, atol=1e-6)

    att = Attributor(str(tmp_path / "ck"), module, method="grad_dot")
    scores = att.scores({"x": x[:3], "y": y[:3]})
    assert scores.shape == (3, len(x)) and bool(torch.isfinite(scores).all())
