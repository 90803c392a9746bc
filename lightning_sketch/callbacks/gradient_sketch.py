"""``GradientSketch``: stream sketched per-example gradients into a :class:`SketchStore` during ``fit``.

Two modes (arXiv 2402.03994 Sec. 5.2; docs/design.md):

- ``"checkpoint"`` (TracIn-CP / TRAK style): every ``every_n_epochs`` epochs (or ``every_n_steps``
  optimizer steps) the per-example gradients of the whole attribution set are sketched at the
  current weights, in eval mode (dropout off; the mode is restored), and appended as a new
  checkpoint slice named ``step-<global_step>`` with the current learning rate η_t.
- ``"inline"`` (the in-run TracIn trajectory): the per-example gradients of the very batch the
  optimizer trains on, at the weights of that step and in train mode (the dropout masks the step
  drew), multiplied by the step's learning rate η_t, are appended to the slice ``epoch-<e>``
  (recorded with ``lr=1``, rows pre-weighted). They come from the training backward itself through
  :class:`~lightning_sketch.gradients.GradientCapture` hooks (no extra forward or backward):
  ``sketch_kind="per_layer"`` never forms a per-example gradient, other kinds form ``[B, N]`` and
  apply the sketch. This assumes the documented loss convention: the training loss is the
  **mean** over the batch of ``per_example_loss`` (the hooks rescale by B, by
  ``accumulate_grad_batches`` and by the 16-bit gradient scaler). With train-mode BatchNorm the
  rows are each example's contribution to the batch gradient (they sum to B × the batch gradient).

Support is checked in ``setup``: the modules owning sketched parameters are listed (fast path or
per-module ``torch.func`` fallback, :func:`~lightning_sketch.gradients.capture.capture_support`);
modules no path serves are refused there, naming ``exclude=`` patterns to leave them out.
Mixed precision (``bf16-mixed``, ``16-mixed``): sketches are computed and accumulated in float32.

Per-example losses come from ``loss_fn(module, batch) -> Tensor[B]`` or, by convention, from
``pl_module.per_example_loss(batch) -> Tensor[B]`` (unreduced, e.g. ``F.cross_entropy(...,
reduction="none")``). Example ids come from ``batch[id_key]`` (wrap the dataset in
:class:`~lightning_sketch.data.IndexedDataset`) or ``ids_fn(batch)``.

Layout on disk: ``<dirpath>/store`` (the :class:`SketchStore`) and ``<dirpath>/weights/<slice>.pt``
(the selected parameters at each slice, for multi-checkpoint queries; ``save_weights=False`` skips).

Resumability: the store is committed in ``on_save_checkpoint`` and its generation is saved in the
Lightning checkpoint; on resume the store is rolled back to that generation, so rows written after
the checkpoint are dropped and re-written by the resumed run: a killed-and-resumed run ends with the
same store as an uninterrupted one. DDP: each rank writes its own shard with global example ids
(checkpoint mode splits the attribution set across ranks); rank 0 merges at fit end after a barrier.
The callback never changes training: no ``.grad``, parameter, optimizer-state or RNG change, and
the module's train/eval mode is restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_sketch.attribution.curvature import (
    accumulate_fisher,
    check_curvature_arg,
    resolve_label_sampler,
    resolve_margin_loss,
    write_curvature,
)
from lightning_sketch.callbacks._gradient_sketch_io import (
    _as_ids,
    _check_no_padding,
    _check_types,
    _current_lr,
    _open_store,
    _rng_guard,
    _save_weights,
    _to_device,
)
from lightning_sketch.callbacks._progress import progress_iter as _progress
from lightning_sketch.data import default_ids
from lightning_sketch.exceptions import (
    SketchConfigError,
    SketchInputError,
    StoreWriteError,
)
from lightning_sketch.gradients import eval_mode as _eval_mode
from lightning_sketch.gradients import module_loss_fn
from lightning_sketch.store import finite_rows

__all__ = ["GradientSketch"]

#: inline mode commits early once this many bytes of rows are buffered.
_INLINE_BUFFER_BYTES = 256 * 2**20

log = logging.getLogger(__name__)

try:  # Lightning >= 2.x ships typing_extensions.override
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):
        return f


class GradientSketch(Callback):
    """Sketch per-example gradients during training and store them for attribution queries.

    Args:
        dirpath: run directory; the store goes to ``<dirpath>/store``, weights to ``<dirpath>/weights``.
        sketch_kind: sketch family (``"affd"``, ``"dense"``, ``"per_layer"`` for the inline fast path, ...).
        sketch_dim: D, the sketch dimension (``None`` only with ``"identity"``: D = N).
        seed: sketch seed (the sketch is rebuilt from its spec; nothing random is drawn from global RNG).
        mode: ``"checkpoint"`` (slices of the attribution set) or ``"inline"`` (the trained batches).
        every_n_epochs: checkpoint mode: take a slice every n epochs (default 1 when ``every_n_steps`` is
            None). Ignored, with a warning, in inline mode and when ``every_n_steps`` is set.
        every_n_steps: checkpoint mode: take a slice every n optimizer steps instead (ignored, with a
            warning, in inline mode).
        include: fnmatch patterns of parameter names to sketch (default all trainable).
        exclude: fnmatch patterns of parameter names to leave out.
        id_key: batch entry holding the example ids.
        nan_policy: ``"skip"`` drops (and counts) rows with NaN/inf gradients; ``"raise"`` stops.
        dtype: storage dtype of the rows, ``"float32"`` or ``"float16"``.
        chunk_size: examples per ``vmap`` call when computing per-example gradients.
        save_weights: save the sketched parameters at every slice (needed by ``tracin``/``trak``
            queries over several checkpoints).
        attribution_dataloader: checkpoint mode: what to sketch (default: the train dataset, in order,
            without shuffling and with ``drop_last=False``, same batch size and collate function).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; default ``pl_module.per_example_loss(batch)``.
        ids_fn: ``ids_fn(batch) -> Tensor[B]`` int64 example ids; default ``batch[id_key]``.
        curvature: checkpoint mode: the ``[D, D]`` kernel written to ``<dirpath>/curvature/`` at
            every slice (one extra per-example gradient pass over the attribution set;
            :mod:`lightning_sketch.attribution.curvature`). ``"margin"``: TRAK's kernel Σ φφᵀ of the
            sketched gradients φ of the margin (the module's ``per_example_margin`` or, for
            classifiers, log p_y − log(1 − p_y) of the logits), used by the Attributor's default
            ``trak``; ``"fisher"``: the Fisher Σ ĝĝᵀ of labels sampled from the model, used by
            ``fisher_if``; ``"auto"`` (default): ``"margin"`` where a margin is defined, else
            ``"fisher"``; ``"none"`` skips it. Inline mode gathers none.

    Raises:
        SketchConfigError: on invalid arguments (checked in ``__init__``) or a module without a loss.

    Example:
        >>> cb = GradientSketch(dirpath="runs/attr", sketch_kind="affd", sketch_dim=256)
        >>> cb.mode, cb.every_n_epochs
        ('checkpoint', 1)
    """

    def __init__(
        self,
        dirpath: str,
        sketch_kind: str = "affd",
        sketch_dim: int | None = 1024,
        seed: int = 0,
        mode: Literal["checkpoint", "inline"] = "checkpoint",
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        id_key: str = "index",
        nan_policy: Literal["skip", "raise"] = "skip",
        dtype: Literal["float32", "float16"] = "float32",
        chunk_size: int | None = None,
        save_weights: bool = True,
        attribution_dataloader: Any = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        ids_fn: Callable[[Any], Tensor] | None = None,
        curvature: Literal["auto", "margin", "fisher", "none"] = "auto",
    ) -> None:
        if mode not in ("checkpoint", "inline"):
            raise SketchConfigError(f"`mode` must be 'checkpoint' or 'inline', got {mode!r}.")
        if nan_policy not in ("skip", "raise"):
            raise SketchConfigError(f"`nan_policy` must be 'skip' or 'raise', got {nan_policy!r}.")
        if dtype not in ("float32", "float16"):
            raise SketchConfigError(f"`dtype` must be 'float32' or 'float16', got {dtype!r}.")
        for name, val in (("sketch_dim", sketch_dim), ("every_n_epochs", every_n_epochs),
                          ("every_n_steps", every_n_steps), ("chunk_size", chunk_size)):
            if val is None and (name != "sketch_dim" or sketch_kind == "identity"):
                continue
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise SketchConfigError(f"`{name}` must be a positive int{' or None' if name != 'sketch_dim' else ''}, got {val!r}.")
        every_n_epochs = _resolve_every_n_epochs(mode, every_n_epochs, every_n_steps)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SketchConfigError(f"`seed` must be an int, got {seed!r}.")
        _check_types(dirpath, sketch_kind, include, exclude, id_key, save_weights)
        self.dirpath = str(dirpath)
        self.sketch_kind = sketch_kind
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.mode = mode
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.include = include
        self.exclude = exclude
        self.id_key = id_key
        self.nan_policy = nan_policy
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.save_weights = save_weights
        self.attribution_dataloader = attribution_dataloader
        self.loss_fn = loss_fn
        self.ids_fn = ids_fn
        self.curvature = check_curvature_arg(curvature)
        # state
        self._last_step_done = -1
        self._slices: list[str] = []
        self._generation: int | None = None
        self._resume_generation: int | None = None
        self._generations: list[int] | None = None
        self._resume_generations: list[int] | None = None
        self.store: Any = None
        self.sketch: Any = None
        self.layout: Any = None
        self._capture: Any = None
        self._inline_buf: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.skipped_nonfinite = 0
        #: inline steps whose rows were dropped because the 16-bit gradient scaler overflowed
        #: (the optimizer skips those steps too).
        self.skipped_overflow_steps = 0
        #: what :func:`~lightning_sketch.gradients.capture.capture_support` found in ``setup``.
        self.support: Any = None
        self._scaler: Any = None
        self._checked_sum = False
        self._hooks = True
        self._inline_fast = False
        # inline mode, per training step (set in on_train_batch_start)
        self._lr = 1.0
        self._pending_rows: Tensor | None = None
        self._batch_ids: Tensor | None = None
        self._capture_tool: Any = None

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it on every hook call (profiler names): cached per (dirpath, mode, kind).
        ident = (self.dirpath, self.mode, self.sketch_kind)
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != ident:
            cached = (ident, self._generate_state_key(dirpath=self.dirpath, mode=self.mode, sketch_kind=self.sketch_kind))
            self._state_key = cached
        return cached[1]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step_done": self._last_step_done,
            "slices": list(self._slices),
            "generation": self._generation,
            "generations": self._generations,
            "dirpath": self.dirpath,
            "spec": None if self.sketch is None else self.sketch.spec,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step_done = int(state_dict.get("last_step_done", -1))
        self._slices = list(state_dict.get("slices", []))
        gen = state_dict.get("generation")
        self._resume_generation = None if gen is None else int(gen)
        gens = state_dict.get("generations")
        self._resume_generations = None if gens is None else [int(g) for g in gens]
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:
            rank_zero_warn(
                f"GradientSketch resumes with dirpath={self.dirpath!r} but the checkpoint was written for "
                f"{state_dict.get('dirpath')!r}; the store at the new path is used."
            )

    # ------------------------------------------------------------------ setup
    @property
    def store_path(self) -> Path:
        """``<dirpath>/store``."""
        return Path(self.dirpath) / "store"

    @property
    def weights_path(self) -> Path:
        """``<dirpath>/weights``."""
        return Path(self.dirpath) / "weights"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.store is not None:
            return
        from lightning_sketch.gradients import ParamLayout
        from lightning_sketch.sketches import make, sketch_class

        self._loss_fn(pl_module)  # fail at setup, not at the first slice
        self.layout = ParamLayout.from_module(pl_module, include=self.include, exclude=self.exclude)
        self.support = _check_support(pl_module, self.layout, self.exclude)
        options = sketch_class(self.sketch_kind).layout_options(self.layout)
        self.sketch = make(self.sketch_kind, self.layout.dim, self.sketch_dim, self.seed, **options)
        self.dirpath = trainer.strategy.broadcast(self.dirpath)
        self.store = _open_store(self, trainer)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is None:
            return
        if self._resume_generation is not None:
            gens = self._resume_generations
            if trainer.world_size == 1:
                self.store.rollback(self._resume_generation)
            elif gens is not None and len(gens) == trainer.world_size:
                self.store.rollback(gens[trainer.global_rank])  # each rank's own shard
            else:
                rank_zero_warn(
                    "GradientSketch: the checkpoint holds no per-rank shard generations for this world size; "
                    "shards are not rolled back and rows after the checkpoint may be duplicated."
                )
            self._generation = self._resume_generation
            self._resume_generation = None
        elif self.store.num_rows and trainer.world_size == 1 and self.store.resume_point is None:
            # Rows of a run killed before its first Lightning checkpoint: no checkpoint can resume them,
            # and this fit re-writes them from step 0, so they are discarded (issue 11, finding 9).
            orphans = self.store.num_rows
            self.store.rollback(0)
            rank_zero_warn(
                f"GradientSketch: discarded {orphans} orphan rows in {str(self.store_path)!r}: they were written by a "
                f"run that stopped before its first checkpoint, so no checkpoint can resume them. This fit rewrites "
                f"the store from the start."
            )
        elif self.store.num_rows and trainer.world_size == 1:
            raise StoreWriteError(
                f"The store {str(self.store_path)!r} already holds {self.store.num_rows} rows and this fit does "
                f"not resume from a checkpoint; resume with `trainer.fit(..., ckpt_path=...)` or use a new dirpath."
            )
        self._hooks = not self.support.unsupported
        self._inline_fast = self.mode == "inline" and self._hooks  # rows from the training backward
        if self._inline_fast:
            from lightning_sketch.gradients import GradientCapture

            self._capture_tool = GradientCapture(pl_module, self.sketch, self.layout)
            self._scaler = getattr(trainer.precision_plugin, "scaler", None)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is not None and self.mode == "inline" and trainer.world_size > 1:
            _check_no_padding(trainer.train_dataloader)

    # ------------------------------------------------------------------ checkpoint mode
    def _due_epoch(self, trainer: Trainer) -> bool:
        return (
            self.mode == "checkpoint"
            and self.every_n_steps is None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def _skip(self, trainer: Trainer) -> bool:
        return trainer.sanity_checking or bool(trainer.fast_dev_run) or self.store is None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._skip(trainer):
            return
        if self.mode == "inline":
            self._inline_end(trainer, pl_module, batch)
            return
        step = trainer.global_step
        if self.every_n_steps is not None and step % self.every_n_steps == 0 and step > self._last_step_done:
            self._take_slice(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip(trainer):
            return
        if self.mode == "inline":
            name = f"epoch-{trainer.current_epoch}"
            if self.save_weights and trainer.is_global_zero and name in self._slices:
                # end-of-epoch weights: where tracin/trak queries of this slice take their gradients
                _save_weights(self.store, self.weights_path / f"{name}.pt", self.layout.params(pl_module),
                              self.layout.fingerprint())
            # Inline rows are committed with Lightning checkpoints and at fit end (a crash loses only
            # rows after the last checkpoint, which a resume re-writes anyway); commit earlier only
            # when the buffer grows large, so the per-step cost stays an in-memory append.
            self._flush(trainer)
            if self.store.pending_rows * self.sketch.sketch_dim * 4 > _INLINE_BUFFER_BYTES:
                self._commit(trainer)
            return
        if self._due_epoch(trainer) and trainer.global_step > self._last_step_done:
            self._take_slice(trainer, pl_module)

    def _take_slice(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_sketch.gradients import sketch_gradients

        step = trainer.global_step
        name = f"step-{step}"
        self.store.add_checkpoint(name, step=step, lr=_current_lr(trainer), weight=None, epoch=trainer.current_epoch)
        loader = self._attribution_loader(trainer)
        loss_fn = self._loss_fn(pl_module)
        bar = _progress(trainer, loader, f"GradientSketch {name}")
        seen = 0
        with _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            for batch in bar:
                batch = _to_device(batch, pl_module.device)
                rows = _vmap_guard(lambda b=batch: sketch_gradients(
                    pl_module, loss_fn, b, self.sketch, mode="auto" if self._hooks else "explicit",
                    layout=self.layout, chunk_size=self.chunk_size,
                ), self.support, self.exclude)
                self._append(self._ids(batch), rows, name, trainer)
                seen += len(rows)
        if not seen:
            rank_zero_warn(f"GradientSketch: the attribution set is empty; checkpoint {name!r} holds no rows.")
        if self.curvature != "none":
            self._gather_curvature(trainer, pl_module, name, loader, loss_fn)
        self._finish_slice(trainer, pl_module, name, step)

    def _gather_curvature(
        self, trainer: Trainer, pl_module: LightningModule, name: str, loader: Any, loss_fn: Any
    ) -> None:
        """Σ_t φ_t φ_tᵀ over the attribution set (eval mode), φ_t the sketched gradient of the
        example's −margin (TRAK's kernel) or of its loss at a label sampled from the model (Fisher)."""
        from lightning_sketch.gradients import sketch_gradients
        from lightning_sketch.sketches import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "curvature", f"{name}/rank{trainer.global_rank}"))
        D = self.sketch.sketch_dim
        acc = torch.zeros(D, D, dtype=torch.float64)
        count, row_loss, transform, estimator = 0, None, None, ""
        with _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            for batch in loader:
                batch = _to_device(batch, pl_module.device)
                if row_loss is None:
                    row_loss, transform, estimator = self._curvature_rows(pl_module, loss_fn, batch, name)
                rows = _vmap_guard(lambda: sketch_gradients(  # noqa: B023 - called at once
                    pl_module, row_loss, transform(pl_module, batch, gen), self.sketch,
                    mode="auto" if self._hooks else "explicit", layout=self.layout, chunk_size=self.chunk_size,
                ), self.support, self.exclude)
                count += accumulate_fisher([rows], D, out=acc)[1]
        if trainer.world_size > 1:  # every rank saw its own share of the attribution set
            acc = trainer.strategy.reduce(acc.to(pl_module.device), reduce_op="sum").cpu()
            count = int(trainer.strategy.reduce(torch.tensor(float(count), device=pl_module.device), reduce_op="sum"))
        if trainer.is_global_zero:
            write_curvature(self.dirpath, name, acc, count, self.sketch.spec, estimator)

    def _curvature_rows(self, pl_module: LightningModule, loss_fn: Any, batch: Any, name: str) -> tuple[Any, Any, str]:
        """``(row loss, batch transform, estimator)`` of the kernel, decided on the first batch."""
        keep = lambda mod, b, g: b  # noqa: E731 - the batch as it is
        if self.curvature in ("auto", "margin"):
            margin_loss, why = resolve_margin_loss(pl_module, loss_fn, batch)
            if margin_loss is not None:
                return margin_loss, keep, why
            if self.curvature == "margin":
                rank_zero_warn(
                    f"GradientSketch: no margin ({why}); the curvature of {name!r} is the Fisher of sampled "
                    f"labels. Define `per_example_margin(batch) -> Tensor[B]` on the module."
                )
        sampler, estimator = resolve_label_sampler(pl_module, loss_fn, batch)
        if sampler is None:
            rank_zero_warn(
                f"GradientSketch: cannot sample labels ({estimator}); the curvature of {name!r} is the "
                f"empirical Fisher. Define `sample_labels(batch, generator) -> batch` on the module."
            )
            return loss_fn, keep, f"empirical: {estimator}"
        return loss_fn, sampler, estimator

    def _finish_slice(self, trainer: Trainer, pl_module: LightningModule, name: str, step: int) -> None:
        if name not in self._slices:
            self._slices.append(name)
        self._last_step_done = step
        if self.save_weights and trainer.is_global_zero:
            _save_weights(self.store, self.weights_path / f"{name}.pt", self.layout.params(pl_module),
                          self.layout.fingerprint())
        self._commit(trainer)

    # ------------------------------------------------------------------ inline mode
    def _inline_slice(self, trainer: Trainer) -> str:
        name = f"epoch-{trainer.current_epoch}"
        if not self._slices or self._slices[-1] != name:
            self.store.add_checkpoint(name, step=None, lr=1.0, weight=None, lr_weighted=True, epoch=trainer.current_epoch)
            if name not in self._slices:
                self._slices.append(name)
        return name

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._skip(trainer) or self.mode != "inline":
            return
        self._lr = _current_lr(trainer)
        self._pending_rows = None
        self._batch_ids = self._ids(batch)
        if self._hooks:
            self._capture = self._capture_tool
            self._capture.batch_size = int(self._batch_ids.shape[0])
            self._capture.__enter__()
            return
        from lightning_sketch.gradients import sketch_gradients

        # Parameters no hook sees (parametrised models): per-example gradients of this batch at this
        # step's weights by vmap over the whole model, before the step, in eval mode.
        with _eval_mode(pl_module), _rng_guard(), torch.enable_grad():
            self._pending_rows = _vmap_guard(lambda: sketch_gradients(
                pl_module, self._loss_fn(pl_module), batch, self.sketch, mode="explicit", layout=self.layout,
                chunk_size=self.chunk_size,
            ), self.support, self.exclude) * self._lr

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is None:
            return
        cap, self._capture = self._capture, None
        cap.__exit__(None, None, None)
        scale = float(trainer.accumulate_grad_batches)
        if self._scaler is not None:  # 16-mixed: the backward ran on the scaled loss
            scale /= float(self._scaler.get_scale())
        check = not self._checked_sum and trainer.accumulate_grad_batches == 1
        try:
            # One multiplication of the [B, D] rows: B (mean loss), accumulation, 1/scaler and, except on
            # the first step (whose unweighted rows are checked against .grad), the learning rate.
            rows = cap.sketches(scale=scale if check else scale * self._lr)
        except SketchInputError:
            rank_zero_warn(
                "GradientSketch inline: the backward of this step reached no hooked module, so no rows were "
                "written for it; inline mode needs the training loss to be computed from the module's forward "
                "with gradients enabled."
            )
            return
        if self._scaler is not None and not bool(torch.isfinite(rows).all()):
            self.skipped_overflow_steps += 1  # the scaler skips this optimizer step as well
            return
        if check:
            self._checked_sum = True
            self._check_rows_sum(pl_module, rows, 1.0 if self._scaler is None else scale)
            rows = rows * self._lr
        self._pending_rows = rows  # weighted by this step's learning rate

    def _check_rows_sum(self, pl_module: LightningModule, rows: Tensor, grad_scale: float) -> None:
        """First step: the mean of the rows must be the sketch of the batch gradient in ``.grad``
        (the sketch is linear). A gap means a parameter is used outside the module that owns it
        (invisible to hooks) or the training loss is not the mean of ``per_example_loss``."""
        own = dict(pl_module.named_parameters())
        got = rows.mean(0)
        blocks = getattr(self.sketch, "blocks", None)
        if blocks is None:
            grads = {n: own[n].grad if own[n].grad is not None else torch.zeros_like(own[n]) for n in self.layout.names}
            flat = self.layout.flatten({n: g.detach().to(rows.dtype) * grad_scale for n, g in grads.items()})
            parts = [("all sketched parameters", self.sketch.apply(flat), got)]
        else:  # per_layer: each block's sketch L G Rᵀ of its own .grad, with no N-long copy of the gradient
            parts = []
            for b in blocks:
                name, sl = self.layout.names[b.index], slice(b.out_offset, b.out_offset + b.out_dim)
                g = own[name].grad
                if g is None:
                    parts.append((name, torch.zeros_like(got[sl]), got[sl]))
                    continue
                g = g.detach().to(rows.dtype)
                L, R = self.sketch.factors(b, g)
                ref = L @ g.reshape(-1) if R is None else (L @ g.reshape(b.rows, b.cols) @ R.T).reshape(-1)
                parts.append((name, ref * grad_scale, got[sl]))
        bad = [n for n, r, g in parts if float((r - g).norm()) > 0.05 * float(r.norm()) + 1e-12]
        if bad:
            rank_zero_warn(
                f"GradientSketch inline: the captured per-example gradients of {bad[:8]} do not add up to the "
                f"batch gradient in .grad. Either the training loss is not the mean of per_example_loss over the "
                f"batch, or these parameters are used outside the forward of the module that owns them (invisible "
                f"to hooks; tie weights by sharing the Parameter between modules instead). Leave them out with "
                f"GradientSketch(..., exclude=[...]) or use mode='checkpoint'."
            )

    def _inline_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if self._capture is not None:  # backward was skipped (e.g. a None loss): release the hooks
            self._capture.__exit__(None, None, None)
            self._capture = None
        rows = getattr(self, "_pending_rows", None)
        if rows is None:
            return
        name = self._inline_slice(trainer)
        self._append(self._batch_ids, rows, name, trainer, defer=True)
        self._pending_rows = None
        self._last_step_done = trainer.global_step

    # ------------------------------------------------------------------ plumbing
    def _append(self, ids: Tensor, rows: Tensor, name: str, trainer: Trainer, defer: bool = False) -> None:
        rows = rows.detach().to("cpu", torch.float32)
        ids = ids.cpu()
        # One reduction decides the common case: a non-finite entry makes the sum non-finite (an
        # overflowing sum of finite rows only sends us to the exact per-row test). The per-row test
        # is the store's (raised here, at the training step; the store counts dropped rows).
        finite = None
        if not math.isfinite(float(rows.sum())):
            finite = finite_rows(ids.numpy(), rows.numpy(), self.nan_policy, f"at step {trainer.global_step}")
        if finite is not None and not finite.all():
            self.skipped_nonfinite += int((~finite).sum())
            bad = ids.numpy()[~finite][:5].tolist()
            rank_zero_warn(f"GradientSketch skipped {int((~finite).sum())} non-finite rows (ids {bad}...)")
        if defer:  # inline mode: one store append per slice instead of one per step
            self._inline_buf.setdefault(name, []).append((ids, rows))
            return
        self.store.append(ids, rows, checkpoint=name, rank=trainer.global_rank, nan_policy=self.nan_policy)

    def _flush(self, trainer: Trainer) -> None:
        for name, parts in self._inline_buf.items():
            ids = torch.cat([i for i, _ in parts])
            rows = torch.cat([r for _, r in parts])
            self.store.append(ids, rows, checkpoint=name, rank=trainer.global_rank, nan_policy=self.nan_policy)
        self._inline_buf = {}

    def _commit(self, trainer: Trainer) -> None:
        self._flush(trainer)
        self._generation = self.store.commit()

    def _ids(self, batch: Any) -> Tensor:
        return _as_ids(self.ids_fn(batch) if self.ids_fn is not None else default_ids(batch, self.id_key))

    def _loss_fn(self, pl_module: LightningModule) -> Callable[[nn.Module, Any], Tensor]:
        return module_loss_fn(pl_module, self.loss_fn, who="GradientSketch ")

    def _attribution_loader(self, trainer: Trainer) -> Any:
        if self.attribution_dataloader is not None:
            return self.attribution_dataloader
        train = trainer.train_dataloader
        if isinstance(train, DataLoader):
            dataset, batch_size, collate = train.dataset, train.batch_size, train.collate_fn
        else:
            raise SketchConfigError(
                "GradientSketch cannot rebuild the attribution set from a non-DataLoader train loader "
                f"({type(train).__name__}); pass `attribution_dataloader`."
            )
        if trainer.world_size > 1:  # each rank sketches its own share, ids stay global
            dataset = Subset(dataset, list(range(trainer.global_rank, len(dataset), trainer.world_size)))
        return DataLoader(dataset, batch_size=batch_size or 1, shuffle=False, drop_last=False, collate_fn=collate)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.store is None:
            return
        self._commit(trainer)
        if self.store.resume_point is None:  # rows a checkpoint can resume are no orphans (see on_fit_start)
            self._generation = self.store.mark_resume_point()
        if trainer.world_size > 1:  # every rank runs this hook; record each shard's generation
            gens = trainer.strategy.all_gather(torch.tensor([self._generation], dtype=torch.long))
            self._generations = [int(g) for g in gens.reshape(-1).tolist()]
        # Lightning collects every callback's state_dict() *before* it calls on_save_checkpoint
        # (CheckpointConnector.dump_checkpoint), so the entry it stored predates the commit above and
        # holds the previous generation(s). Replace it: a resume must roll the store back to the
        # generation committed with this checkpoint, not to the one before.
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is None:
            return
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        self._commit(trainer)
        if self.store.resume_point is None:  # a finished run's rows are no orphans either
            self._generation = self.store.mark_resume_point()
        if trainer.world_size > 1:
            trainer.strategy.barrier("gradient_sketch_merge")
            if trainer.is_global_zero:
                self.store.merge_shards()
            trainer.strategy.barrier("gradient_sketch_merged")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.store is None:
            return
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        self.store.close()
        self.store = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Keep the last committed state; drop the uncommitted buffer and release the writer lock.
        self._inline_buf = {}
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        if self.store is not None:
            self.store.close()
            self.store = None


def _resolve_every_n_epochs(mode: str, every_n_epochs: int | None, every_n_steps: int | None) -> int | None:
    """The epoch cadence to use: 1 by default in checkpoint mode; a value that would be ignored warns once."""
    if mode == "checkpoint" and every_n_epochs is None and every_n_steps is None:
        return 1
    if mode == "inline" and (every_n_epochs is not None or every_n_steps is not None):
        name, n = (("every_n_epochs", every_n_epochs) if every_n_epochs is not None
                   else ("every_n_steps", every_n_steps))
        rank_zero_warn(
            f"GradientSketch({name}={n}) is ignored in inline mode, which sketches every trained batch into "
            f"one slice per epoch. Drop `{name}`, or use mode='checkpoint' to sketch the attribution set on "
            f"that schedule."
        )
    elif every_n_epochs is not None and every_n_steps is not None:
        rank_zero_warn(
            f"GradientSketch(every_n_epochs={every_n_epochs}) is ignored because "
            f"every_n_steps={every_n_steps} is set: slices are taken every {every_n_steps} optimizer steps. "
            f"Set only one of them."
        )
    return every_n_epochs


def _check_support(pl_module: nn.Module, layout: Any, exclude: list[str] | None) -> Any:
    """Setup-time check of the per-example gradient paths: log the modules covered, warn once about
    the per-module fallback, refuse modules no path serves with ``exclude=`` advice."""
    from lightning_sketch.gradients.capture import capture_support

    support = capture_support(pl_module, layout)
    if support.unsupported:
        rank_zero_warn(
            "GradientSketch: no hook path covers "
            + "; ".join(f"{n or '<root>'} ({r})" for n, r in support.unsupported.items())
            + f", so per-example gradients use vmap over the whole model (slower; inline mode then takes them "
            f"in eval mode before the step). To keep the hook path: GradientSketch(..., "
            f"exclude={_advice(support, exclude)!r})."
        )
        return support
    log.info("GradientSketch: %s", support.summary().replace("\n", "; "))
    if support.fallback:
        slow = support.fallback_params()
        rank_zero_warn(
            "GradientSketch: these modules are not on the hook fast path and go through a per-module "
            f"torch.func fallback (one extra forward+backward of each): {support.summary().splitlines()[1]}. "
            f"Exact for modules that treat examples independently; random ones (dropout inside) are recomputed "
            f"with other masks. To skip them: GradientSketch(..., exclude={list(exclude or []) + slow!r})."
        )
    return support


def _advice(support: Any, exclude: list[str] | None) -> list[str]:
    names = [p for n in support.unsupported for p in support.params.get(n, [])]
    return list(exclude or []) + names


def _vmap_guard(fn: Callable[[], Tensor], support: Any, exclude: list[str] | None) -> Tensor:
    """Run the whole-model vmap path; turn a failure inside the model's forward into advice."""
    from lightning_sketch.exceptions import LightningSketchError, UnsupportedModelError

    try:
        return fn()
    except LightningSketchError:
        raise
    except (RuntimeError, TypeError, ValueError) as err:
        raise UnsupportedModelError(
            f"GradientSketch: vmap over the whole model failed ({type(err).__name__}: {str(err)[:300]}). It is only "
            f"used because no hook path covers {sorted(support.unsupported)}; leave those parameters out with "
            f"GradientSketch(..., exclude={_advice(support, exclude)!r})."
        ) from err
