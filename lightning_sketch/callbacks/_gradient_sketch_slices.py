"""Checkpoint mode of :class:`~lightning_sketch.callbacks.gradient_sketch.GradientSketch` (private component).

A slice ``step-<global_step>``: the sketched per-example gradients of the whole attribution set at the
current weights, in eval mode, with the current learning rate; then, unless ``curvature="none"``, one
extra pass for the ``[D, D]`` curvature kernel of the slice (TRAK's margin kernel or a Fisher).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_sketch.attribution._stored import PROBE
from lightning_sketch.attribution.curvature import LossFn, accumulate_fisher, write_curvature
from lightning_sketch.attribution.task import AttributionTask, resolve_task
from lightning_sketch.callbacks._gradient_sketch_base import _GradientSketchBase
from lightning_sketch.callbacks._gradient_sketch_io import (
    _current_lr,
    _probe_batch,
    _rng_guard,
    _save_weights,
    _slice_state,
    _to_device,
)
from lightning_sketch.callbacks._progress import progress_iter as _progress
from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients import eval_mode as _eval_mode
from lightning_sketch.gradients.sharded import gathered
from lightning_sketch.sketches import derive_seed


class _CheckpointSlices:
    """Checkpoint-mode slices of the attribution set, with their curvature pass."""

    def __init__(self, host: _GradientSketchBase) -> None:
        self.host = host
        self._task: AttributionTask | None = None  # resolved on the first slice's curvature pass
        #: checkpoint mode: the first examples of the attribution set, saved once as ``weights/probe.pt``.
        self._probe: dict[str, Tensor] | None = None
        #: checkpoint mode sketches no training step: no step is dropped for a scaler overflow
        self.skipped_overflow_steps = 0

    def setup(self) -> None:
        """A new fit resolves its task again and takes its probe examples again."""
        self._task = None
        self._probe = None

    def fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing: the attribution set is sketched at the slices, with the hook paths of the fit."""

    def resumed(self, trainer: Trainer) -> None:
        """Nothing: the rollback dropped the slices taken after the checkpoint; they are taken again."""

    def train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_checks(trainer, pl_module)  # the hook paths, fallback refusals and the task

    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Nothing: the trained batches are not sketched."""

    def after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing: the training backward is not captured."""

    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        host = self.host
        step = trainer.global_step
        if host.every_n_steps is not None and step % host.every_n_steps == 0 and step > host._last_step_done:
            self._take_slice(trainer, pl_module)

    def epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._due_epoch(trainer) and trainer.global_step > self.host._last_step_done:
            self._take_slice(trainer, pl_module)

    def close(self) -> None:
        """Nothing: no capture outlives a slice's pass."""

    def _due_epoch(self, trainer: Trainer) -> bool:
        host = self.host
        n = host.every_n_epochs  # an int whenever every_n_steps is None: __init__ resolves None to 1 then
        return (
            host.every_n_steps is None
            and n is not None
            and (trainer.current_epoch + 1) % n == 0
        )

    def _take_slice(self, trainer: Trainer, pl_module: LightningModule) -> None:
        host = self.host
        step = trainer.global_step
        name = f"step-{step}"
        host.store.add_checkpoint(name, step=step, lr=_current_lr(trainer), weight=None,
                                  epoch=trainer.current_epoch)
        loader = self._attribution_loader(trainer)
        loss_fn = host._loss_fn(pl_module)
        bar = _progress(trainer, loader, f"GradientSketch {name}")
        seen = 0
        # gathered: under FSDP2 one all-gather per pass, then plain whole parameters and no collective
        with gathered(pl_module), _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            cap = host._slice_capture(pl_module)
            for batch in bar:
                device_batch = _to_device(batch, pl_module.device)
                rows = host._sketch_rows(pl_module, loss_fn, device_batch, cap)
                ids = self._slice_ids(batch, seen, len(rows), trainer)
                if self._probe is None and host.save_weights and trainer.is_global_zero:
                    self._probe = _probe_batch(batch, ids)
                host._writer.append(host.store, ids, rows, name, trainer)
                seen += len(rows)
        if not seen:
            rank_zero_warn(
                f"GradientSketch: the attribution set is empty; checkpoint {name!r} holds no rows."
            )
        if host.curvature != "none":
            self._gather_curvature(trainer, pl_module, name, loader, loss_fn)
        self._finish_slice(trainer, pl_module, name, step)

    def _gather_curvature(
        self, trainer: Trainer, pl_module: LightningModule, name: str, loader: Any, loss_fn: LossFn
    ) -> None:
        """K = Σ_t Σ_terms w φ_t φ_tᵀ over the attribution set (eval mode), φ_t the sketched gradient
        of the task's kernel functions (:mod:`lightning_sketch.attribution.task`): the margin for
        classifiers (TRAK's kernel), the prediction for regressions (Gauss–Newton), sampled
        completions for language models; the empirical Fisher when the task has none."""
        host = self.host
        seed = derive_seed(host.seed, "curvature", f"{name}/rank{trainer.global_rank}")
        gen = torch.Generator().manual_seed(seed)
        D = host.sketch.sketch_dim
        acc = torch.zeros(D, D, dtype=torch.float64)
        count = 0
        task: AttributionTask | None = None
        with gathered(pl_module), _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            cap = host._slice_capture(pl_module)
            for batch in loader:
                batch = _to_device(batch, pl_module.device)
                if task is None:
                    task = self._resolved_task(pl_module, loss_fn, batch)
                terms = task.kernel_terms(pl_module, batch, gen) if task.kernel_terms is not None else [
                    (loss_fn, batch, 1.0)]
                n_batch = 0
                for fn, term_batch, weight in terms:
                    rows = host._sketch_rows(pl_module, fn, term_batch, cap)
                    n_batch = accumulate_fisher([rows * math.sqrt(weight)], D, out=acc)[1]
                count += n_batch
        estimator = "" if task is None else task.kernel
        if trainer.world_size > 1:  # every rank saw its own share of the attribution set
            acc = trainer.strategy.reduce(acc.to(pl_module.device), reduce_op="sum").cpu()
            total = torch.tensor(float(count), device=pl_module.device)
            count = int(trainer.strategy.reduce(total, reduce_op="sum"))
        if trainer.is_global_zero:
            write_curvature(host.dirpath, name, acc, count, host.sketch.spec, estimator,
                            task=None if task is None else task.kind, store=host.store)

    def _slice_ids(self, batch: Any, offset: int, size: int, trainer: Trainer) -> Tensor:
        """The ids of a batch of the attribution set: ``ids_fn``/``batch[id_key]``; for batches that
        carry none (a plain ``TensorDataset``) and the attribution set rebuilt from the training
        set, the examples' positions in that dataset (rank r of W sketches positions r, r + W, ...)."""
        host = self.host
        if host.ids_fn is None and host.attribution_dataloader is None and not (
            isinstance(batch, Mapping) and host.id_key in batch
        ):
            local = torch.arange(offset, offset + size, dtype=torch.long)
            return trainer.global_rank + trainer.world_size * local
        return host._ids(batch)

    def _start_checks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """On the first batch of the attribution set, before training (eval mode, no RNG stream
        advances): sketch it once (rows discarded), so that a model the hook paths cannot serve (a
        packed sequence into a recurrent layer, a failing per-module fallback) is refused, and one
        they would serve wrongly (a layer that is not batch-first) is checked against autograd and
        sent to ``torch.func``, at the start of fit, not after the first epoch; and decide the
        attribution task, so that it is said at the start of fit."""
        host = self.host
        loss_fn = host._loss_fn(pl_module)
        with gathered(pl_module), _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            for batch in self._attribution_loader(trainer):
                batch = _to_device(batch, pl_module.device)
                if host._hooks:
                    host._sketch_rows(pl_module, loss_fn, batch, host._slice_capture(pl_module))
                if host.curvature != "none":
                    self._resolved_task(pl_module, loss_fn, batch)
                break

    def _resolved_task(self, pl_module: LightningModule, loss_fn: LossFn, batch: Any) -> AttributionTask:
        """The attribution task, decided once per fit on the first batch and said once (rank zero)."""
        host = self.host
        if self._task is None:
            task = host.task if host.task is not None else resolve_task(pl_module, batch, loss_fn)
            if host.curvature == "fisher":
                task = task.as_fisher()
            self._task = task
            no_margin = host.curvature == "margin" and not task.kernel.startswith("margin")
            if task.kernel == "empirical" or no_margin:
                rank_zero_warn(f"GradientSketch: {task.describe()}.")
            else:
                rank_zero_info(f"GradientSketch: {task.describe()}.")
        return self._task

    def _finish_slice(self, trainer: Trainer, pl_module: LightningModule, name: str, step: int) -> None:
        host = self.host
        if name not in host._slices:
            host._slices.append(name)
        host._last_step_done = step
        if host.save_weights and trainer.is_global_zero:
            fp = host.layout.fingerprint()
            state = _slice_state(pl_module, host.layout)
            _save_weights(host.store, host.weights_path / f"{name}.pt", state, fp)
            if self._probe is not None and not host.store.has_weights(PROBE):
                # written once per run: the examples are the same at every slice of the attribution set
                _save_weights(host.store, host.weights_path / f"{PROBE}.pt", self._probe, fp)
        host._commit(trainer)

    def _attribution_loader(self, trainer: Trainer) -> Any:
        host = self.host
        if host.attribution_dataloader is not None:
            return host.attribution_dataloader
        train = trainer.train_dataloader
        if isinstance(train, DataLoader):
            dataset, batch_size, collate = train.dataset, train.batch_size, train.collate_fn
        else:
            raise SketchConfigError(
                "GradientSketch cannot rebuild the attribution set from a non-DataLoader train loader "
                f"({type(train).__name__}); pass `attribution_dataloader`."
            )
        if trainer.world_size > 1:  # each rank sketches its own share, ids stay global
            # Subset by position needs a sized, map-style dataset (len() raises otherwise, as it always did)
            n = len(cast(Sized, dataset))
            dataset = Subset(dataset, list(range(trainer.global_rank, n, trainer.world_size)))
        return DataLoader(dataset, batch_size=batch_size or 1, shuffle=False, drop_last=False,
                          collate_fn=collate)
