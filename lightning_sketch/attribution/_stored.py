"""Runs, stored rows and loss resolvers behind the :class:`~lightning_sketch.attribution.Attributor`.

A *run* is what one ``GradientSketch`` fit wrote: ``<run>/store`` (the :class:`SketchStore`),
``<run>/weights/<slice>.pt`` (the sketched parameters at each slice) and ``<run>/curvature/`` (the
sampled-label Fisher of each slice, :mod:`lightning_sketch.attribution.curvature`). Rows are read
in blocks (``iter_blocks``) so that no method needs all rows in memory at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_sketch.attribution import scores as S
from lightning_sketch.exceptions import (
    LayoutMismatchError,
    SliceMismatchError,
    StoreCorruptError,
    StoreNotFoundError,
)
from lightning_sketch.gradients import (
    GradientCapture,
    ParamLayout,
    eval_mode,
    module_loss_fn,
    sketch_gradients,
)
from lightning_sketch.gradients.per_example import hook_capture
from lightning_sketch.io.safeio import load_torch_file
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

LossFn = Callable[[nn.Module, Any], Tensor]

__all__ = ["Run", "negative_margin", "negative_margin_of", "open_run", "verify_runs"]

log = logging.getLogger("lightning_sketch.attribution")

#: sub-folders of a GradientSketch run directory.
STORE_DIR = "store"
WEIGHTS_DIR = "weights"

#: rows read per block when streaming a checkpoint slice (float64 block of 32 MiB at D = 1024).
BLOCK_ROWS = 4096

#: name of the probe record (``weights/probe.pt``): ids and inputs of a few training examples.
PROBE = "probe"

#: largest ‖recomputed − stored‖_F / ‖stored‖_F over the probe examples that :func:`verify_runs`
#: accepts: float32 rows are reproduced to ~1e-6, float16 ones to ~1e-3; a model with other weights
#: or BatchNorm statistics misses by 1e-1 and more.
VERIFY_RTOL = 1e-2


@dataclass
class Run:
    """One stored run: its store, optional run folder (weights, curvature) and checkpoint metadata."""

    store: Any
    root: Path | None
    weights_dir: Path | None
    names: list[str]
    lrs: dict[str, float | None]
    explicit_weights: bool = False
    #: slice name → the training step its rows were taken at (``None`` where the store has none)
    steps: dict[str, int | None] = field(default_factory=dict)
    _ids: dict[str, np.ndarray] = field(default_factory=dict)

    def ids(self, name: str) -> np.ndarray:
        """``[n]`` int64 example ids of one slice, in storage order."""
        if name not in self._ids:
            self._ids[name] = np.asarray(self.store.ids(name), dtype=np.int64)
        return self._ids[name]

    def iter_blocks(self, name: str, block: int | None = None) -> Iterator[tuple[slice, Tensor]]:
        """``(row slice, rows [b, D] float64)`` blocks of one slice, in storage order.

        The store's row source is read block by block (a memory map, or the memory maps of the
        slice's segments, never joined), so only one block is copied at a time.
        """
        block = BLOCK_ROWS if block is None else block
        vecs = _rows_of(self.store, name)
        n = vecs.shape[0]
        for s in range(0, n, block):
            e = min(n, s + block)
            yield slice(s, e), torch.from_numpy(np.asarray(vecs[s:e], dtype=np.float64))


def _rows_of(store: Any, name: str) -> Any:
    """The slice's rows ``[n, D]``: the store's row source (:meth:`SketchStore.rows`), else ``vectors``."""
    rows = getattr(store, "rows", None)
    return rows(name) if callable(rows) else store.vectors(name)


def open_run(store: Any) -> Run:
    """Resolve a store object, a store directory or a GradientSketch run directory into a :class:`Run`."""
    root: Path | None
    if isinstance(store, (str, Path)):
        path = Path(store)
        if not path.exists():
            raise StoreNotFoundError(f"No store or run directory at {str(path)!r}; check the path.")
        if (path / STORE_DIR).is_dir():
            root, st = path, SketchStore.open(path / STORE_DIR)
        else:
            root, st = path.parent, SketchStore.open(path)
    else:
        st = store
        root = Path(store.path).parent if getattr(store, "path", None) is not None else None
    weights = None if root is None else root / WEIGHTS_DIR
    cks = _checkpoints(st)
    return Run(
        store=st,
        root=root,
        weights_dir=weights if weights is not None and weights.is_dir() else None,
        names=[c["name"] for c in cks],
        lrs={c["name"]: _lr(c) for c in cks},
        steps={c["name"]: None if c.get("step") is None else int(c["step"]) for c in cks},
    )


def _lr(entry: dict[str, Any]) -> float | None:
    lr = entry.get("lr")
    return None if lr is None else float(lr)


def negative_margin_of(model: nn.Module) -> LossFn:
    """``loss_fn`` returning −``module.per_example_margin(batch)`` (TRAK's query output, negated)."""
    margin = module_loss_fn(model, method="per_example_margin")
    return lambda module, batch: -margin(module, batch)


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


def _checkpoints(store: Any) -> list[dict[str, Any]]:
    manifest = store.manifest
    return list(manifest["checkpoints"]) if isinstance(manifest, dict) else list(manifest.checkpoints)


def _sketch_and_layout(store: Any, model: nn.Module) -> tuple[Any, Any]:
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


def load_weights(run: Run, name: str, layout: Any) -> dict[str, Tensor] | None:
    """The state saved at slice ``name``, verified against the store (``None`` when none were saved).

    ``{name: tensor}``: the layout's parameters, and (runs written since buffers are saved) every
    other trainable parameter and every persistent buffer of the model.

    Weights recorded in the store's manifest are read through ``store.load_weights`` (checksum,
    slice name and layout fingerprint checked, no pickle). A ``weights_dir`` the user named
    explicitly is read with the safe ``weights_only`` loader. A ``.pt`` file in the run's
    ``weights/`` that the manifest does not record is refused.

    Raises:
        StoreCorruptError: for an unrecorded or damaged weights file.
        LayoutMismatchError: when the saved names or shapes differ from the layout.
    """
    path = None if run.weights_dir is None else run.weights_dir / f"{name}.pt"
    if run.explicit_weights:  # a folder the user named: loaded safely, checked against the layout below
        saved = load_torch_file(path, what="weights file") if path is not None and path.exists() else None
    elif hasattr(run.store, "has_weights") and run.store.has_weights(name):
        saved = run.store.load_weights(name, layout.fingerprint())
    elif path is not None and os.path.lexists(path):
        raise StoreCorruptError(
            f"Weights file {path} is not recorded in the store's manifest, so it was not written by this run "
            f"(or the manifest lost its record); it is refused. Re-run with save_weights=True, or pass "
            f"`weights_dir` explicitly if you trust the file."
        )
    else:
        return None
    if saved is None:
        return None
    shapes = dict(zip(layout.names, layout.shapes))
    if not isinstance(saved, dict) or not set(shapes) <= set(saved) or any(
        tuple(saved[n].shape) != tuple(shapes[n]) for n in shapes
    ):
        raise LayoutMismatchError(
            f"Saved weights of checkpoint {name!r} hold parameters {sorted(saved)[:5]}... (names or "
            "shapes) that "
            f"differ from the model's layout; use the architecture the run was trained with."
        )
    return saved


@contextmanager
def swapped_weights(model: nn.Module, saved: dict[str, Tensor] | None) -> Iterator[None]:
    """Temporarily copy ``saved`` into the model's parameters and buffers (restored on exit, even
    on error), so that eval mode uses the slice's BatchNorm statistics, not the current ones.

    Raises:
        LayoutMismatchError: a saved name the model has no parameter or buffer of, or a shape differs.
    """
    if saved is None:
        yield
        return
    state: dict[str, Tensor] = {n: b for n, b in model.named_buffers() if b is not None}
    state.update(dict(model.named_parameters()))
    unknown = sorted(set(saved) - set(state))
    if unknown:
        raise LayoutMismatchError(
            f"The saved slice holds {unknown[:5]} ({len(unknown)} parameter(s) or buffer(s)) that the model "
            "does not have; pass a model of the architecture the run was trained with."
        )
    for n, t in saved.items():
        if tuple(t.shape) != tuple(state[n].shape):
            raise LayoutMismatchError(
                f"Saved weight {n!r} has shape {tuple(t.shape)}, the model {tuple(state[n].shape)}."
            )
    backup = {n: state[n].detach().clone() for n in saved}
    try:
        with torch.no_grad():
            for n, t in saved.items():
                state[n].copy_(t)
        yield
    finally:
        with torch.no_grad():
            for n, t in backup.items():
                state[n].copy_(t)


def union_ids(runs: Sequence[Run], names: Sequence[Sequence[str]]) -> np.ndarray:
    """Sorted union of the example ids over the given runs and their slices."""
    parts = [run.ids(n) for run, ns in zip(runs, names) for n in ns]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def probe_batch(saved: dict[str, Tensor]) -> tuple[Tensor, Any]:
    """``(ids [k], batch or None)`` from a probe record (the inverse of the callback's encoding:
    ``batch.tensor``, ``batch.dict.<key>``, ``batch.tuple.<i>``, ``batch.list.<i>``).

    Raises:
        StoreCorruptError: the record holds no ``ids`` or an unknown key.
    """
    ids = saved.get("ids")
    if ids is None or ids.ndim != 1:
        raise StoreCorruptError("The probe record (weights/probe.pt) holds no 1-D `ids` tensor.")
    parts = {k: v for k, v in saved.items() if k != "ids"}
    if not parts:
        return ids, None
    if set(parts) == {"batch.tensor"}:
        return ids, parts["batch.tensor"]
    split = [k.split(".", 2) for k in parts]
    kinds = {p[1] for p in split if len(p) == 3 and p[0] == "batch"}
    bad = len(kinds) != 1 or any(len(p) != 3 for p in split) or not kinds <= {"dict", "tuple", "list"}
    kind = kinds.pop() if not bad else ""
    if kind == "dict":
        return ids, {p[2]: v for p, v in zip(split, parts.values())}
    if not bad and all(p[2].isdigit() for p in split) and sorted(int(p[2]) for p in split) == list(
        range(len(split))
    ):
        items = [parts[f"batch.{kind}.{i}"] for i in range(len(split))]
        return ids, tuple(items) if kind == "tuple" else items
    raise StoreCorruptError(f"The probe record (weights/probe.pt) holds unknown entries {sorted(parts)[:5]}.")


def verify_runs(
    runs: Sequence[Run],
    models: Sequence[nn.Module],
    sketches: Sequence[Any],
    layouts: Sequence[Any],
    loss_fn: LossFn,
    checkpoints: Sequence[str],
    *,
    current_weights: bool = False,
    rtol: float = VERIFY_RTOL,
    captures: Sequence[GradientCapture | None] | None = None,
) -> None:
    """Check that each run's model reproduces the stored rows of the run's probe examples.

    A checkpoint-mode run keeps the ids and inputs of a few training examples (``weights/probe.pt``);
    at every slice in use their sketched loss gradients are recomputed as a query would be (the
    slice's saved parameters and buffers swapped in, eval mode) and compared with their stored rows.
    A model that is not the trained architecture (other frozen weights, other non-persistent
    buffers), another ``loss_fn`` or another sketch would otherwise give silently wrong scores.

    Skipped, with one info line: runs without a probe (written before probes were kept, inline
    runs, ``save_weights=False``), probes holding only ids (inputs that are not tensors), and
    ``current_weights=True`` (the slices are then not queried at their own weights). Inline slices
    (rows weighted by the step's learning rate, in train mode) are never compared.

    Raises:
        SliceMismatchError: the relative error over the probe examples exceeds ``rtol`` at a slice.
    """
    if current_weights:
        log.info("Attributor: current_weights=True, so the stored slices are not verified against the model.")
        return
    if captures is None:
        captures = [hook_capture(m, s, lay) for m, s, lay in zip(models, sketches, layouts)]
    for run, model, sketch, layout, cap in zip(runs, models, sketches, layouts, captures):
        where = str(run.root) if run.root is not None else "the given store"
        has = getattr(run.store, "has_weights", None)
        if has is None or not has(PROBE):
            log.info(
                "Attributor: run %s keeps no probe examples (weights/probe.pt; written by checkpoint-mode "
                "GradientSketch runs with save_weights=True), so its slices are not verified against "
                "the model.",
                where,
            )
            continue
        ids, batch = probe_batch(run.store.load_weights(PROBE))
        if batch is None:
            log.info("Attributor: the probe of run %s holds ids only (inputs that are not tensors); "
                     "its slices are not verified against the model.", where)
            continue
        info = {c["name"]: c for c in _checkpoints(run.store)}
        for name in checkpoints:
            if info.get(name, {}).get("lr_weighted"):
                continue
            _verify_slice(run, name, model, sketch, layout, loss_fn, ids, batch, rtol, where, cap)


def _verify_slice(run: Run, name: str, model: nn.Module, sketch: Any, layout: Any, loss_fn: LossFn,
                  ids: Tensor, batch: Any, rtol: float, where: str, cap: GradientCapture | None) -> None:
    stored_ids = run.ids(name)
    pos = {int(i): p for p, i in enumerate(stored_ids)}
    keep = [j for j, i in enumerate(ids.tolist()) if int(i) in pos]
    if not keep:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sub = pytree.tree_map(lambda v: v[keep].to(device) if isinstance(v, Tensor) else v, batch)
    rows = np.asarray(_rows_of(run.store, name)[[pos[int(ids[j])] for j in keep]], dtype=np.float64)
    stored = torch.from_numpy(rows)
    saved = load_weights(run, name, layout)
    with swapped_weights(model, saved), eval_mode(model), torch.enable_grad():
        got = sketch_gradients(model, loss_fn, sub, sketch, mode="auto", layout=layout, capture=cap)
    got = got.detach().to("cpu", torch.float64)
    err = float((got - stored).norm()) / max(float(stored.norm()), 1e-30)
    if not err <= rtol:  # NaN fails too
        raise SliceMismatchError(
            f"The model given to Attributor does not reproduce the stored gradients of run {where} at slice "
            f"{name!r}: recomputed for {len(keep)} of its training examples (ids {ids[keep].tolist()}), they "
            f"differ from the stored rows by a relative error of {err:.3g} (tolerance {rtol:g}), so every "
            "score would be wrong. Pass the model the run was trained with (the same architecture, the "
            "same frozen weights and buffers: the run restores only trainable parameters and persistent "
            "buffers), the same loss_fn as GradientSketch and the same include=/exclude=. A per-example "
            "loss that depends on the other examples of its batch (a normaliser of the whole batch inside "
            "per_example_loss or loss_fn) gives this too: make each example's loss its own. "
            "Attributor(..., verify=False) skips this check."
        )
