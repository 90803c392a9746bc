"""Shared attribution benchmark tasks: data splits, Lightning modules, runs and cached LDS ground truth.

Two tasks on sklearn's 8×8 digits (no download), each a fixed permutation split into 1000 train /
200 queries / 200 validation rows (validation only tunes hyper-parameters such as damping λ):

- ``digits_mlp`` (task 1, the protocol of ``attribution_digits.py``): MLP 64→128→10, split seed 0.
- ``digits_cnn`` (task 2, another architecture): Conv2d(1,8,3,pad 1)–ReLU–Conv2d(8,16,3)–ReLU–
  flatten–Linear(576,10) on the images (7,138 parameters; the 16/32-channel variant was 6× slower
  to retrain under vmap on 2 cores) (inputs stay flat [B, 64] and are unflattened by the net, so
  every peer sees the same tensors), split seed 1. No BatchNorm, so the retraining runs under ``vmap``.

Both: SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch 64, 20 epochs. LDS ground truth: 100
random half subsets × 2 seeds, trained with :func:`lightning_sketch.evaluation.subset_retraining`,
output = the classification margin, for the query AND the validation split; cached under
``benchmarks/.cache/gt_<task>_<hash>.npz``, the hash covering the whole configuration.

Stable API (imported by other benchmark scripts):

- ``TASKS`` (name -> :class:`Task`), ``get_task(name)``
- ``splits(task, flip=0.0) -> Splits(train, query, val, flipped)``, each split an ``(X, y)`` pair
- ``make_net(task, seed) -> nn.Module`` (plain PyTorch), ``lightning_module(task, seed)`` (has ``.net``,
  ``per_example_loss(batch)``, ``per_example_margin(batch)``; batches are dicts {"x", "y", "index"})
- ``dict_batch(x, y, ids=None)``
- ``fit_runs(task, n_runs, out_dir, callback_kwargs=None, sketch_dim=1024, callback=True, reuse=False)
  -> list[(run_dir, module)]``: run ``r`` uses seed ``r`` and
  ``GradientSketch(dirpath=out_dir/f"run{r}", sketch_kind="affd", sketch_dim=sketch_dim, **callback_kwargs)``
- ``ground_truth(task, n_subsets=None, n_seeds=None) -> GroundTruth(masks [S, 1000] bool,
  query_outputs [S, 200], val_outputs [S, 200], seconds, path)``
- ``lds_ci(scores, masks, outputs, n_boot=1000, seed=0) -> (mean, lo, hi)``
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent
# ATTR_BENCH_CACHE points another checkout at an existing cache (ground truths are content-keyed).
CACHE = Path(os.environ.get("ATTR_BENCH_CACHE", ROOT / ".cache"))

__all__ = [
    "CACHE",
    "TASKS",
    "GroundTruth",
    "Splits",
    "Task",
    "dict_batch",
    "fit_runs",
    "get_task",
    "ground_truth",
    "lds_ci",
    "lightning_module",
    "make_net",
    "splits",
]


@dataclass(frozen=True)
class Task:
    """One attribution benchmark: data split, architecture and training schedule."""

    name: str
    arch: str  # "mlp" or "cnn"
    split_seed: int
    n_train: int = 1000
    n_query: int = 200
    n_val: int = 200
    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    n_subsets: int = 100
    n_seeds: int = 2
    fraction: float = 0.5


TASKS: dict[str, Task] = {
    "digits_mlp": Task("digits_mlp", "mlp", split_seed=0),
    "digits_cnn": Task("digits_cnn", "cnn", split_seed=1),
}


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task]


class Splits(NamedTuple):
    train: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    flipped: Tensor  # [n_train] bool


def splits(task: str | Task, flip: float = 0.0) -> Splits:
    """Fixed permutation (``task.split_seed``) of sklearn digits; ``flip`` = fraction of train labels corrupted."""
    from sklearn.datasets import load_digits

    t = get_task(task)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(t.split_seed).permutation(len(y)))
    a, b, c = t.n_train, t.n_train + t.n_query, t.n_train + t.n_query + t.n_val
    tr, q, va = perm[:a], perm[a:b], perm[b:c]
    ytr = y[tr].clone()
    flipped = torch.zeros(t.n_train, dtype=torch.bool)
    if flip:
        g = torch.Generator().manual_seed(t.split_seed + 1)
        idx = torch.randperm(t.n_train, generator=g)[: int(flip * t.n_train)]
        ytr[idx] = (ytr[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
        flipped[idx] = True
    return Splits((X[tr], ytr), (X[q], y[q]), (X[va], y[va]), flipped)


def make_net(task: str | Task, seed: int) -> nn.Module:
    """The task's plain PyTorch network, initialised under ``torch.manual_seed(seed)``; input [B, 64]."""
    t = get_task(task)
    torch.manual_seed(seed)
    if t.arch == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if t.arch == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 6 * 6, 10),
        )
    raise ValueError(f"unknown arch {t.arch!r}")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    from lightning_sketch.attribution import classification_margin

    return classification_margin(logits, y)


