"""GradientSketch on a model whose layers are not all batch-first (a learned [T, C] table through a
Linear, added to every example), T = B so that no shape betrays it: the start check against
autograd sends both modes and the Attributor's queries to torch.func, so every row equals the
per-example loop reference, with one warning per fit."""

from __future__ import annotations

import warnings

import torch
from exact_refs import loop_grads
from lightning.pytorch import LightningModule, Trainer, seed_everything
from test_gradient_sketch_positions import Params, _rows  # the same row reader and weight recorder
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.data import IndexedDataset
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

T = B = 4
C = 6


class TableModel(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, C)
        self.table = nn.Parameter(torch.randn(T, C))
        self.posproj = nn.Linear(C, C)  # sees [T, C]: not batch-first
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.posproj(self.table)).mean(1))

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, T, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loop(module, x, y, layout):
    return loop_grads(module, lambda m, b: m.per_example_loss(b), {"x": x, "y": y}, layout)


def test_rows_of_both_modes_and_the_queries_are_exact(tmp_path):
    seed_everything(0)
    module, rec = TableModel(), Params()
    ck = GradientSketch(dirpath=str(tmp_path / "ck"), sketch_kind="dense", sketch_dim=30)
    inl = GradientSketch(dirpath=str(tmp_path / "in"), sketch_kind="dense", sketch_dim=30, mode="inline")
    x, y = _data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y), names=("x", "y")), batch_size=B)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=[rec, ck, inl], max_epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    ours = [str(w.message) for w in seen if "hook paths cannot" in str(w.message)]
    assert len(ours) == 2, ours  # one per callback, not one per slice or per step
    assert ck._hooks_exact is False and inl._hooks_exact is False

    layout = ParamLayout.from_module(module)
    module.eval()
    store = SketchStore.open(tmp_path / "ck" / "store")
    sketch = make(**store.spec)
    want = sketch.apply(_loop(module, x, y, layout))
    torch.testing.assert_close(_rows(tmp_path / "ck" / "store", store.checkpoints[-1]), want,
                               rtol=1e-5, atol=1e-6)

    ref = TableModel()  # inline: each batch at the weights its step started from, times lr = 0.1
    inline = make(**SketchStore.open(tmp_path / "in" / "store").spec)
    for epoch in (0, 1):
        parts = []
        for step in range(2):
            ref.load_state_dict(rec.params[2 * epoch + step], strict=False)
            sl = slice(step * B, (step + 1) * B)
            parts.append(0.1 * inline.apply(_loop(ref, x[sl], y[sl], layout)))
        torch.testing.assert_close(_rows(tmp_path / "in" / "store", f"epoch-{epoch}"), torch.cat(parts),
                                   rtol=1e-5, atol=1e-6)

    att = Attributor(str(tmp_path / "ck"), module, method="grad_dot")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q = att.query_sketches({"x": x[:B], "y": y[:B]})
        att.query_sketches({"x": x[B:], "y": y[B:]})
    assert len([w for w in seen if "hook paths cannot" in str(w.message)]) <= 1
    for name, rows in zip(att.checkpoints, q):
        saved = store.load_weights(name)
        assert set(layout.names) <= set(saved)
        ref.load_state_dict(saved, strict=False)
        ref.eval()
        torch.testing.assert_close(rows.float(), sketch.apply(_loop(ref, x[:B], y[:B], layout)),
                                   rtol=1e-4, atol=1e-6)
