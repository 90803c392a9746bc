"""A suite of attribution tasks of different shapes, with retraining ground truth and cached runs.

Used by ``benchmarks/attr_suite.py``. Seven tasks (no download; sklearn data or synthetic):

==============  ===========================================  ====================  ===============================
task            data (train / query / val)                   model                 loss / measurement
==============  ===========================================  ====================  ===============================
binary_small    breast cancer, standardised, 300/100/100     MLP 30→32→1 ([B])     BCE-with-logits / (2y−1)·z
digits10        digits /16, 1000/200/200 (split seed 0)      MLP 64→128→10         CE / classification margin
regression      make_friedman1 (noise 1), std. y, 1000/200   MLP 10→64→1 ([B])     (f−y)² / −(f−y)²
large_T         make_classification 4 classes, 5000/200/200  MLP 20→64→4           CE / margin
label_noise     digits, split seed 3, 20% train labels       MLP 64→128→10         CE / margin
                flipped (``Splits.flipped``)
sequence        synthetic tokens, vocab 12, length 16        Emb(12,16)→Conv1d     CE / margin
                (class = most frequent of tokens 0/1/2, ties   (16,32,3)→ReLU→mean
                by first appearance; 10% label noise)         →Linear(32,3)
causal_lm       sparse order-1 Markov chain, vocab 16,        Emb(16,32), [e_t,     Σ token CE of the completion
                length 12, first 4 tokens = prompt (−100)     e_{t−1}]→64→ReLU→16   / Σ log-prob of the completion
==============  ===========================================  ====================  ===============================

Every task: SGD momentum 0.9, weight decay 1e-4 (lr, batch, epochs per task in :data:`TASKS`), a
buffer-free ``make_net(task, seed)`` usable by ``subset_retraining`` under vmap, a mean training
``loss_fn(outputs, targets)``, an unreduced ``per_example(outputs, targets) -> [B]`` and the
ground-truth measurement ``output_fn(outputs, targets) -> [Q]`` (sign: higher = better for the
query, the library's convention). The LightningModule is "ordinary": ``forward``,
``training_step`` (mean loss), ``configure_optimizers`` and ``per_example_loss(batch)`` only.
Batches are dicts: ``{"x", "y", "index"}``, or ``{"input_ids", "labels", "index"}`` for causal_lm.

Artefacts (content-keyed, under ``benchmarks/.cache/suite/``):

- ``ground_truth(task)``: 100 half subsets × 2 seeds (``subset_retraining``, same schedule), outputs
  on the query and the val split;
- ``fit_runs(task, n_runs)``: Lightning runs, seeds 0..n-1, ``callbacks=[GradientSketch(dirpath=run)]``
  (defaults only). The key includes a hash of ``lightning_sketch/{callbacks,attribution}/*.py``;
- ``evaluate(scores_q, scores_v, gt)``: LDS with bootstrap intervals on both splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _attr_tasks as A  # noqa: E402
from _attr_tasks import CACHE, lds_ci  # noqa: E402

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SUITE = CACHE / "suite"


@dataclass(frozen=True)
class SuiteTask:
    name: str
    kind: str  # "binary", "multiclass", "regression", "sequence", "lm"
    data: str
    n_train: int
    n_query: int
    n_val: int
    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 1e-4
    split_seed: int = 0
    flip: float = 0.0
    n_subsets: int = 100
    n_seeds: int = 2
    fraction: float = 0.5
    optimizer: str = "sgd"  # "sgd" (SGD + momentum) or "adam" (torch.optim.Adam, momentum unused)


def _key(t: SuiteTask) -> dict[str, Any]:
    """The task's fields for cache keys (the default optimizer left out: keys of SGD runs made before
    the field existed stay valid)."""
    d = asdict(t)
    if d.get("optimizer") == "sgd":
        del d["optimizer"]
    return d


def make_optimizer(t: SuiteTask, params):
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


TASKS: dict[str, SuiteTask] = {
    t.name: t
    for t in [
        SuiteTask("binary_small", "binary", "breast_cancer", 300, 100, 100, epochs=30, lr=0.05, batch_size=32),
        SuiteTask("digits10", "multiclass", "digits", 1000, 200, 200, epochs=20, lr=0.1, batch_size=64),
        SuiteTask("regression", "regression", "friedman1", 1000, 200, 200, epochs=30, lr=0.02, batch_size=64),
        SuiteTask("large_T", "multiclass", "make_classification", 5000, 200, 200, epochs=8, lr=0.1, batch_size=64),
        SuiteTask("label_noise", "multiclass", "digits", 1000, 200, 200, epochs=20, lr=0.1, batch_size=64,
                  split_seed=3, flip=0.2),
        SuiteTask("sequence", "sequence", "tokens", 1000, 200, 200, epochs=20, lr=0.1, batch_size=64),
        SuiteTask("causal_lm", "lm", "markov", 1000, 200, 200, epochs=20, lr=0.05, batch_size=64),
    ]
}


def get_task(task: str | SuiteTask) -> SuiteTask:
    if isinstance(task, SuiteTask):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task]


Splits = A.Splits  # train / query / val pairs and the flipped-label mask, as the digits benchmarks


# ---------------------------------------------------------------------- data
SEQ_VOCAB, SEQ_LEN, SEQ_CLASSES = 12, 16, 3
LM_VOCAB, LM_LEN, LM_PROMPT = 16, 12, 4


def _sequence_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens uniform over 12; class = the most frequent of tokens 0/1/2, ties broken by first appearance."""
    g = np.random.RandomState(seed)
    X = np.zeros((n, SEQ_LEN), dtype=np.int64)
    y = np.zeros(n, dtype=np.int64)
    i = 0
    while i < n:
        s = g.randint(0, SEQ_VOCAB, SEQ_LEN)
        counts = np.array([(s == k).sum() for k in range(SEQ_CLASSES)])
        if counts.max() == 0:
            continue
        first = [int(np.argmax(s == k)) if counts[k] else SEQ_LEN for k in range(SEQ_CLASSES)]
        cands = [k for k in range(SEQ_CLASSES) if counts[k] == counts.max()]
        X[i], y[i] = s, min(cands, key=lambda k: first[k])
        i += 1
    noisy = g.rand(n) < 0.10
    y[noisy] = (y[noisy] + g.randint(1, SEQ_CLASSES, noisy.sum())) % SEQ_CLASSES
    return torch.from_numpy(X), torch.from_numpy(y)


