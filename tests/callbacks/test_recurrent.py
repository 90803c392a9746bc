"""GradientSketch on recurrent layers (GRU, LSTM; batch-first or not), both modes: stored rows against
per-example gradients taken by a plain loop of ``torch.autograd.grad``, one example at a time."""

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
from lightning_sketch.exceptions import UnsupportedModelError
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentClassifier(LightningModule):
    """Embedding -> GRU/LSTM (initial state from a Linear of the mean embedding) -> Linear head."""

    def __init__(self, cell: str = "gru", batch_first: bool = True):
        super().__init__()
        self.cell, self.batch_first = cell, batch_first
        self.emb = nn.Embedding(11, 5)
        self.init = nn.Linear(5, 6)
        self.rnn = CELLS[cell](5, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.emb(tokens)  # [B, T, 5]
        h0 = torch.tanh(self.init(h.mean(1))).unsqueeze(0)  # [1, B, 6]
        state = (h0, torch.zeros_like(h0)) if self.cell == "lstm" else h0
        out = self.rnn(h if self.batch_first else h.transpose(0, 1), state)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class StepRecorder(Callback):
    """The parameters, lr and batch each optimizer step starts from."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.steps.append((params, lr, {k: v.clone() for k, v in batch.items()}))


def _data(n=12):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 11, (n, 7), generator=g), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(module, batch, layout):
    """Per-example gradients: one forward and one ``torch.autograd.grad`` per example."""
    own = dict(module.named_parameters())
    rows = []
    for b in range(len(batch["y"])):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(module.per_example_loss(one).sum(), [own[n] for n in layout.names])
        rows.append(layout.flatten(list(grads)))
    return torch.stack(rows)


def _stored(path, name):
    store = SketchStore.open(path)
    return {int(i): torch.from_numpy(np.array(v)) for i, v in zip(store.ids(name), store.vectors(name))}


@pytest.mark.parametrize("mode", ["checkpoint", "inline"])
@pytest.mark.parametrize(("cell", "batch_first"),
                         [("gru", True), ("gru", False), ("lstm", True), ("lstm", False)])
def test_recurrent_rows_equal_loop_gradients(tmp_path, cell, batch_first, mode):
    seed_everything(0)
    x, y = _data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y), names=("x", "y")), batch_size=4)
    module = RecurrentClassifier(cell, batch_first)
    rec = StepRecorder()
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="dense", sketch_dim=24, seed=3, mode=mode,
                        curvature="none")
    with pytest.warns(UserWarning, match=rf"torch.func fallback.*rnn \({cell.upper()}\)"):  # said at setup
        Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, accelerator="cpu", callbacks=[rec, cb],
                default_root_dir=tmp_path).fit(module, loader)
    assert cb.support.fallback == {"rnn": cell.upper()} and not cb.support.unsupported
    layout = ParamLayout.from_module(module)
    sketch = make(**SketchStore.open(tmp_path / "run" / "store").spec)
    ref = RecurrentClassifier(cell, batch_first)
    if mode == "checkpoint":  # the last slice: the final weights, eval mode
        got = _stored(tmp_path / "run" / "store", "step-6")
        ref.load_state_dict(module.state_dict())
        ref.eval()
        full = {"x": x, "y": y}
        want = sketch.apply(_loop_grads(ref, full, layout).double()).float()
        torch.testing.assert_close(torch.stack([got[i] for i in range(len(y))]), want, rtol=1e-5, atol=1e-6)
        Attributor(tmp_path / "run", module, method="tracin")  # its probe check recomputes the rows too
        return
    got = {**_stored(tmp_path / "run" / "store", "epoch-0"), **{
        (1, i): v for i, v in _stored(tmp_path / "run" / "store", "epoch-1").items()}}
    for step, (params, lr, batch) in enumerate(rec.steps):  # inline: the step's weights, train mode
        ref.load_state_dict(params, strict=False)
        want = lr * sketch.apply(_loop_grads(ref.train(), batch, layout).double()).float()
        for j, i in enumerate(batch["index"].tolist()):
            key = i if step < 3 else (1, i)
            torch.testing.assert_close(got[key], want[j], rtol=1e-5, atol=1e-6)


class Packed(RecurrentClassifier):
    """Packs its (equal-length) sequences before the LSTM, which the per-example loop cannot split."""

    def forward(self, tokens):
        h = self.emb(tokens)
        lengths = torch.full((h.shape[0],), h.shape[1], dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True)
        return self.head(self.rnn(packed)[1][0][-1])


def test_packed_sequences_are_refused_before_training(tmp_path):
    seed_everything(0)
    x, y = _data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y), names=("x", "y")), batch_size=4)
    module = Packed("lstm", batch_first=True)
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="dense", sketch_dim=8, curvature="none")
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, accelerator="cpu", callbacks=[cb],
                      default_root_dir=tmp_path)
    refused = r"(?s)PackedSequence.*Pad the sequences.*exclude=\['rnn.weight_ih_l0'"
    with pytest.warns(UserWarning, match="fallback"), pytest.raises(UnsupportedModelError, match=refused):
        trainer.fit(module, loader)
    assert trainer.global_step == 0  # refused at the start of fit, not after an epoch
