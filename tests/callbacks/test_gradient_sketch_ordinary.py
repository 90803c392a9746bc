"""A Lightning module written the ordinary way: no ``per_example_loss``, a plain ``TensorDataset``
of (x, y) tuples without ids, shuffled, ``nn.CrossEntropyLoss`` and a torchmetrics metric logged in
``training_step``. ``GradientSketch(dirpath=...)`` alone must store exact rows under the examples'
positions in the dataset, leave training bit-for-bit unchanged, and ``Attributor(run, model)``
must answer with the margin kernel it recognises."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

N_TRAIN, D, C = 40, 5, 3


class Ordinary(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, C))
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=C)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, D, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _fit(tmp_path, callbacks):
    seed_everything(0)
    x, y = _data()
    model = Ordinary()
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=callbacks, max_epochs=2)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    return model, trainer


def test_ordinary_module_sketched_and_queried(tmp_path):
    plain, plain_trainer = _fit(tmp_path / "plain", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model, trainer = _fit(tmp_path, [GradientSketch(dirpath=str(tmp_path / "run"))])
    ours = [str(w.message) for w in seen if "lightning_sketch" in str(w.filename)]
    assert not ours, ours  # the default D meets a small model silently (D = N)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)  # training untouched: RNG, dropout, metrics, optimizer
    for key in ("train_acc", "train_loss"):  # the replays neither logged nor updated the metric
        assert float(trainer.callback_metrics[key]) == float(plain_trainer.callback_metrics[key])

    store = SketchStore.open(tmp_path / "run" / "store")
    x, y = _data()
    last = store.checkpoints[-1]
    ids = store.ids(last)
    assert sorted(ids.tolist()) == list(range(N_TRAIN))  # positions in the dataset
    rows = torch.from_numpy(np.asarray(store.vectors(last))[np.argsort(ids)])
    layout = ParamLayout.from_module(model)
    own = dict(model.named_parameters())
    model.eval()
    exact = torch.stack([layout.flatten(list(torch.autograd.grad(
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [own[n] for n in layout.names])))
        for i in range(N_TRAIN)])
    torch.testing.assert_close(rows, make(**store.spec).apply(exact), rtol=1e-5, atol=1e-6)

    att = Attributor(str(tmp_path / "run"), model)
    top, scores = att.top_k((x[:4], y[:4]), k=3)
    assert att.kernel == "margin" and att.query_function == "margin"
    assert top.shape == (4, 3) and bool(torch.isfinite(scores).all())
    assert att.task is not None and att.task.kind == "classification"


# ----------------------------------------------------------------- losses whose torch reduction depends
# on the batch (a sum, class weights, ignored targets, sample weights): the rows must not, so that
# Attributor's check of the stored rows (a batch of its own) passes and query scores do not depend on
# the other queries.
V, L = 6, 5


class _Small(LightningModule):
    def __init__(self, loss: str):
        super().__init__()
        torch.manual_seed(0)
        self.loss = loss
        self.net = nn.Linear(D, C)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        z = self(x)
        if self.loss == "weighted":
            return F.cross_entropy(z, y, weight=torch.tensor([1.0, 3.0, 0.5]))
        if self.loss == "sum":
            return F.cross_entropy(z, y, reduction="sum")
        if self.loss == "sample_weights":
            return (F.cross_entropy(z, y, reduction="none") * w).mean()
        return F.cross_entropy(z, y.squeeze(1))  # "column": targets stored as [B, 1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _PaddedLM(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).view(-1, V), y.view(-1), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_small(tmp_path, model, data):
    seed_everything(0)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=[GradientSketch(dirpath=str(tmp_path / "run"))], max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    return Attributor(str(tmp_path / "run"), model)  # verify=True: the stored rows are checked


def test_batch_dependent_reductions_give_rows_attributor_accepts(tmp_path):
    x, y = _data()
    w = torch.rand(N_TRAIN, generator=torch.Generator().manual_seed(1))
    for loss in ("weighted", "sum", "sample_weights", "column"):
        yy = y[:, None] if loss == "column" else y
        att = _fit_small(tmp_path / loss, _Small(loss), TensorDataset(x, yy, w))
        assert att.kernel == "margin", loss
        top, scores = att.top_k((x[:4], yy[:4], w[:4]), k=3)
        assert bool(torch.isfinite(scores).all())
        assert att.task is not None and att.task.kind == "classification", loss


def test_padded_language_model_is_recognised_and_queries_do_not_depend_on_each_other(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (N_TRAIN, L), generator=g)
    y = (x + 1) % V
    for i, n in enumerate(torch.randint(1, L + 1, (N_TRAIN,), generator=g).tolist()):
        y[i, n:] = -100  # completions of different lengths
    att = _fit_small(tmp_path, _PaddedLM(), TensorDataset(x, y))
    assert att.kernel == "gauss-newton"
    together = att.scores((x[:4], y[:4]))
    alone = torch.cat([att.scores((x[i:i + 1], y[i:i + 1])) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-8)