def markov_chain(seed: int = 0) -> np.ndarray:
    """A sparse order-1 transition matrix [V, V]: each token has 3 successors with Dirichlet(1) weights."""
    g = np.random.RandomState(seed)
    P = np.zeros((LM_VOCAB, LM_VOCAB))
    for a in range(LM_VOCAB):
        nxt = g.choice(LM_VOCAB, 3, replace=False)
        P[a, nxt] = g.dirichlet(np.ones(3))
    return P


def _lm_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    P = markov_chain(seed)
    g = np.random.RandomState(seed + 1)
    X = np.zeros((n, LM_LEN), dtype=np.int64)
    X[:, 0] = g.randint(0, LM_VOCAB, n)
    for t in range(1, LM_LEN):
        for i in range(n):
            X[i, t] = g.choice(LM_VOCAB, p=P[X[i, t - 1]])
    ids = torch.from_numpy(X)
    labels = ids.clone()
    labels[:, :LM_PROMPT] = -100
    return ids, labels


def _standardise(Xtr: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
    return [(a - mu) / sd for a in (Xtr, *others)]


def splits(task: str | SuiteTask) -> Splits:
    """The task's train / query / val tensors (fixed permutation by ``split_seed``) and flipped labels."""
    t = get_task(task)
    n = t.n_train + t.n_query + t.n_val
    if t.data == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X, y = X / 16.0, y
    elif t.data == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
    elif t.data == "friedman1":
        from sklearn.datasets import make_friedman1

        X, y = make_friedman1(n_samples=1400, noise=1.0, random_state=0)
    elif t.data == "make_classification":
        from sklearn.datasets import make_classification

        X, y = make_classification(n_samples=5400, n_features=20, n_informative=10, n_classes=4,
                                   n_clusters_per_class=2, class_sep=1.0, random_state=0)
    elif t.data == "tokens":
        X, y = _sequence_data(n, seed=0)
    elif t.data == "markov":
        X, y = _lm_data(n, seed=0)
    else:
        raise ValueError(t.data)
    perm = np.random.RandomState(t.split_seed).permutation(len(y))[:n]
    a, b = t.n_train, t.n_train + t.n_query
    tr, q, va = perm[:a], perm[a:b], perm[b:]
    if t.data in ("tokens", "markov"):
        parts = [(X[i], y[i]) for i in (torch.from_numpy(tr), torch.from_numpy(q), torch.from_numpy(va))]
    else:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        Xs = _standardise(X[tr], X[q], X[va]) if t.data != "digits" else [X[tr], X[q], X[va]]
        if t.kind == "regression":
            mu, sd = y[tr].mean(), y[tr].std()
            ys = [(y[i] - mu) / sd for i in (tr, q, va)]
            ys = [torch.tensor(v, dtype=torch.float32) for v in ys]
        elif t.kind == "binary":
            ys = [torch.tensor(y[i], dtype=torch.float32) for i in (tr, q, va)]
        else:
            ys = [torch.tensor(y[i], dtype=torch.long) for i in (tr, q, va)]
        parts = [(torch.tensor(x, dtype=torch.float32), yy) for x, yy in zip(Xs, ys)]
    flipped = torch.zeros(t.n_train, dtype=torch.bool)
    if t.flip:
        xtr, ytr = parts[0]
        ytr = ytr.clone()
        g = torch.Generator().manual_seed(t.split_seed + 1)
        idx = torch.randperm(t.n_train, generator=g)[: int(t.flip * t.n_train)]
        ytr[idx] = (ytr[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
        flipped[idx] = True
        parts[0] = (xtr, ytr)
    return Splits(parts[0], parts[1], parts[2], flipped)


# ---------------------------------------------------------------------- networks
class Squeeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)


class SeqNet(nn.Module):
    """Embedding(12, 16) → Conv1d(16, 32, 3) → ReLU → mean over time → Linear(32, 3); input long [B, L]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(SEQ_VOCAB, 16)
        self.conv = nn.Conv1d(16, 32, 3)
        self.head = nn.Linear(32, SEQ_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x).transpose(1, 2)  # [B, 16, L]
        h = F.relu(self.conv(h)).mean(-1)
        return self.head(h)


class SeqNetConv2d(nn.Module):
    """The same function as :class:`SeqNet` with the Conv1d written as a Conv2d (1×3) (kronfluence tracks Conv2d)."""

    def __init__(self, net: SeqNet):
        super().__init__()
        self.emb = nn.Embedding(SEQ_VOCAB, 16)
        self.conv = nn.Conv2d(16, 32, (1, 3))
        self.head = nn.Linear(32, SEQ_CLASSES)
        with torch.no_grad():
            self.emb.weight.copy_(net.emb.weight)
            self.conv.weight.copy_(net.conv.weight.unsqueeze(2))
            self.conv.bias.copy_(net.conv.bias)
            self.head.weight.copy_(net.head.weight)
            self.head.bias.copy_(net.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x).transpose(1, 2).unsqueeze(2)  # [B, 16, 1, L]
        h = F.relu(self.conv(h)).mean((-1, -2))
        return self.head(h)


class TinyCausalLM(nn.Module):
    """Causal by construction: token t+1 is predicted from the embeddings of tokens t and t−1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(LM_VOCAB, 32)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, LM_VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        e = self.emb(input_ids)  # [B, L, 32]
        prev = F.pad(e, (0, 0, 1, 0))[:, :-1]  # embedding of token t−1 (zeros at t = 0)
        return self.fc2(F.relu(self.fc1(torch.cat([e, prev], -1))))  # [B, L, V]


def make_net(task: str | SuiteTask, seed: int) -> nn.Module:
    t = get_task(task)
    torch.manual_seed(seed)
    if t.name == "binary_small":
        return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 1), Squeeze())
    if t.data == "digits":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if t.name == "regression":
        return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1), Squeeze())
    if t.name == "large_T":
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    if t.kind == "sequence":
        return SeqNet()
    if t.kind == "lm":
        return TinyCausalLM()
    raise ValueError(t.name)


