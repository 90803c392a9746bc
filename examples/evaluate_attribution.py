"""Measure attribution quality on a small proxy: LDS and mislabel-detection AUROC for every method.

Attribution scores cannot be checked by eye. This example builds the two standard checks with
:mod:`lightning_sketch.evaluation` on a small proxy problem (an MLP on 600 sklearn digits):

1. trains one run with the ``GradientSketch`` callback (its defaults, ``sketch_dim`` aside) and
   queries it with ``Attributor(run_dir, model, method=m)`` for each method ``m``, nothing else set;
2. builds a retraining ground truth with ``subset_retraining`` (random half subsets of the training
   set, every model trained at once with ``torch.func``) and scores each method with ``lds``;
3. flips 10% of the training labels, trains again, and ranks the examples by ``self_influence``:
   ``mislabel_auroc`` and the fraction of flipped labels found in the top 10% / 20%.

Runs offline in about 1–2 minutes on 2 CPU cores::

    .venv/bin/python examples/evaluate_attribution.py --out runs/evaluate_attribution

On your own problem, swap in a small model and a few hundred examples that behave like it; the
retraining needs a buffer-free model (no BatchNorm, no Dropout) that trains with plain SGD.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import METHODS, Attributor, classification_margin
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.data import IndexedDataset
from lightning_sketch.evaluation import lds, mislabel_auroc, mislabel_detection_curve, subset_retraining
from lightning_sketch.exceptions import LightningSketchError

EPOCHS, LR, MOMENTUM, WD, BATCH = 10, 0.1, 0.9, 1e-4, 64


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class Proxy(LightningModule):
    """The proxy model; ``per_example_margin`` is the output the ground truth measures."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.net = make_net(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def per_example_margin(self, batch: dict) -> torch.Tensor:
        return classification_margin(self(batch["x"]), batch["y"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def fit(x: torch.Tensor, y: torch.Tensor, run_dir: Path, sketch_dim: int) -> Proxy:
    seed_everything(0, verbose=False)
    model = Proxy(0)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=str(run_dir),
                      callbacks=[GradientSketch(dirpath=str(run_dir), sketch_dim=sketch_dim)])
    trainer.fit(model, loader)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/evaluate_attribution")
    parser.add_argument("--sketch-dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=100, help="retraining subsets")
    parser.add_argument("--seeds", type=int, default=2, help="models per subset (outputs averaged)")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(1)  # small models: one thread is fastest

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    tr, q = perm[:600], perm[600:700]
    train, queries = (X[tr], y[tr]), (X[q], y[q])
    qbatch = {"x": queries[0], "y": queries[1], "index": torch.arange(100)}

    t0 = time.perf_counter()
    model = fit(*train, out / "run", args.sketch_dim)
    print(f"fit with GradientSketch(D={args.sketch_dim}): {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    gt = subset_retraining(make_net, train, queries, output_fn=classification_margin, n_subsets=args.subsets,
                           n_seeds=args.seeds, epochs=EPOCHS, lr=LR, momentum=MOMENTUM, weight_decay=WD, batch_size=BATCH)
    print(f"ground truth: {args.subsets} half subsets x {args.seeds} seeds retrained in {time.perf_counter() - t0:.1f} s")

    print("LDS on 100 queries (Attributor with default arguments):")
    for method in METHODS:
        try:
            att = Attributor(out / "run", model, method=method)
            scores = att.scores(qbatch)  # [Q, T], columns in att.ids order
            order = torch.argsort(att.ids)  # the ground truth's columns are the training rows 0..T-1
            print(f"  {method:<12} {float(lds(scores[:, order], gt.masks, gt.outputs)):.3f}")
        except LightningSketchError as err:  # a method that needs more than the defaults says what it needs
            print(f"  {method:<12} not available with default arguments: {type(err).__name__}: {err}")

    flipped = torch.zeros(600, dtype=torch.bool)
    idx = torch.randperm(600, generator=torch.Generator().manual_seed(1))[:60]
    flipped[idx] = True
    y_noisy = train[1].clone()
    y_noisy[idx] = (y_noisy[idx] + torch.randint(1, 10, (60,), generator=torch.Generator().manual_seed(2))) % 10
    noisy = fit(train[0], y_noisy, out / "noisy", args.sketch_dim)
    print("mislabel detection, 10% flipped labels (self-influence):")
    for method in METHODS:
        try:
            ids, si = Attributor(out / "noisy", noisy, method=method).self_influence()
            auroc = float(mislabel_auroc(si, flipped[ids]))
            found = mislabel_detection_curve(si, flipped[ids], fractions=(0.1, 0.2)).tolist()
            print(f"  {method:<12} AUROC {auroc:.3f}; flipped found in top 10%: {found[0]:.2f}, top 20%: {found[1]:.2f}")
        except LightningSketchError as err:
            print(f"  {method:<12} not available with default arguments: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
