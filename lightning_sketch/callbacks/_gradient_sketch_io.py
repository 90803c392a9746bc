"""Private helpers of :mod:`lightning_sketch.callbacks.gradient_sketch` (store opening, weights, modes)."""

from __future__ import annotations

import os
from collections.abc import Sized
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_sketch.exceptions import SketchConfigError, SketchInputError
from lightning_sketch.sketches import KINDS
from lightning_sketch.store import SketchStore


# ---------------------------------------------------------------------- helpers
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

    def close(self) -> None:
        self.shard.close()
        self.main.close()


def _current_lr(trainer: Trainer) -> float:
    opts = trainer.optimizers
    return float(opts[0].param_groups[0]["lr"]) if opts else 1.0


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
    if kind not in KINDS:
        raise SketchConfigError(f"`sketch_kind` must be one of {sorted(KINDS)}, got {kind!r}.")
    for name, pats in (("include", include), ("exclude", exclude)):
        if pats is None:
            continue
        if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
            raise SketchConfigError(
                f"`{name}` must be None or a list of fnmatch patterns (str), got {pats!r}; "
                f"write [{pats!r}] for one."
            )
    if not isinstance(id_key, str):
        raise SketchConfigError(
            f"`id_key` must be a str (the batch entry holding example ids), got {id_key!r}."
        )
    if not isinstance(save_weights, bool):
        raise SketchConfigError(f"`save_weights` must be a bool, got {save_weights!r}.")


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