# ---------------------------------------------------------------------- losses and measurements
def _lm_token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """[B] summed token cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring −100."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
    return nll.reshape(lb.shape).sum(1)


def per_example(task: str | SuiteTask, outputs: Tensor, targets: Tensor) -> Tensor:
    """The unreduced training loss [B]."""
    k = get_task(task).kind
    if k == "binary":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    if k == "regression":
        return (outputs - targets) ** 2
    if k == "lm":
        return _lm_token_nll(outputs, targets)
    return F.cross_entropy(outputs, targets, reduction="none")


def loss_fn(task: str | SuiteTask):
    """``(outputs, targets) -> scalar`` mean training loss (what ``training_step`` returns)."""
    t = get_task(task)
    return lambda o, y: per_example(t, o, y).mean()


def measurement(task: str | SuiteTask, outputs: Tensor, targets: Tensor) -> Tensor:
    """The ground-truth measurement [Q]: higher = better for the query."""
    from lightning_sketch.attribution import classification_margin

    k = get_task(task).kind
    if k == "binary":
        return (2 * targets - 1) * outputs
    if k == "regression":
        return -((outputs - targets) ** 2)
    if k == "lm":
        return -_lm_token_nll(outputs, targets)
    return classification_margin(outputs, targets)


def output_fn(task: str | SuiteTask):
    t = get_task(task)
    return lambda o, y: measurement(t, o, y)


def train_feature(task: str | SuiteTask, outputs: Tensor, targets: Tensor) -> Tensor:
    """TRAK's φ of a training example: the measurement, except the prediction f for regression."""
    t = get_task(task)
    return outputs if t.kind == "regression" else measurement(t, outputs, targets)


