"""The bundled demo: scikit-learn's 8x8 digits and a small MLP, as Lightning pieces.

This module is an adapter like :mod:`lightning_sketch.cli` (it imports Lightning). It gives the
configs in ``configs/`` and the examples a model and a data set that need no download:

- :class:`DigitsDataModule`: ``sklearn.datasets.load_digits`` (1,797 images of 8x8 pixels,
  bundled with scikit-learn), a fixed seeded permutation split into train/val/test, features
  standardised with the training split's statistics, optional label noise on the training split
  (for mislabel detection, as in Koh & Liang 2017), and items as dicts ``{"x": [64] float32, "y": int64,
  "index": int64}`` so that every training example has a stable id.
- :class:`DigitsClassifier`: an MLP 64 -> ``hidden`` -> 10 following the library's convention
  ``per_example_loss(batch) -> Tensor[B]`` (what the callbacks and the
  :class:`~lightning_sketch.attribution.Attributor` differentiate).

Example:
    >>> dm = DigitsDataModule(n_train=20, n_val=10, n_test=10, batch_size=8)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch), tuple(batch["x"].shape)
    (['index', 'x', 'y'], (8, 64))
    >>> model = DigitsClassifier(hidden=16)
    >>> tuple(model.per_example_loss(batch).shape)
    (8,)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch._checks import non_negative_int, positive_int
from lightning_sketch.data import IndexedDataset
from lightning_sketch.exceptions import SketchConfigError

__all__ = ["DigitsClassifier", "DigitsDataModule", "N_DIGITS"]

#: Number of images in scikit-learn's bundled digits set.
N_DIGITS = 1797


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits as train/val/test splits of indexed dict items.

    A permutation drawn from ``seed`` fixes the splits: the first ``n_train`` images train, the
    next ``n_val`` validate, the next ``n_test`` test. Pixels (0-16) are standardised with the
    training split's per-pixel mean and standard deviation. Each split is an
    :class:`~lightning_sketch.data.IndexedDataset`, so ``batch["index"]`` is the position inside
    the split (the id the sketch store records for training examples).

    Args:
        batch_size: examples per batch in every split.
        n_train: training examples.
        n_val: validation examples.
        n_test: test examples (the usual attribution queries).
        seed: seed of the split permutation, of the label noise and of the training shuffle.
        flip_fraction: fraction of training labels replaced by a different, random class
            (``0.0`` = clean labels); the affected ids are in :attr:`flipped_ids` after ``setup``.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        SketchConfigError: if a size is not a positive int, the splits need more than the 1,797
            images, or ``flip_fraction`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        n_train: int = 1000,
        n_val: int = 200,
        n_test: int = 200,
        seed: int = 0,
        flip_fraction: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = positive_int("batch_size", batch_size)
        self.n_train = positive_int("n_train", n_train)
        self.n_val = positive_int("n_val", n_val)
        self.n_test = positive_int("n_test", n_test)
        self.num_workers = non_negative_int("num_workers", num_workers)
        self.seed = int(seed)
        if n_train + n_val + n_test > N_DIGITS:
            raise SketchConfigError(
                f"`n_train + n_val + n_test` must be <= {N_DIGITS} (the digits set's size), got "
                f"{n_train} + {n_val} + {n_test} = {n_train + n_val + n_test}; lower one of them."
            )
        if not (0.0 <= float(flip_fraction) <= 1.0):
            raise SketchConfigError(f"`flip_fraction` must be in [0, 1], got {flip_fraction!r}.")
        self.flip_fraction = float(flip_fraction)
        self.save_hyperparameters()
        self._splits: dict[str, dict[str, Tensor]] | None = None
        self.flipped_ids: Tensor = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ data
    def _build(self) -> dict[str, dict[str, Tensor]]:
        if self._splits is not None:
            return self._splits
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)  # [1797, 8, 8], 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(labels), generator=gen)
        bounds = np.cumsum([0, self.n_train, self.n_val, self.n_test])
        raw = {
            name: (images[perm[a:b]], labels[perm[a:b]].clone())
            for name, a, b in zip(("train", "val", "test"), bounds[:-1], bounds[1:])
        }
        flat_train = raw["train"][0].reshape(self.n_train, 64)
        mean, std = flat_train.mean(0), flat_train.std(0).clamp_min(1.0)
        n_flip = int(round(self.flip_fraction * self.n_train))
        if n_flip:
            ids = torch.randperm(self.n_train, generator=gen)[:n_flip].sort().values
            shift = torch.randint(1, 10, (n_flip,), generator=gen)
            y = raw["train"][1]
            y[ids] = (y[ids] + shift) % 10
            self.flipped_ids = ids
        self._splits = {
            name: {"x": ((im.reshape(len(im), 64) - mean) / std).contiguous(), "y": y, "images": im}
            for name, (im, y) in raw.items()
        }
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        """Build the splits (idempotent; cheap: the digits ship with scikit-learn)."""
        self._build()

    def dataset(self, split: str = "train") -> IndexedDataset:
        """The ``split`` ("train", "val" or "test") as an indexed dataset of dict items."""
        data = self._split(split)
        return IndexedDataset(TensorDataset(data["x"], data["y"]))

    def images(self, split: str = "test") -> Tensor:
        """``[n, 8, 8]`` float32 raw pixel values (0-16) of ``split``, in id order (for pictures)."""
        return self._split(split)["images"]

    def labels(self, split: str = "train") -> Tensor:
        """``[n]`` int64 labels of ``split`` as used in training (flipped ones included)."""
        return self._split(split)["y"]

    def batch(self, ids: Any, split: str = "test") -> dict[str, Tensor]:
        """A dict batch ``{"x": [B, 64], "y": [B], "index": [B]}`` of the given ids of ``split``.

        Raises:
            SketchConfigError: if an id is outside ``[0, n)`` for the split.
        """
        data = self._split(split)
        idx = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        n = len(data["y"])
        if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise SketchConfigError(f"`ids` must be non-empty and in [0, {n}) for split {split!r}, got "
                                    f"{idx.tolist()}.")
        return {"x": data["x"][idx], "y": data["y"][idx], "index": idx}

    def _split(self, split: str) -> dict[str, Tensor]:
        splits = self._build()
        if split not in splits:
            raise SketchConfigError(f"`split` must be one of {sorted(splits)}, got {split!r}.")
        return splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split), batch_size=self.batch_size, shuffle=shuffle, generator=gen,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (own seeded generator: the global RNG is not used)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in id order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in id order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, in id order."""
        return self._loader("test", shuffle=False)


