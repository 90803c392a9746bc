"""Tiny model, data and trainer factory shared by the reliability scripts and tests.

Everything here is deterministic: data come from fixed seeds, the model from ``torch.manual_seed``
inside its constructor, so a subprocess and the pytest process build bit-identical objects.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_sketch.data import IndexedDataset

HERE = Path(__file__).resolve().parent
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
           "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def blobs(n: int, seed: int, d: int = 6, classes: int = 3, dtype: torch.dtype = torch.float32):
    """Gaussian class clusters (fixed centres) with labels ``i % classes``: ``x [n, d]``, ``y [n]``."""
    centers = 2.5 * torch.randn(classes, d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, d, generator=g)
    return x.to(dtype), y


def dataset(n: int = 32, seed: int = 1, dtype: torch.dtype = torch.float32) -> IndexedDataset:
    """Dict items ``{"x", "y", "index"}`` (the id is the position in the dataset)."""
    return IndexedDataset(TensorDataset(*blobs(n, seed, dtype=dtype)))


def loader(n: int = 32, batch_size: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32) -> DataLoader:
    return DataLoader(dataset(n, seed, dtype), batch_size=batch_size, shuffle=False)


class Data(LightningDataModule):
    """Train/val loaders in dataset order; under DDP rank r gets ids r, r+W, r+2W, ... (no shuffling).

    Lightning always shuffles the ``DistributedSampler`` it injects for training, so DDP runs use
    ``use_distributed_sampler=False`` with this module: both a 1-process run with batch ``B·W`` and a
    W-rank run with batch ``B`` then train on the same examples at every step.
    """

    def __init__(self, n_train: int = 32, n_val: int = 16, global_batch: int = 8,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.n_train, self.n_val, self.global_batch, self.dtype = n_train, n_val, global_batch, dtype

    def _loader(self, ds) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return DataLoader(ds, batch_size=self.global_batch, shuffle=False)
        sampler = DistributedSampler(ds, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self.global_batch // world, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(dataset(self.n_train, 1, self.dtype))

    def val_dataloader(self) -> DataLoader:
        return self._loader(dataset(self.n_val, 2, self.dtype))


class Tiny(LightningModule):
    """MLP 6 -> 12 -> 3 (N = 123) with the ``per_example_loss`` convention and a ``val_acc`` metric."""

    def __init__(self, lr: float = 0.1, dtype: torch.dtype = torch.float32, nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
        self.lr = lr
        self.nan_at_step = nan_at_step

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        if self.nan_at_step is not None and self.trainer.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch, batch_idx):
        acc = (self(batch["x"]).argmax(-1) == batch["y"]).to(self.net[0].weight.dtype).mean()
        self.log("val_acc", acc, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(root: str | os.PathLike, callbacks: list, **kw: Any) -> Trainer:
    """The house test Trainer (CPU, deterministic, no logger/progress bar/checkpointing by default)."""
    args: dict[str, Any] = dict(
        logger=False, enable_progress_bar=False, enable_checkpointing=False, deterministic=True,
        default_root_dir=str(root), accelerator="cpu", enable_model_summary=False, callbacks=callbacks,
    )
    args.update(kw)
    return Trainer(**args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without distributed variables, plus ``extra`` (for script subprocesses)."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}, **extra)
    return env


def two_rank_run_beside(script_args: list[str], out: Path, reference: Any, what: str,
                        timeout_s: float = 240) -> tuple[list[dict[str, Any]], Any, str]:
    """Start ``script_args`` (a 2-rank job writing ``out/rank{0,1}.json``) in a subprocess, run
    ``reference()`` (the single-process run) here meanwhile, and return the two ranks' documents,
    the reference's result and the job's output. Fails the test (never hangs) after ``timeout_s``."""
    import json
    import subprocess
    import sys

    import pytest

    proc = subprocess.Popen([sys.executable, *script_args],
                            env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    try:
        single = reference()
    finally:
        torch.set_num_threads(threads)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"the {what} run did not finish within {timeout_s} s:\n{text[-4000:]}")
    assert proc.returncode == 0, f"the {what} run failed:\n{text[-4000:]}"
    docs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["rank"] for d in docs] == [0, 1] and docs[0]["world"] == 2
    return docs, single, text


def sorted_rows(store: Any, name: str) -> tuple[Any, Any]:
    """``(ids, rows)`` of a store's slice ``name``, ordered by id (numpy arrays)."""
    import numpy as np

    ids, vecs = store.ids(name), np.asarray(store.vectors(name))
    order = np.argsort(ids)
    return ids[order], vecs[order]