def sample_targets(task: str | SuiteTask, outputs: Tensor, targets: Tensor) -> Tensor:
    """Targets drawn from the model's predictive distribution (for kronfluence's sampled Fisher)."""
    k = get_task(task).kind
    o = outputs.detach()
    if k == "binary":
        return torch.bernoulli(torch.sigmoid(o))
    if k == "regression":  # (f − y)² = −log N(y; f, 1/2) + const
        return torch.normal(o, 0.5**0.5)
    if k == "lm":
        s = torch.multinomial(o[:, :-1].reshape(-1, o.shape[-1]).softmax(-1), 1).reshape(o.shape[0], -1)
        out = targets.clone()
        out[:, 1:] = torch.where(targets[:, 1:] != -100, s, targets[:, 1:])
        return out
    return torch.multinomial(o.softmax(-1), 1).squeeze(1)


# ---------------------------------------------------------------------- Lightning
def keys(task: str | SuiteTask) -> tuple[str, str]:
    return ("input_ids", "labels") if get_task(task).kind == "lm" else ("x", "y")


def dict_batch(task: str | SuiteTask, x: Tensor, y: Tensor, ids: Tensor | None = None) -> dict[str, Tensor]:
    kx, ky = keys(task)
    return {kx: x, ky: y, "index": torch.arange(len(y)) if ids is None else ids}


def lightning_module(task: str | SuiteTask, seed: int):
    """An ordinary LightningModule: forward, training_step, configure_optimizers, per_example_loss."""
    from lightning.pytorch import LightningModule

    t = get_task(task)
    kx, ky = keys(t)

    if t.kind == "lm":

        class LMModule(LightningModule):
            def __init__(self):
                super().__init__()
                self.net = make_net(t, seed)

            def forward(self, input_ids):
                return self.net(input_ids)

            def per_example_loss(self, batch):
                logits = self(batch["input_ids"])
                lg, lb = logits[:, :-1], batch["labels"][:, 1:]
                nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                      reduction="none")
                return nll.reshape(lb.shape).sum(1)

            def training_step(self, batch, batch_idx):
                return self.per_example_loss(batch).mean()

            def configure_optimizers(self):
                return make_optimizer(t, self.parameters())

        return LMModule()

    class TaskModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(t, seed)

        def forward(self, x):
            return self.net(x)

        def per_example_loss(self, batch):
            out = self(batch["x"])
            if t.kind == "binary":
                return F.binary_cross_entropy_with_logits(out, batch["y"], reduction="none")
            if t.kind == "regression":
                return (out - batch["y"]) ** 2
            return F.cross_entropy(out, batch["y"], reduction="none")

        def training_step(self, batch, batch_idx):
            out = self(batch["x"])
            if t.kind == "binary":
                return F.binary_cross_entropy_with_logits(out, batch["y"])
            if t.kind == "regression":
                return F.mse_loss(out, batch["y"])
            return F.cross_entropy(out, batch["y"])

        def configure_optimizers(self):
            return make_optimizer(t, self.parameters())

    return TaskModule()


