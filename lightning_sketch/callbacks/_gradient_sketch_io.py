"""Private helpers of :mod:`lightning_sketch.callbacks.gradient_sketch` (store opening, weights, modes)."""

from __future__ import annotations

import ast
import os
from collections.abc import Sized
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn

from lightning_sketch._checks import boolean, one_of, str_list, string
from lightning_sketch.exceptions import SketchConfigError, SketchInputError, StoreNotFoundError
from lightning_sketch.sketches import KINDS
from lightning_sketch.store import SketchStore
from lightning_sketch.store.manifest import MANIFEST

#: training examples whose inputs a checkpoint-mode run keeps in ``weights/probe.pt`` so that the
#: Attributor can check that the model it is given reproduces their stored rows.
PROBE_EXAMPLES = 4


# ---------------------------------------------------------------------- helpers
def _state_ident(key: Any) -> dict[str, Any] | None:
    """The fields of a ``GradientSketch{...}`` state key, or None for another callback's key.

    Both key forms parse: ``{'name', 'mode', 'sketch_kind'}`` and the absolute-path form
    ``{'dirpath', 'mode', 'sketch_kind'}`` that older checkpoints hold.
    """
    prefix = "GradientSketch"
    if not isinstance(key, str) or not key.startswith(prefix + "{"):
        return None
    try:
        fields = ast.literal_eval(key[len(prefix):])
    except (ValueError, SyntaxError):
        return None
    if not isinstance(fields, dict) or not {"mode", "sketch_kind"} <= fields.keys():
        return None
    return fields


def _adopt_state(states: dict[Any, Any], cb: Any) -> None:
    """File the callback's state under ``cb.state_key`` when the checkpoint holds it under another key.

    Lightning looks a callback's state up by its exact ``state_key``. A checkpoint can hold this
    callback's state under another one: written with the absolute-dirpath key, or by a run whose
    sketch directory has another name. Among the GradientSketch entries of the same mode and sketch
    kind, the one written for this very dirpath is taken, else the one whose directory has the same
    name, else the only one; when the choice is ambiguous nothing is moved (no state is guessed).
    """
    if cb.state_key in states:
        return
    same = [(k, f) for k, f in ((k, _state_ident(k)) for k in states)
            if f is not None and f["mode"] == cb.mode and f["sketch_kind"] == cb.sketch_kind]
    name = Path(cb.dirpath).name
    for pick in (
        [k for k, f in same if f.get("dirpath") == cb.dirpath],
        [k for k, f in same if Path(str(f.get("dirpath", ""))).name == name or f.get("name") == name],
        [k for k, _ in same],
    ):
        if len(pick) == 1:
            states[cb.state_key] = states.pop(pick[0])
            return
        if pick:
            return


def _store_gone(cb: Any, trainer: Trainer, dir_created: bool) -> StoreNotFoundError:
    """Remove the empty store this setup created in place of the run's missing one; the error to raise.

    Only the manifest written by ``setup`` goes, and the directory if ``setup`` created it and it
    holds nothing else than its released writer lock, so that restoring the run's store does not
    land on top of an empty one.
    """
    path = cb.store_path
    if cb.store is not None:
        cb.store.close()
        cb.store = None
    if trainer.is_global_zero:
        try:
            (path / MANIFEST).unlink(missing_ok=True)
            left = list(path.iterdir()) if dir_created else []
            if all(p.name == ".writer.lock" and p.is_file() for p in left):  # released by close()
                for p in left:
                    p.unlink()
                if dir_created:
                    path.rmdir()
        except OSError:
            pass  # left as it is: the error below is what matters
    return StoreNotFoundError(
        f"GradientSketch resumes from a checkpoint that records rows committed to the store "
        f"{str(path)!r}, but no store is there (no {MANIFEST}): the run's store was deleted, or not "
        f"copied or moved with the run. Restore that store directory, or start a fresh run without "
        f"`ckpt_path` (with a new dirpath)."
    )


def _open_store(cb: Any, trainer: Trainer) -> Any:
    kwargs = {"spec": cb.sketch.spec, "layout": cb.layout, "dtype": cb.dtype, "nan_policy": cb.nan_policy}
    if trainer.world_size == 1:
        return SketchStore.create(cb.store_path, exist_ok=True, **kwargs)
    if trainer.is_global_zero:
        store = SketchStore.create(cb.store_path, exist_ok=True, **kwargs)
    trainer.strategy.barrier("gradient_sketch_create")
    shard = SketchStore.open_shard(cb.store_path, rank=trainer.global_rank, spec=cb.sketch.spec,
                                   layout_fingerprint=cb.layout.fingerprint())
    return shard if not trainer.is_global_zero else _RankZero(store, shard)


class _RankZero:
    """Rank 0 under DDP: writes its rows to its shard like every rank, merges into the main store."""

    def __init__(self, main: Any, shard: Any) -> None:
        self.main, self.shard = main, shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shard, name)

    def rollback(self, generation: int) -> None:
        self.shard.rollback(generation)

    def merge_shards(self) -> None:
        self.main.merge_shards()
        if self.main.resume_point is None:  # a finished run's merged rows are never orphans
            self.main.mark_resume_point()

    def save_weights(self, *args: Any, **kwargs: Any) -> Any:
        return self.main.save_weights(*args, **kwargs)  # recorded in the main store, committed at the merge

    def record_curvature(self, *args: Any, **kwargs: Any) -> None:
        self.main.record_curvature(*args, **kwargs)  # curvature files are the main store's, like weights

    def check_writer(self) -> None:
        self.main.check_writer()

    def has_weights(self, name: str) -> bool:
        return bool(self.main.has_weights(name))

    def close(self) -> None:
        self.shard.close()
        self.main.close()