def lightning_module(task: str | Task, seed: int):
    """A LightningModule around :func:`make_net` with the task's SGD, per-example loss and margin."""
    from lightning.pytorch import LightningModule

    t = get_task(task)

    class DigitsModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(t, seed)

        def forward(self, x):
            return self.net(x)

        def per_example_loss(self, batch):
            return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

        def per_example_margin(self, batch):
            return margin(self(batch["x"]), batch["y"])

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    return DigitsModule()


def dict_batch(x: Tensor, y: Tensor, ids: Tensor | None = None) -> dict[str, Tensor]:
    return {"x": x, "y": y, "index": torch.arange(len(y)) if ids is None else ids}


# ---------------------------------------------------------------------- Lightning runs
def fit_one(task: str | Task, seed: int, train: tuple[Tensor, Tensor], root: Path, callback_kw: dict | None,
            progress: bool = False):
    """One Lightning run on ``train``; ``callback_kw=None`` trains without the callback. (module, seconds)."""
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sketch.callbacks import GradientSketch
    from lightning_sketch.data import IndexedDataset

    t = get_task(task)
    seed_everything(seed, verbose=False)
    module = lightning_module(t, seed)
    loader = DataLoader(IndexedDataset(TensorDataset(*train)), batch_size=t.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    cbs = [GradientSketch(dirpath=str(root), **callback_kw)] if callback_kw is not None else []
    trainer = Trainer(max_epochs=t.epochs, logger=False, enable_progress_bar=progress, enable_checkpointing=False,
                      enable_model_summary=False, deterministic=True, default_root_dir=str(root), accelerator="cpu",
                      callbacks=cbs)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return module, time.perf_counter() - t0


def fit_runs(
    task: str | Task,
    n_runs: int,
    out_dir: str | Path,
    callback_kwargs: dict[str, Any] | None = None,
    sketch_dim: int = 1024,
    callback: bool = True,
    reuse: bool = False,
    train: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[Path, Any]]:
    """Train ``n_runs`` Lightning runs (seeds 0..n_runs-1) on the task's training split.

    Run ``r`` writes ``out_dir/run{r}`` with ``GradientSketch(dirpath=..., sketch_kind="affd",
    sketch_dim=sketch_dim, **callback_kwargs)`` (``callback_kwargs`` may override the kind).
    ``callback=False`` trains without the callback (bit-identical weights). With ``reuse=True`` a run
    directory holding a ``fit.json`` of the same configuration is loaded instead of retrained (its
    ``module.pt`` state dict is read with ``weights_only=True``). Returns ``[(run_dir, module in eval mode)]``.
    """
    t = get_task(task)
    train = splits(t).train if train is None else train
    out_dir = Path(out_dir)
    kw = {"sketch_kind": "affd", "sketch_dim": sketch_dim, **(callback_kwargs or {})} if callback else None
    runs = []
    for r in range(n_runs):
        run_dir = out_dir / f"run{r}"
        cfg = {"task": asdict(t), "seed": r, "callback": kw, "xsum": float(train[0].sum()),
               "ysum": int(train[1].sum())}
        meta = run_dir / "fit.json"
        if reuse and meta.exists() and (run_dir / "module.pt").exists():
            try:
                same = json.loads(meta.read_text()).get("config") == json.loads(json.dumps(cfg))
            except (OSError, ValueError):
                same = False
            if same:
                module = lightning_module(t, r)
                module.load_state_dict(torch.load(run_dir / "module.pt", weights_only=True))
                runs.append((run_dir, module.eval()))
                continue
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        module, secs = fit_one(t, r, train, run_dir, kw)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), run_dir / "module.pt")
        meta.write_text(json.dumps({"config": cfg, "fit_seconds": secs}, indent=1))
        runs.append((run_dir, module.eval()))
    return runs