def indexed_dataset(task: str | SuiteTask, x: Tensor, y: Tensor):
    from torch.utils.data import TensorDataset

    from lightning_sketch.data import IndexedDataset

    return IndexedDataset(TensorDataset(x, y), names=keys(task))


# ---------------------------------------------------------------------- hashing
_LIB_HASH: str | None = None


def library_hash() -> str:
    """SHA-256 of what a fit's stored rows depend on and attribution-time changes do not:
    lightning_sketch/callbacks/*.py, attribution/task.py and attribution/curvature.py (the fit
    cache key; sketches/ and store/ are taken as fixed). Taken once per process; the environment
    variable ``SUITE_LIB_HASH`` pins it (to score fits made before a later library change)."""
    global _LIB_HASH
    if _LIB_HASH is None and os.environ.get("SUITE_LIB_HASH"):  # reuse fits made by an earlier library
        _LIB_HASH = os.environ["SUITE_LIB_HASH"]
    if _LIB_HASH is None:
        h = hashlib.sha256()
        pkg = REPO / "lightning_sketch"
        files = sorted((pkg / "callbacks").glob("*.py")) + [pkg / "attribution" / "task.py",
                                                             pkg / "attribution" / "curvature.py"]
        for p in files:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        _LIB_HASH = h.hexdigest()[:16]
    return _LIB_HASH


def _data_sums(sp: Splits) -> dict[str, float]:
    return {n: float(a[0].double().sum()) + float(a[1].double().sum())
            for n, a in (("train", sp.train), ("query", sp.query), ("val", sp.val))}


# ---------------------------------------------------------------------- warnings capture
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        msg = record.getMessage()
        if record.name.startswith("lightning_sketch") or any(k in msg for k in _LIB_WORDS):
            self.records.append((record.levelno, f"[log {record.name}] {msg}"))


_LIB_WORDS = ("GradientSketch", "Attributor", "lightning_sketch", "tune_damping")
_LOGGERS = ("lightning_sketch", "lightning.pytorch.utilities.rank_zero")


class capture_warnings:
    """Context manager: records every Python warning and lightning_sketch log record ≥ WARNING."""

    def __enter__(self):
        self._cw = warnings.catch_warnings(record=True)
        self._list = self._cw.__enter__()
        warnings.simplefilter("always")
        self._h = _Collect()
        self._levels = []
        for name in _LOGGERS:
            lg = logging.getLogger(name)
            self._levels.append(lg.level)
            if lg.getEffectiveLevel() > logging.INFO:
                lg.setLevel(logging.INFO)
            lg.addHandler(self._h)
        return self

    def __exit__(self, *exc):
        for name, lvl in zip(_LOGGERS, self._levels):
            logging.getLogger(name).removeHandler(self._h)
            logging.getLogger(name).setLevel(lvl)

        def src(w):
            lib = "lightning_sketch" in (w.filename or "") or any(k in str(w.message) for k in _LIB_WORDS)
            return "lightning_sketch" if lib else "other"

        self.items = [
            {"source": src(w), "category": w.category.__name__, "where": f"{Path(w.filename).name}:{w.lineno}",
             "message": str(w.message)[:400]}
            for w in self._list
        ] + [{"source": "lightning_sketch", "category": "log", "where": "logger", "message": m[:400]}
             for lvl, m in self._h.records if lvl >= logging.WARNING]
        #: lightning_sketch INFO messages (e.g. what GradientSketch recognised), not counted as warnings
        self.info = [m[:400] for lvl, m in self._h.records if lvl < logging.WARNING]
        self._cw.__exit__(*exc)
        return False


