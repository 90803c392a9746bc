"""Inline mode of :class:`~lightning_sketch.callbacks.gradient_sketch.GradientSketch` (private component).

The per-example gradients of each trained batch, taken from the training backward by
:class:`~lightning_sketch.gradients.GradientCapture` hooks (or, for parameters no hook sees, by vmap
over the whole model before the step), weighted by the step's learning rate and buffered into the
slice ``epoch-<e>``; the buffer is flushed at every epoch end and committed with Lightning checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_sketch.callbacks._gradient_sketch_base import _GradientSketchBase, _vmap_guard
from lightning_sketch.callbacks._gradient_sketch_io import (
    _check_no_padding,
    _current_lr,
    _rng_guard,
    _save_weights,
    _slice_state,
)
from lightning_sketch.exceptions import SketchInputError
from lightning_sketch.gradients import GradientCapture, sketch_gradients
from lightning_sketch.gradients import eval_mode as _eval_mode
from lightning_sketch.gradients.sharded import gathered, whole

#: inline mode commits early once this many bytes of rows are buffered.
_INLINE_BUFFER_BYTES = 256 * 2**20


class _InlineRows:
    """Inline-mode per-step hooks and the per-epoch slice they buffer into."""

    def __init__(self, host: _GradientSketchBase) -> None:
        self.host = host
        self._capture: Any = None
        #: inline steps whose rows were dropped because the 16-bit gradient scaler overflowed
        #: (the optimizer skips those steps too).
        self.skipped_overflow_steps = 0
        self._scaler: Any = None
        self._checked_sum = False
        #: rows from the training backward (the hook paths serve the model), decided in fit_start
        self._inline_fast = False
        # per training step (set in batch_start)
        self._lr = 1.0
        self._pending_rows: Tensor | None = None
        self._batch_ids: Tensor | None = None
        self._capture_tool: Any = None

    def setup(self) -> None:
        """Nothing to forget: ``fit_start`` and ``batch_start`` set what this mode decides per fit."""

    def fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        host = self.host
        self._inline_fast = host._hooks  # rows from the training backward
        if self._inline_fast:
            self._capture_tool = GradientCapture(pl_module, host.sketch, host.layout)
            self._scaler = getattr(trainer.precision_plugin, "scaler", None)

    def resumed(self, trainer: Trainer) -> None:
        host = self.host
        if host._slices and host._slices[-1] in host.store.checkpoints:
            # Lightning replays batches only of the epoch the checkpoint was saved in: the last slice
            last = host._slices[-1]
            host._writer.expect_replays(last, np.unique(host.store.ids(last)))

    def train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            _check_no_padding(trainer.train_dataloader)

    def _inline_slice(self, trainer: Trainer) -> str:
        host = self.host
        name = f"epoch-{trainer.current_epoch}"
        if not host._slices or host._slices[-1] != name:
            host.store.add_checkpoint(name, step=None, lr=1.0, weight=None, lr_weighted=True,
                                      epoch=trainer.current_epoch)
            if name not in host._slices:
                host._slices.append(name)
        return name

    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        host = self.host
        self._lr = _current_lr(trainer)
        self._pending_rows = None
        self._batch_ids = host._ids(batch)
        if host._hooks and host._hooks_exact is None:
            self._check_hooks(pl_module, batch)
        if host._hooks:
            self._capture = self._capture_tool
            self._capture.batch_size = int(self._batch_ids.shape[0])
            if not self._capture._probed:  # embeddings shared by the batch (positions): decided once
                with gathered(pl_module), _rng_guard():
                    self._capture.probe(host._loss_fn(pl_module), batch)
            self._capture.__enter__()
            return

        # Parameters no hook sees (parametrised models): per-example gradients of this batch at this
        # step's weights by vmap over the whole model, before the step, in eval mode.
        with gathered(pl_module), _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            self._pending_rows = _vmap_guard(lambda: sketch_gradients(
                pl_module, host._loss_fn(pl_module), batch, host.sketch, mode="explicit", layout=host.layout,
                chunk_size=host.chunk_size,
            ), host.support, host.exclude) * self._lr

    def _check_hooks(self, pl_module: LightningModule, batch: Any) -> None:
        """Once per fit, before the first captured step: the hook paths against autograd on this
        batch (eval mode, RNG forked, rows discarded; ``gradients._capture_check``). A model they
        cannot serve exactly (a layer that is not batch-first) takes the vmap path instead."""
        host = self.host
        with gathered(pl_module), _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            host._sketch_rows(pl_module, host._loss_fn(pl_module), batch, host._slice_capture(pl_module))
        if host._hooks_exact is False:
            host._hooks = self._inline_fast = False
            self._capture_tool = None

    def after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is None:
            return
        cap, self._capture = self._capture, None
        cap.__exit__(None, None, None)
        scale = float(trainer.accumulate_grad_batches)
        if self._scaler is not None:  # 16-mixed: the backward ran on the scaled loss
            scale /= float(self._scaler.get_scale())
        check = not self._checked_sum and trainer.accumulate_grad_batches == 1  # the same on every rank
        rows: Tensor | None
        try:
            # One multiplication of the [B, D] rows: B (mean loss), accumulation, 1/scaler and, except on
            # the first step (whose unweighted rows are checked against .grad), the learning rate.
            rows = cap.sketches(scale=scale if check else scale * self._lr)
        except SketchInputError:
            rank_zero_warn(
                "GradientSketch inline: the backward of this step reached no hooked module, so no rows were "
                "written for it; inline mode needs the training loss to be computed from the module's "
                "forward with gradients enabled."
            )
            rows = None
        overflow = rows is not None and self._scaler is not None and not bool(torch.isfinite(rows).all())
        if overflow:
            self.skipped_overflow_steps += 1  # the scaler skips this optimizer step as well
        usable = rows is not None and not overflow
        if check:
            # The check runs collectives (a reduce, the all-gather of sharded .grad): every rank must take
            # it at the same step, so one decision is made for all of them, before any rank returns.
            if trainer.world_size > 1:
                flag = torch.tensor(1.0 if usable else 0.0, device=pl_module.device)
                usable_everywhere = float(trainer.strategy.reduce(flag, reduce_op="min")) > 0.5
            else:
                usable_everywhere = usable
            if usable_everywhere and rows is not None:  # rows is not None on every rank then
                self._checked_sum = True
                self._check_rows_sum(pl_module, rows, 1.0 if self._scaler is None else scale)
        if not usable or rows is None:
            self._pending_rows = None
            return
        self._pending_rows = rows * self._lr if check else rows  # weighted by this step's learning rate

    def _check_rows_sum(self, pl_module: LightningModule, rows: Tensor, grad_scale: float) -> None:
        """First step: the mean of the rows must be the sketch of the batch gradient in ``.grad``
        (the sketch is linear). A gap means a parameter is used outside the module that owns it
        (invisible to hooks) or the training loss is not the mean of ``per_example_loss``."""
        host = self.host
        own = dict(pl_module.named_parameters())
        got = rows.mean(0)
        trainer = pl_module.trainer
        if trainer.world_size > 1:  # DDP and FSDP2 average .grad over the ranks (equal local batches)
            got = trainer.strategy.reduce(got, reduce_op="mean")
        blocks = getattr(host.sketch, "blocks", None)
        # (name, sketch of its .grad, mean of its rows, mean norm of its per-example rows)
        parts: list[tuple[str, Tensor, Tensor, float]] = []
        if blocks is None:
            grads: dict[str, Tensor] = {}
            for n in host.layout.names:
                p = own[n]  # whole(): under FSDP2 .grad is the rank's DTensor shard
                # a DTensor's shape is its global shape: a zero gradient needs no collective
                grads[n] = whole(p.grad) if p.grad is not None else torch.zeros(
                    p.shape, dtype=p.dtype, device=p.device)
            flat = host.layout.flatten({n: g.detach().to(rows.dtype) * grad_scale for n, g in grads.items()})
            parts.append(("all sketched parameters", host.sketch.apply(flat), got,
                          float(rows.norm(dim=1).mean())))
        else:  # per_layer: each block's sketch L G Rᵀ of its own .grad, with no N-long copy of the gradient
            for b in blocks:
                name, sl = host.layout.names[b.index], slice(b.out_offset, b.out_offset + b.out_dim)
                size = float(rows[:, sl].norm(dim=1).mean())
                g = own[name].grad
                if g is None:
                    parts.append((name, torch.zeros_like(got[sl]), got[sl], size))
                    continue
                g = whole(g).detach().to(rows.dtype)
                L, R = host.sketch.factors(b, g)
                ref = L @ g.reshape(-1) if R is None else (L @ g.reshape(b.rows, b.cols) @ R.T).reshape(-1)
                parts.append((name, ref * grad_scale, got[sl], size))
        # The gap is measured against the batch gradient, and against the size of the per-example
        # rows it averages: a batch gradient that cancels to ~0 (a conv bias before train-mode
        # BatchNorm, whose per-example contributions sum to zero) leaves only their rounding.
        bad = [n for n, r, g, size in parts
               if float((r - g).norm()) > 0.05 * float(r.norm()) + 1e-3 * size + 1e-12]
        if bad:
            rank_zero_warn(
                f"GradientSketch inline: the captured per-example gradients of {bad[:8]} do not add up to "
                f"the batch gradient in .grad. Either the training loss is not the mean of per_example_loss "
                f"over the batch, or these parameters are used outside the forward of the module that owns "
                f"them (invisible to hooks; tie weights by sharing the Parameter between modules instead). "
                f"Leave them out with GradientSketch(..., exclude=[...]) or use mode='checkpoint'."
            )

    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        host = self.host
        if self._capture is not None:  # backward was skipped (e.g. a None loss): release the hooks
            self._capture.__exit__(None, None, None)
            self._capture = None
        rows = self._pending_rows
        if rows is None:
            return
        ids = self._batch_ids
        assert ids is not None  # rows are pending only after on_train_batch_start set this batch's ids
        name = self._inline_slice(trainer)
        host._writer.append(host.store, ids, rows, name, trainer, defer=True)
        self._pending_rows = None
        host._last_step_done = trainer.global_step

    def epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        host = self.host
        name = f"epoch-{trainer.current_epoch}"
        if host.save_weights and trainer.is_global_zero and name in host._slices:
            # end-of-epoch weights: where tracin/trak queries of this slice take their gradients
            _save_weights(host.store, host.weights_path / f"{name}.pt", _slice_state(pl_module, host.layout),
                          host.layout.fingerprint())
        # Inline rows are committed with Lightning checkpoints and at fit end (a crash loses only
        # rows after the last checkpoint, which a resume re-writes anyway); commit earlier only
        # when the buffer grows large, so the per-step cost stays an in-memory append.
        host._writer.flush(host.store, trainer)
        if host.store.pending_rows * host.sketch.sketch_dim * 4 > _INLINE_BUFFER_BYTES:
            host._commit(trainer)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