# ---------------------------------------------------------------------- ground truth
class GroundTruth(NamedTuple):
    masks: Tensor  # [S, T] bool
    query_outputs: Tensor  # [S, Q] margins of the query split, averaged over seeds
    val_outputs: Tensor  # [S, V] margins of the validation split
    seconds: float  # 0.0 when read from the cache
    path: Path


def ground_truth(task: str | Task, n_subsets: int | None = None, n_seeds: int | None = None,
                 epochs: int | None = None, threads: int | None = None) -> GroundTruth:
    """The task's retraining ground truth, computed once and cached under ``benchmarks/.cache``."""
    from lightning_sketch.evaluation import subset_retraining

    t = get_task(task)
    t = replace(t, n_subsets=n_subsets or t.n_subsets, n_seeds=n_seeds or t.n_seeds, epochs=epochs or t.epochs)
    sp = splits(t)
    cfg = {"v": 3, "task": asdict(t), "xsum": float(sp.train[0].sum()), "qsum": float(sp.query[0].sum()),
           "vsum": float(sp.val[0].sum()), "retraining": "lightning_sketch.evaluation.subset_retraining seed 0"}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"gt_{t.name}_{key}.npz"
    S, T, Q, V = t.n_subsets, t.n_train, t.n_query, t.n_val
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                masks, qo, vo = (torch.from_numpy(data[k].copy()) for k in ("masks", "query_outputs", "val_outputs"))
            if (masks.shape == (S, T) and qo.shape == (S, Q) and vo.shape == (S, V) and masks.dtype == torch.bool
                    and bool(torch.isfinite(qo).all()) and bool(torch.isfinite(vo).all())):
                return GroundTruth(masks, qo, vo, 0.0, path)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or tampered cache: recompute below
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        both = (torch.cat([sp.query[0], sp.val[0]]), torch.cat([sp.query[1], sp.val[1]]))
        gt = subset_retraining(
            lambda s: make_net(t, s), sp.train, both, output_fn=margin, n_subsets=S, n_seeds=t.n_seeds,
            fraction=t.fraction, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, momentum=t.momentum,
            weight_decay=t.weight_decay, seed=0,
        )
    finally:
        torch.set_num_threads(prev)
    secs = time.perf_counter() - t0
    qo, vo = gt.outputs[:, :Q].float(), gt.outputs[:, Q:].float()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, masks=gt.masks.numpy(), query_outputs=qo.numpy(), val_outputs=vo.numpy())
    tmp.replace(path)
    return GroundTruth(gt.masks, qo, vo, secs, path)


def lds_ci(scores: Tensor, masks: Tensor, outputs: Tensor, n_boot: int = 1000, seed: int = 0):
    """Mean LDS over queries and a bootstrap 95% interval (queries resampled): (mean, lo, hi)."""
    from lightning_sketch.evaluation import lds

    per_q = lds(scores, masks, outputs, reduction="none").numpy()
    per_q = per_q[np.isfinite(per_q)]
    if n_boot <= 1:
        return float(per_q.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = [per_q[rng.integers(0, len(per_q), len(per_q))].mean() for _ in range(n_boot)]
    return float(per_q.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