def summarise_warnings(items: list[dict]) -> dict:
    """Counts of warnings (INFO log messages are listed under ``info`` and not counted)."""
    info = sorted({w["message"] for w in items if w["category"] == "info"})
    items = [w for w in items if w["category"] != "info"]
    lib = [w for w in items if w["source"] == "lightning_sketch"]
    uniq: dict[str, int] = {}
    for w in items:
        k = f"{w['source']} {w['category']} {w['where']}: {w['message']}"
        uniq[k] = uniq.get(k, 0) + 1
    return {"total": len(items), "lightning_sketch": len(lib), "unique": uniq, "info": info}


# ---------------------------------------------------------------------- Lightning runs
def _fit_one(t: SuiteTask, seed: int, train: tuple[Tensor, Tensor], run_dir: Path, cb_kw: dict | None = None):
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_sketch.callbacks import GradientSketch

    seed_everything(seed, verbose=False)
    module = lightning_module(t, seed)
    loader = DataLoader(indexed_dataset(t, *train), batch_size=t.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(max_epochs=t.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", deterministic=True,
                      default_root_dir=str(run_dir), callbacks=[GradientSketch(dirpath=str(run_dir), **(cb_kw or {}))])
    t0 = time.perf_counter()
    with capture_warnings() as cw:
        trainer.fit(module, loader)
    return module, time.perf_counter() - t0, cw.items + [
        {"source": "lightning_sketch", "category": "info", "where": "logger", "message": m} for m in cw.info]


def runs_dir(task: str | SuiteTask, cb_kw: dict | None = None) -> Path:
    t = get_task(task)
    sp = splits(t)
    cfg = {"v": 1, "task": _key(t), "lib": library_hash(), "data": _data_sums(sp),
           "callback": "GradientSketch(dirpath=run_dir)"}
    if cb_kw:
        cfg["callback_kwargs"] = cb_kw
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return SUITE / t.name / f"runs_{key}"


#: sketch_dim used only when GradientSketch's defaults refuse the model (sketch_dim 1024 > N)
FALLBACK_SKETCH_DIM = 512


def fit_runs(task: str | SuiteTask, n_runs: int = 5, refit: bool = False, log=print):
    """The default runs; if ``GradientSketch(dirpath=...)`` refuses the model because its default
    ``sketch_dim`` exceeds the parameter count, the error is recorded (``info["default_error"]``) and
    the runs are made with ``GradientSketch(dirpath=..., sketch_dim=FALLBACK_SKETCH_DIM)`` instead."""
    from lightning_sketch.exceptions import SketchConfigError

    try:
        return _fit_runs(task, n_runs, refit, log)
    except SketchConfigError as err:
        if "sketch_dim" not in str(err):
            raise
        log(f"  default GradientSketch refused {get_task(task).name}: {err}; refitting with "
            f"sketch_dim={FALLBACK_SKETCH_DIM}")
        runs, info = _fit_runs(task, n_runs, refit, log, {"sketch_dim": FALLBACK_SKETCH_DIM})
        info["default_error"] = f"{type(err).__name__}: {err}"
        return runs, info


def _fit_runs(task: str | SuiteTask, n_runs: int = 5, refit: bool = False, log=print, cb_kw: dict | None = None):
    """``[(run_dir, module in eval mode)]`` and a dict of fit info (seconds, warnings), cached by content."""
    t = get_task(task)
    sp = splits(t)
    out = runs_dir(t, cb_kw)
    runs, info = [], {"dir": str(out), "lib_hash": library_hash(), "callback_kwargs": cb_kw or {}, "seconds": [], "warnings": [], "cached": []}
    for r in range(n_runs):
        run_dir = out / f"run{r}"
        meta = run_dir / "fit.json"
        if not refit and meta.exists() and (run_dir / "module.pt").exists():
            try:
                m = json.loads(meta.read_text())
                module = lightning_module(t, r)
                module.load_state_dict(torch.load(run_dir / "module.pt", weights_only=True))
                runs.append((run_dir, module.eval()))
                info["seconds"].append(m["fit_seconds"])
                info["warnings"].extend(m["warnings"])
                info["cached"].append(True)
                continue
            except (OSError, ValueError, KeyError, RuntimeError):
                pass
        if run_dir.exists():
            shutil.rmtree(run_dir)
        module, secs, warns = _fit_one(t, r, sp.train, run_dir, cb_kw)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), run_dir / "module.pt")
        meta.write_text(json.dumps({"task": asdict(t), "seed": r, "lib_hash": library_hash(),
                                    "fit_seconds": secs, "warnings": warns}, indent=1))
        log(f"  fit {t.name} run{r}: {secs:.1f} s, {len(warns)} warnings")
        runs.append((run_dir, module.eval()))
        info["seconds"].append(secs)
        info["warnings"].extend(warns)
        info["cached"].append(False)
    return runs, info


