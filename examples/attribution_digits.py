"""Train an MLP on sklearn digits with the GradientSketch callback, then explain a few test images.

Runs offline in about a minute on 2 CPU cores::

    .venv/bin/python examples/attribution_digits.py --out runs/attribution_digits

It prints the top proponents (training images whose gradient step most lowered the query's loss)
and opponents (most negative scores: they raised it) of three test images, and saves a picture of
them to ``<out>/proponents_opponents.png``. Sign convention: positive score = helpful.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.data import IndexedDataset


class DigitsMLP(LightningModule):
    """64 → 128 → 10 MLP; ``per_example_loss`` is the convention GradientSketch and Attributor use."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")  # [B], unreduced

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/attribution_digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sketch-dim", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run (the callback refuses to overwrite a store)
    seed_everything(0)

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    train_idx, test_idx = perm[:1000], perm[1000:1200]
    train = IndexedDataset(TensorDataset(X[train_idx], y[train_idx]))  # items: {"x", "y", "index"}

    model = DigitsMLP()
    sketch_cb = GradientSketch(dirpath=str(out), sketch_kind="affd", sketch_dim=args.sketch_dim, every_n_epochs=5)
    trainer = Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, callbacks=[sketch_cb],
                      default_root_dir=str(out), accelerator="cpu", enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    model.eval()
    acc = (model(X[test_idx]).argmax(1) == y[test_idx]).float().mean()
    print(f"test accuracy {acc:.3f}; store at {out / 'store'}")

    # TracIn over the stored checkpoints (query gradients at each checkpoint's saved weights).
    attributor = Attributor(out, model, method="tracin")
    queries = test_idx[:3]
    batch = {"x": X[queries], "y": y[queries], "index": queries}
    pro_ids, pro_scores = attributor.top_k(batch, k=5)
    opp_ids, opp_scores = attributor.top_k(batch, k=5, opponents=True)
    ytr = y[train_idx]
    for q in range(len(queries)):
        print(f"\ntest image {int(queries[q])} (label {int(y[queries[q]])})")
        print("  proponents:", ", ".join(f"#{int(i)} (y={int(ytr[i])}, {float(s):+.3g})"
                                         for i, s in zip(pro_ids[q], pro_scores[q])))
        print("  opponents: ", ", ".join(f"#{int(i)} (y={int(ytr[i])}, {float(s):+.3g})"
                                         for i, s in zip(opp_ids[q], opp_scores[q])))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(queries), 11, figsize=(13, 1.6 * len(queries) + 0.6))
    Xtr = X[train_idx]
    for q in range(len(queries)):
        panels = [(X[queries[q]], f"query y={int(y[queries[q]])}", "black")]
        panels += [(Xtr[i], f"+ y={int(ytr[i])}", "tab:green") for i in pro_ids[q]]
        panels += [(Xtr[i], f"− y={int(ytr[i])}", "tab:red") for i in opp_ids[q]]
        for ax, (img, title, color) in zip(axes[q], panels):
            ax.imshow(img.reshape(8, 8), cmap="gray_r")
            ax.set_title(title, fontsize=8, color=color)
            ax.axis("off")
    fig.suptitle("TracIn: 5 proponents (green, lower the query loss) and 5 opponents (red)", fontsize=10)
    fig.tight_layout()
    path = out / "proponents_opponents.png"
    fig.savefig(path, dpi=110)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