def _current_lr(trainer: Trainer) -> float:
    opts = trainer.optimizers
    return float(opts[0].param_groups[0]["lr"]) if opts else 1.0


def _slice_state(module: nn.Module, layout: Any) -> dict[str, Tensor]:
    """What a slice needs to be recomputed later: the sketched parameters, every other trainable
    parameter (their values shape the sketched gradients too) and every persistent buffer
    (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``, which eval mode uses).

    Frozen parameters are left out (training does not change them); non-persistent buffers too
    (they are not part of the module's state).
    """
    out: dict[str, Tensor] = dict(layout.params(module))
    for name, p in module.named_parameters():
        if p.requires_grad:
            out.setdefault(name, p)
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out.setdefault(f"{prefix}.{name}" if prefix else name, buf)
    return out


def _probe_batch(batch: Any, ids: Tensor, size: int = PROBE_EXAMPLES) -> dict[str, Tensor]:
    """The first ``size`` examples of a batch as a flat dict of CPU tensors (``weights/probe.pt``).

    ``ids`` always; the inputs too when the batch is a tensor, or a dict / tuple / list of tensors
    sharing the leading dimension B, encoded as ``batch.tensor``, ``batch.dict.<key>``,
    ``batch.tuple.<i>`` or ``batch.list.<i>`` (:func:`lightning_sketch.attribution._stored.probe_batch`
    rebuilds it). Anything else (strings, nested structures) cannot be stored as tensors: ids only.
    """
    n = int(ids.shape[0])
    k = min(size, n)
    out = {"ids": ids[:k].detach().cpu().clone()}
    if isinstance(batch, Tensor):
        items: list[tuple[str, Any]] = [("batch.tensor", batch)]
    elif isinstance(batch, dict) and all(isinstance(key, str) for key in batch):
        items = [(f"batch.dict.{key}", v) for key, v in batch.items()]
    elif isinstance(batch, (tuple, list)):
        kind = "tuple" if isinstance(batch, tuple) else "list"
        items = [(f"batch.{kind}.{i}", v) for i, v in enumerate(batch)]
    else:
        return out
    if not items or not all(isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n for _, v in items):
        return out
    out.update({key: v[:k].detach().cpu().clone() for key, v in items})
    return out


def _save_weights(store: Any, path: Path, params: dict[str, Tensor], layout_fingerprint: str) -> None:
    """Write ``path`` (``<weights dir>/<slice>.pt``) atomically and record it in the store's manifest.

    The record (size, sha256, layout fingerprint) is committed with the slice's rows, so the
    reader (:meth:`~lightning_sketch.store.SketchStore.load_weights`) refuses a flipped,
    truncated, swapped or foreign file.
    """
    store.save_weights(path.stem, params, path.parent, layout_fingerprint=layout_fingerprint)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _rng_guard:
    """Fork the global CPU (and CUDA) RNG streams so that nothing we run can advance them."""

    _ctx: AbstractContextManager[Any]

    def __enter__(self) -> None:
        self._ctx = torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None)
        self._ctx.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ctx.__exit__(exc_type, exc, tb)


def _check_types(dirpath: Any, kind: Any, include: Any, exclude: Any, id_key: Any, save_weights: Any) -> None:
    """Type checks of ``GradientSketch.__init__`` arguments (raise SketchConfigError naming the argument)."""

    if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
        raise SketchConfigError(f"`dirpath` must be a non-empty path string, got {dirpath!r}.")
    one_of("sketch_kind", kind, sorted(KINDS))
    for name, pats in (("include", include), ("exclude", exclude)):
        str_list(name, pats, allow_none=True, hint=f"Patterns are fnmatch strings; write [{pats!r}] for one.")
    string("id_key", id_key, hint="Name the batch entry holding example ids.")
    boolean("save_weights", save_weights)


def _check_no_padding(loader: Any) -> None:
    """Inline mode under DDP: refuse a DistributedSampler that pads (an id on two ranks breaks the merge)."""
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return
    # DistributedSampler takes len() of its dataset when it is built, so the dataset is sized here
    n, world = len(cast(Sized, sampler.dataset)), sampler.num_replicas
    if n % world:
        raise SketchConfigError(
            f"GradientSketch(mode='inline') under DDP: the DistributedSampler pads the {n} training examples "
            f"to {sampler.total_size} for {world} ranks, so {sampler.total_size - n} example id(s) would be "
            f"sketched on two ranks in one epoch and the shard merge would fail. Use a training set whose "
            f"size is divisible by the world size, or Trainer(use_distributed_sampler=False) with "
            f"DistributedSampler(..., drop_last=True)."
        )


def _as_ids(ids: Any) -> Tensor:
    """``[B]`` int64 example ids; floating or bool ids raise SketchInputError (a cast would merge
    examples)."""

    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise SketchInputError(
            f"`ids_fn` must return integer example ids [B], got dtype {ids.dtype}; casting would silently "
            f"merge examples (0.5 -> 0). Return the dataset indices as an int64 tensor."
        )
    return ids.to(torch.long)