class DigitsClassifier(pl.LightningModule):
    """An MLP 64 -> ``hidden`` -> 10 (ReLU) trained with SGD on dict batches ``{"x", "y", ...}``.

    Args:
        hidden: width of the hidden layer.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        in_features: input width (64 for the 8x8 digits).
        num_classes: output classes.

    Raises:
        SketchConfigError: if ``hidden``, ``in_features`` or ``num_classes`` is not a positive int
            or ``lr`` is not positive.
    """

    def __init__(
        self,
        hidden: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        in_features: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        positive_int("hidden", hidden)
        positive_int("in_features", in_features)
        positive_int("num_classes", num_classes, minimum=2)
        if not float(lr) > 0:
            raise SketchConfigError(f"`lr` must be > 0, got {lr!r}.")
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_features]`` -> ``[B, num_classes]`` logits."""
        return self.net(x)

    def per_example_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B]`` cross-entropy of each example (the library's ``loss_fn`` convention)."""
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def per_example_margin(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B]`` margin: correct logit minus the log-sum-exp of the others (TRAK's query function)."""
        logits = self(batch["x"])
        correct = logits.gather(1, batch["y"].unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, batch["y"].unsqueeze(1), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], prefix: str) -> None:
        logits = self(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        acc = (logits.argmax(1) == batch["y"]).float().mean()
        self.log(f"{prefix}_loss", loss, prog_bar=prefix == "val")
        self.log(f"{prefix}_acc", acc, prog_bar=prefix == "val")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Only trainable parameters: under IntrinsicDimension that is ω alone.
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params,
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
        )
