"""Reading stored checkpoint slices into id-aligned float64 matrices (private helpers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sketch.attribution import scores as S
from lightning_sketch.exceptions import LayoutMismatchError, SketchConfigError

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = ["StoredRows", "load_rows", "negative_margin", "negative_margin_of", "open_run"]

#: sub-folders of a GradientSketch run directory.
STORE_DIR = "store"
WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class StoredRows:
    """Stored sketches of several checkpoints, aligned by example id.

    Attributes:
        ids: ``[T]`` int64, sorted ascending: the union of the ids over the checkpoints.
        slices: ``C × [T, D]`` float64; an id missing from a checkpoint (e.g. a row skipped for
            non-finite gradients) is a zero row there, so it contributes nothing to that term.
    """

    ids: Tensor
    slices: list[Tensor]


def open_run(store: Any) -> tuple[Any, Path | None]:
    """Resolve a store object or path; returns ``(store, weights_dir or None)``.

    A path may be a store directory or a GradientSketch run directory (``store/`` + ``weights/``).
    """
    if isinstance(store, (str, Path)):
        from lightning_sketch.store import SketchStore

        path = Path(store)
        if (path / STORE_DIR).is_dir():
            weights = path / WEIGHTS_DIR
            return SketchStore.open(path / STORE_DIR), weights if weights.is_dir() else None
        weights = path.parent / WEIGHTS_DIR
        return SketchStore.open(path), weights if weights.is_dir() else None
    root = getattr(store, "path", None)
    if root is not None:
        weights = Path(root).parent / WEIGHTS_DIR
        return store, weights if weights.is_dir() else None
    return store, None


def load_rows(store: Any, checkpoints: Sequence[str]) -> StoredRows:
    """Read the slices of ``checkpoints`` and align them on the union of their ids."""
    per = []
    for name in checkpoints:
        ids = np.asarray(store.ids(name), dtype=np.int64)
        vecs = np.asarray(store.vectors(name), dtype=np.float64)
        per.append((ids, vecs))
    all_ids = np.unique(np.concatenate([i for i, _ in per])) if per else np.zeros(0, np.int64)
    slices = []
    for ids, vecs in per:
        out = np.zeros((len(all_ids), vecs.shape[1] if vecs.ndim == 2 else 0), dtype=np.float64)
        out[np.searchsorted(all_ids, ids)] = vecs
        slices.append(torch.from_numpy(out))
    return StoredRows(ids=torch.from_numpy(all_ids), slices=slices)


def _method_loss(model: nn.Module, name: str) -> LossFn:
    if not callable(getattr(model, name, None)):
        raise SketchConfigError(
            f"No `loss_fn` given and {type(model).__name__} has no `{name}(batch)` method returning "
            f"per-example losses [B]; pass `loss_fn(module, batch) -> Tensor[B]`."
        )
    return lambda module, batch: getattr(module, name)(batch)


def negative_margin_of(model: nn.Module) -> LossFn:
    """``loss_fn`` returning −``module.per_example_margin(batch)`` (TRAK's query output, negated)."""
    _method_loss(model, "per_example_margin")
    return lambda module, batch: -module.per_example_margin(batch)


def negative_margin(logits_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]]) -> LossFn:
    """``loss_fn`` returning the negative TRAK margin from ``logits_fn(module, batch) -> (logits, y)``.

    Example:
        >>> fn = negative_margin(lambda m, b: (m(b[0]), b[1]))
        >>> net = torch.nn.Linear(2, 3)
        >>> fn(net, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))).shape
        torch.Size([4])
    """
    def loss(module: nn.Module, batch: Any) -> Tensor:
        logits, y = logits_fn(module, batch)
        return -S.classification_margin(logits, y)

    return loss


@contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _checkpoints(store: Any) -> list[dict[str, Any]]:
    manifest = store.manifest
    return list(manifest["checkpoints"]) if isinstance(manifest, dict) else list(manifest.checkpoints)


def _sketch_and_layout(store: Any, model: nn.Module) -> tuple[Any, Any]:
    from lightning_sketch.gradients import ParamLayout
    from lightning_sketch.sketches import make

    manifest = store.manifest
    spec = dict(manifest["spec"])
    stored = manifest.get("layout")
    fp = manifest.get("layout_fingerprint") or (stored or {}).get("fingerprint")
    if stored is not None:
        want = ParamLayout.from_dict(stored)
        full = ParamLayout.from_module(model)
        have = {n: s for n, s in zip(full.names, full.shapes)}
        if all(n in have for n in want.names):
            layout = ParamLayout.from_module(model, include=list(want.names))
        else:
            layout = full
        want.check_compatible(layout)
    else:
        layout = ParamLayout.from_module(model)
    if fp is not None and layout.fingerprint() != fp:
        raise LayoutMismatchError(
            f"The model's parameter layout (fingerprint {layout.fingerprint()[:12]}…) differs from the "
            f"store's ({str(fp)[:12]}…); query with the architecture the store was written for."
        )
    return make(**spec), layout