# ---------------------------------------------------------------------- ground truth
class GroundTruth(NamedTuple):
    masks: Tensor  # [S, T] bool
    query_outputs: Tensor  # [S, Q]
    val_outputs: Tensor  # [S, V]
    seconds: float  # the recorded compute time (also for a cached read)
    path: Path


def ground_truth(task: str | SuiteTask, n_subsets: int | None = None, n_seeds: int | None = None,
                 threads: int | None = 1) -> GroundTruth:
    from lightning_sketch.evaluation import subset_retraining

    t = get_task(task)
    t = replace(t, n_subsets=n_subsets or t.n_subsets, n_seeds=n_seeds or t.n_seeds)
    sp = splits(t)
    cfg = {"v": 1, "task": _key(t), "data": _data_sums(sp), "retraining": "subset_retraining seed 0"}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = SUITE / t.name / f"gt_{key}.npz"
    S, T, Q, V = t.n_subsets, t.n_train, t.n_query, t.n_val
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as d:
                masks, qo, vo = (torch.from_numpy(d[k].copy()) for k in ("masks", "query_outputs", "val_outputs"))
                secs = float(d["seconds"])
            if masks.shape == (S, T) and qo.shape == (S, Q) and vo.shape == (S, V):
                return GroundTruth(masks, qo, vo, secs, path)
        except (OSError, ValueError, KeyError):
            pass
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        both = (torch.cat([sp.query[0], sp.val[0]]), torch.cat([sp.query[1], sp.val[1]]))
        gt = subset_retraining(
            lambda s: make_net(t, s), sp.train, both, output_fn=output_fn(t), loss_fn=loss_fn(t),
            n_subsets=S, n_seeds=t.n_seeds, fraction=t.fraction, epochs=t.epochs, lr=t.lr,
            batch_size=t.batch_size, momentum=t.momentum, weight_decay=t.weight_decay, seed=0,
            optimizer=t.optimizer,
        )
    finally:
        torch.set_num_threads(prev)
    secs = time.perf_counter() - t0
    qo, vo = gt.outputs[:, :Q].float(), gt.outputs[:, Q:].float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, masks=gt.masks.numpy(), query_outputs=qo.numpy(), val_outputs=vo.numpy(), seconds=secs)
    tmp.replace(path)
    return GroundTruth(gt.masks, qo, vo, secs, path)


# ---------------------------------------------------------------------- evaluation
def lds_of(scores: Tensor, gt: GroundTruth, split: str = "query", n_boot: int = 1) -> float:
    outputs = gt.query_outputs if split == "query" else gt.val_outputs
    return lds_ci(scores, gt.masks, outputs, n_boot=n_boot)[0]


def evaluate(scores_q: Tensor, scores_v: Tensor | None, gt: GroundTruth, n_boot: int = 1000) -> dict[str, Any]:
    """LDS on the query (and val) split, each ``[mean, lo, hi]`` (bootstrap over queries)."""
    out = {"query": list(lds_ci(scores_q, gt.masks, gt.query_outputs, n_boot=n_boot))}
    if scores_v is not None:
        out["val"] = list(lds_ci(scores_v, gt.masks, gt.val_outputs, n_boot=n_boot))
    return out
