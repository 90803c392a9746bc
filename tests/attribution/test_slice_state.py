"""Slice state: a run saves buffers (BatchNorm statistics) with the parameters, the Attributor
restores them, and a probe of stored training examples tells a model that does not reproduce the run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.callbacks import _gradient_sketch_slices as slices_mod
from lightning_sketch.data import IndexedDataset
from lightning_sketch.exceptions import LayoutMismatchError, SliceMismatchError
from lightning_sketch.store import SketchStore


class BNNet(LightningModule):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Linear, with an optional frozen output scale."""

    def __init__(self, frozen_scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.scale = nn.Parameter(torch.full((3,), frozen_scale), requires_grad=False)

    def forward(self, x):
        return self.scale * self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(n, 1, 4, 4, generator=g) + 1, torch.randint(0, 3, (n,), generator=g)


def _fit(tmp_path, epochs=3):
    seed_everything(0)
    x, y = _data()
    loader = DataLoader(IndexedDataset(TensorDataset(x, y), names=("x", "y")), batch_size=8)
    model = BNNet()
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=48, curvature="none")
    Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, accelerator="cpu", callbacks=[cb],
            default_root_dir=tmp_path).fit(model, loader)
    return model, {"x": x, "y": y, "index": torch.arange(len(y))}


def _rel_errors(att, batch):
    store = SketchStore.open(att.runs[0].root / "store")
    out = {}
    for name, q in zip(att.checkpoints, att.query_sketches(batch)):
        ids = torch.as_tensor(store.ids(name))
        rows = torch.from_numpy(np.asarray(store.vectors(name), dtype=np.float64))
        out[name] = ((q[ids] - rows).norm(dim=1) / rows.norm(dim=1)).max().item()
    return out


def _loss(module, batch):
    return module.per_example_loss(batch)


def test_batchnorm_slices_are_recomputed_exactly(tmp_path):
    model, batch = _fit(tmp_path)
    saved = torch.load(tmp_path / "run" / "weights" / "step-3.pt", weights_only=True)
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(saved)
    assert "scale" not in saved  # frozen: training never changes it
    probe = torch.load(tmp_path / "run" / "weights" / "probe.pt", weights_only=True)
    assert probe["ids"].tolist() == [0, 1, 2, 3] and probe["batch.dict.x"].shape == (4, 1, 4, 4)
    # the statistics moved between slices, so restoring them matters
    last = torch.load(tmp_path / "run" / "weights" / "step-9.pt", weights_only=True)
    assert not torch.allclose(saved["bn.running_mean"], last["bn.running_mean"])
    att = Attributor(tmp_path / "run", model, method="tracin", query_loss_fn=_loss)
    errors = _rel_errors(att, batch)
    assert list(errors) == ["step-3", "step-6", "step-9"]
    assert max(errors.values()) <= 1e-4, errors
    # the model's own state is left as it was
    torch.testing.assert_close(model.bn.running_mean, last["bn.running_mean"])


def test_model_that_does_not_reproduce_the_run_is_refused(tmp_path):
    model, _ = _fit(tmp_path, epochs=2)
    with pytest.raises(SliceMismatchError, match=r"(?s)step-3.*model the run was trained with.*verify=False"):
        Attributor(tmp_path / "run", BNNet(frozen_scale=2.0), method="tracin")  # another frozen weight
    assert issubclass(SliceMismatchError, LayoutMismatchError)
    Attributor(tmp_path / "run", BNNet(frozen_scale=2.0), method="tracin", verify=False)  # the user's call
    # parameters without the BatchNorm statistics (what runs used to save), in a fresh model: refused
    params_only = tmp_path / "params_only"
    params_only.mkdir()
    for name in ("step-3", "step-6"):
        saved = torch.load(tmp_path / "run" / "weights" / f"{name}.pt", weights_only=True)
        torch.save({k: v for k, v in saved.items() if not k.startswith("bn.running")
                    and k != "bn.num_batches_tracked"}, params_only / f"{name}.pt")
    with pytest.raises(SliceMismatchError, match="relative error"):
        Attributor(tmp_path / "run", BNNet(), method="tracin", weights_dir=params_only)
    Attributor(tmp_path / "run", model, method="tracin")  # the trained model passes


def test_runs_without_probe_open_with_one_info_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(slices_mod, "_probe_batch", lambda batch, ids: None)  # as runs written before probes
    model, batch = _fit(tmp_path, epochs=2)
    assert not (tmp_path / "run" / "weights" / "probe.pt").exists()
    with caplog.at_level(logging.INFO, logger="lightning_sketch.attribution"):
        att = Attributor(tmp_path / "run", BNNet(frozen_scale=2.0), method="tracin")
    lines = [r for r in caplog.records if "not verified" in r.getMessage()]
    assert len(lines) == 1 and "probe" in lines[0].getMessage()
    assert att.checkpoints == ["step-3", "step-6"]
