"""What the ``training_step`` replay costs against a hand-written ``per_example_loss`` (RESULTS.md
"Ordinary modules").

Two models, each written twice: once with ``per_example_loss`` (the explicit route) and once the
ordinary Lightning way (``training_step`` calling ``nn.CrossEntropyLoss``/``F.nll_loss``, logging and
updating a torchmetrics metric), with the same weights:

- ``mlp``: the package's digits MLP 64-128-10, batch 64;
- ``transformer``: Lightning's demo ``Transformer`` (vocab 1000) on synthetic tokens, batch 16 x 32,
  its per-token NLL flattened batch-major (``view(-1)``).

On one fixed batch (eval mode), per model: the largest difference of the per-example losses and of the
sketched per-example gradients (``sketch_gradients(mode="auto")``, affd D = 1024) between the two
routes, the time of each route's sketch, interleaved over ``--reps`` repetitions (median ratio), and
the first call of a capture (which checks the hook paths against autograd, ``gradients/_capture_check``)
against a later one.
Usage::

    python benchmarks/step_loss.py [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule
from torch import nn

from lightning_sketch.gradients import GradientCapture, ParamLayout, module_loss_fn, sketch_gradients
from lightning_sketch.sketches import make


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class MLPExplicit(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


class MLPOrdinary(MLPExplicit):
    per_example_loss = None  # type: ignore[assignment]

    def __init__(self):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss()
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.acc(logits, y)
        self.log("train_loss", loss)
        return loss


class TransformerExplicit(LightningModule):
    def __init__(self, vocab=1000):
        super().__init__()
        from lightning.pytorch.demos import Transformer

        torch.manual_seed(0)
        self.model = Transformer(vocab_size=vocab)

    def per_example_loss(self, batch):
        x, t = batch
        out = self.model(x, t)  # [B*T, V] log-probs
        return F.nll_loss(out, t.reshape(-1), reduction="none").view(x.shape[0], -1).mean(1)


class TransformerOrdinary(TransformerExplicit):
    per_example_loss = None  # type: ignore[assignment]

    def training_step(self, batch, batch_idx):
        x, t = batch
        loss = F.nll_loss(self.model(x, t), t.reshape(-1))
        self.log("train_loss", loss)
        return loss


def batches():
    g = torch.Generator().manual_seed(0)
    mlp = (torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
    toks = torch.randint(0, 1000, (16, 33), generator=g)
    return {"mlp": (MLPExplicit, MLPOrdinary, mlp),
            "transformer": (TransformerExplicit, TransformerOrdinary, (toks[:, :-1], toks[:, 1:]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {load()}")
    for name, (explicit_cls, ordinary_cls, batch) in batches().items():
        explicit, ordinary = explicit_cls().eval(), ordinary_cls().eval()
        ordinary.load_state_dict(explicit.state_dict(), strict=False)
        layout = ParamLayout.from_module(explicit)
        sketch = make("affd", dim=layout.dim, sketch_dim=1024, seed=0)
        fns = {"per_example_loss": (explicit, module_loss_fn(explicit)),
               "training_step replay": (ordinary, module_loss_fn(ordinary))}
        caps = {k: GradientCapture(m, sketch, layout, loss_scale="sum") for k, (m, _) in fns.items()}
        with torch.no_grad():
            losses = {k: fn(m, batch) for k, (m, fn) in fns.items()}
        t0 = time.perf_counter()  # the first call checks the hook paths against autograd (once per capture)
        rows = {"per_example_loss": sketch_gradients(explicit, fns["per_example_loss"][1], batch, sketch,
                                                     mode="auto", capture=caps["per_example_loss"])}
        first = time.perf_counter() - t0
        replay = "training_step replay"
        rows[replay] = sketch_gradients(ordinary, fns[replay][1], batch, sketch, mode="auto",
                                        capture=caps[replay])
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, (m, fn) in fns.items():
                t0 = time.perf_counter()
                sketch_gradients(m, fn, batch, sketch, mode="auto", capture=caps[k])
                times[k].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[k]) for k in fns)
        ratio = statistics.median(t / s for t, s in zip(times[replay], times["per_example_loss"]))
        loss_diff = float((losses["per_example_loss"] - losses[replay]).abs().max())
        row_diff = float((rows["per_example_loss"] - rows[replay]).abs().max())
        row_scale = float(rows["per_example_loss"].abs().max())
        print(f"[{name}] N={layout.dim:,} B={len(batch[0])}: max |Δloss| {loss_diff:.2e}, "
              f"max |Δrow| {row_diff:.2e} (rows up to {row_scale:.3g}); sketch per batch: "
              f"per_example_loss {a * 1e3:.1f} ms, replay "
              f"{b * 1e3:.1f} ms, ratio {ratio:.2f}x; first call with the hook check {first * 1e3:.1f} ms "
              f"({first / a:.2f}x a later one); hooks exact {caps[replay].exact} ({load()})")


if __name__ == "__main__":
    main()
