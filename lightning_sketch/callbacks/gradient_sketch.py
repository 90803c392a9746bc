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

Per-example losses come from ``loss_fn(module, batch) -> Tensor[B]``, by convention from
``pl_module.per_example_loss(batch) -> Tensor[B]`` (unreduced, e.g. ``F.cross_entropy(...,
reduction="none")``), or else from ``training_step`` replayed with each torch loss's reduction taken
apart (:mod:`lightning_sketch.gradients._step_loss`). Example ids come from ``batch[id_key]`` (wrap
the dataset in :class:`~lightning_sketch.data.IndexedDataset`) or ``ids_fn(batch)``; in checkpoint
mode, batches without ids name each example by its position in the training dataset.

Layout on disk: ``<dirpath>/store`` (the :class:`SketchStore`) and ``<dirpath>/weights/<slice>.pt``
(the trainable parameters and persistent buffers at each slice, for multi-checkpoint queries;
``save_weights=False`` skips). Checkpoint mode also keeps ``<dirpath>/weights/probe.pt``: the ids
and inputs of the first few examples of the attribution set, with which the
:class:`~lightning_sketch.attribution.Attributor` checks that the model it is given reproduces
their stored rows.

Resumability: the store is committed in ``on_save_checkpoint`` and its generation is saved in the
Lightning checkpoint; on resume the store is rolled back to that generation, so rows written after
the checkpoint are dropped and re-written by the resumed run: a killed-and-resumed run ends with the
same store as an uninterrupted one. The saved state also records the store's ``run_id`` and the
digest of the checkpoint's weights and optimizer states; a resume refuses a store of another run,
one older than the checkpoint's generation, a checkpoint whose digest differs and (through the
strategy's wrapped ``CheckpointIO``) a truncated or bit-flipped checkpoint file, with typed errors
(see docs/reliability.md). DDP: each rank writes its own shard with global example ids
(checkpoint mode splits the attribution set across ranks); rank 0 merges at fit end after a barrier.
The callback never changes training: no ``.grad``, parameter, optimizer-state or RNG change, and
the module's train/eval mode is restored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_sketch._checks import integer, one_of, positive_int
from lightning_sketch.attribution.curvature import CURVATURE_DIR, check_curvature_arg
from lightning_sketch.attribution.task import AttributionTask
from lightning_sketch.callbacks._checkpoint_guard import guard_checkpoint_io, unguard_checkpoint_io
from lightning_sketch.callbacks._gradient_sketch_base import (
    _check_support,
    _GradientSketchBase,
    _Mode,
    _RowWriter,
)
from lightning_sketch.callbacks._gradient_sketch_inline import _InlineRows
from lightning_sketch.callbacks._gradient_sketch_io import (
    _adopt_state,
    _check_types,
    _open_store,
    _store_gone,
)
from lightning_sketch.callbacks._gradient_sketch_slices import _CheckpointSlices
from lightning_sketch.callbacks._strategy import check_model_parallel
from lightning_sketch.exceptions import SketchConfigError, StoreWriteError
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.io.safeio import sweep_temp_files
from lightning_sketch.io.torchload import CHECKPOINT_DIGEST_KEY, checkpoint_digest
from lightning_sketch.sketches import make, sketch_class
from lightning_sketch.store.manifest import MANIFEST
from lightning_sketch.store.provenance import check_checkpoint_digest, check_store_state

__all__ = ["GradientSketch"]


#: D when ``sketch_dim`` is left out (capped at N, silently, for models with fewer parameters).
DEFAULT_SKETCH_DIM = 1024

#: the component of each mode, whose methods the hooks call (it holds that mode's state)
_MODES: dict[str, Callable[[_GradientSketchBase], _Mode]] = {
    "checkpoint": _CheckpointSlices,
    "inline": _InlineRows,
}


class GradientSketch(_GradientSketchBase):
    """Sketch per-example gradients during training and store them for attribution queries.

    Args:
        dirpath: run directory; the store goes to ``<dirpath>/store``, weights to ``<dirpath>/weights``.
        sketch_kind: sketch family (``"affd"``, ``"dense"``, ``"per_layer"`` for the inline fast path, ...).
        sketch_dim: D, the sketch dimension (``None`` only with ``"identity"``: D = N). A D larger than
            the N sketched parameters is capped at N with a warning (small models work with the default).
        seed: sketch seed (the sketch is rebuilt from its spec; nothing random is drawn from global RNG).
        mode: ``"checkpoint"`` (slices of the attribution set) or ``"inline"`` (the trained batches).
        every_n_epochs: checkpoint mode: take a slice every n epochs (default 1 when ``every_n_steps`` is
            None). Refused in inline mode and beside ``every_n_steps``.
        every_n_steps: checkpoint mode: take a slice every n optimizer steps instead (refused in inline
            mode).
        include: fnmatch patterns of parameter names to sketch (default all trainable).
        exclude: fnmatch patterns of parameter names to leave out.
        id_key: batch entry holding the example ids (checkpoint mode: positions in the training
            dataset for batches without it, when ``attribution_dataloader`` is None).
        nan_policy: ``"skip"`` drops (and counts) rows with NaN/inf gradients; ``"raise"`` stops.
        dtype: storage dtype of the rows, ``"float32"`` or ``"float16"``.
        chunk_size: examples per ``vmap`` call when computing per-example gradients.
        save_weights: save the trainable parameters and persistent buffers at every slice (needed by
            ``tracin``/``trak`` queries over several checkpoints), and the probe examples.
        attribution_dataloader: checkpoint mode: what to sketch (default: the train dataset, in order,
            without shuffling and with ``drop_last=False``, same batch size and collate function).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; default ``pl_module.per_example_loss(batch)``.
        ids_fn: ``ids_fn(batch) -> Tensor[B]`` int64 example ids; default ``batch[id_key]``.
        curvature: checkpoint mode: the ``[D, D]`` kernel written to ``<dirpath>/curvature/`` at
            every slice (one extra per-example gradient pass over the attribution set, S passes for
            a sampled kernel; :mod:`lightning_sketch.attribution.task`). ``"auto"`` (default): the
            task's kernel: TRAK's margin kernel for classifiers, the Gauss–Newton kernel of the
            prediction for regressions, the sampled softmax Gauss–Newton for language models, the
            empirical Fisher (with one warning saying what to add) otherwise; ``"margin"``: the
            same, warning when the task has no margin; ``"fisher"``: the Fisher of labels sampled
            from the model where the task can draw them; ``"none"`` skips it. Inline mode gathers none.
        task: the :class:`~lightning_sketch.attribution.AttributionTask` (loss, query measurement,
            kernel); default: recognised from the module and the first batch
            (:func:`~lightning_sketch.attribution.task.resolve_task`), and said once in the log.

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
        sketch_dim: int | None = DEFAULT_SKETCH_DIM,
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
        task: AttributionTask | None = None,
    ) -> None:
        one_of("mode", mode, ("checkpoint", "inline"))
        one_of("nan_policy", nan_policy, ("skip", "raise"))
        one_of("dtype", dtype, ("float32", "float16"))
        # sketch_kind="identity" takes sketch_dim=None (D = N)
        sketch_dim = positive_int("sketch_dim", sketch_dim, allow_none=sketch_kind == "identity")
        every_n_epochs = positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        every_n_steps = positive_int("every_n_steps", every_n_steps, allow_none=True)
        chunk_size = positive_int("chunk_size", chunk_size, allow_none=True)
        every_n_epochs = _resolve_every_n_epochs(mode, every_n_epochs, every_n_steps)
        seed = integer("seed", seed)
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
        if task is not None and not isinstance(task, AttributionTask):
            raise SketchConfigError(
                "`task` must be a lightning_sketch.attribution.AttributionTask or None, got "
                f"{type(task).__name__}."
            )
        self.task = task
        # state
        self._last_step_done = -1
        self._slices: list[str] = []
        self._generation: int | None = None
        self._resume_generation: int | None = None
        self._generations: list[int] | None = None
        self._resume_generations: list[int] | None = None
        self._run_id: str | None = None
        self.store: Any = None
        self.sketch: Any = None
        self.layout: Any = None
        #: the inline buffer, the ids a resumed slice may see replayed and the non-finite row count
        self._writer = _RowWriter(nan_policy)
        #: what :func:`~lightning_sketch.gradients.capture.capture_support` found in ``setup``.
        self.support: Any = None
        self._hooks = True
        self._hooks_exact: bool | None = None
        #: this mode's hooks and state: checkpoint-mode slices or inline rows
        self._mode_impl = _MODES[mode](self)
        #: state_key's cache: ((dirpath, mode, sketch_kind), key)
        self._state_key: tuple[tuple[str, str, str], str] | None = None
        #: set by setup: None when the store existed, else whether its directory was created too
        self._created_store: bool | None = None
        #: a Lightning checkpoint saved this run's first state; the store's resume point is recorded once
        #: a later hook shows that the checkpoint file was written (see _confirm_checkpoint)
        self._checkpoint_pending = False

    @property
    def skipped_nonfinite(self) -> int:
        """Rows with NaN/inf entries dropped under ``nan_policy="skip"`` (their ids are warned about)."""
        return self._writer.skipped_nonfinite

    @property
    def skipped_overflow_steps(self) -> int:
        """Inline steps whose rows were dropped because the 16-bit gradient scaler overflowed (the
        optimizer skips those steps too)."""
        return self._mode_impl.skipped_overflow_steps

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the store directory's name, mode and kind.

        Not the absolute dirpath, so a run directory that is copied or moved still resumes; two
        GradientSketch callbacks of one trainer need directories of different names.
        """
        # Lightning reads it on every hook call (profiler names): cached per (dirpath, mode, kind).
        ident = (self.dirpath, self.mode, self.sketch_kind)
        cached = self._state_key
        if cached is None or cached[0] != ident:
            key = self._generate_state_key(name=Path(self.dirpath).name, mode=self.mode,
                                           sketch_kind=self.sketch_kind)
            cached = (ident, key)
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
            # the store's run id (one process only: DDP shards have their own); a resume or a query
            # given this checkpoint refuses a store of another run or older than `generation`
            "run_id": self._run_id,
        }

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before Lightning hands out the states by exact key: a state under an earlier key form
        # (the absolute dirpath) or another directory name is filed under this callback's key.
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        _adopt_state(states, self)
        state = states.get(self.state_key) or {}
        committed = state.get("generation") is not None or bool(state.get("slices"))
        if committed and self.store is not None and self._created_store is not None:
            # setup made an empty store where the checkpoint's rows should be: refuse before training
            raise _store_gone(self, trainer, self._created_store)
        # Lightning restores the model weights (restore_model) before the callbacks (this hook), so a
        # checkpoint whose weights changed after it was saved is refused here, before training on them.
        check_checkpoint_digest(checkpoint, path=str(trainer.ckpt_path), what="resume checkpoint")
        if self.store is not None and trainer.world_size == 1 and state.get("run_id") is not None:
            check_store_state(self.store.manifest, run_id=state["run_id"], generation=state.get("generation"),
                              store=self.store_path,
                              source=f"the resume checkpoint {str(trainer.ckpt_path)!r}")

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
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.store is not None:
            return
        self._mode_impl.setup()
        # FSDP2 passes (whole parameters are gathered per pass); tensor parallelism is refused here
        check_model_parallel(trainer.strategy, "GradientSketch")
        self._loss_fn(pl_module)  # fail at setup, not at the first slice
        self.layout = ParamLayout.from_module(pl_module, include=self.include, exclude=self.exclude)
        self.support = _check_support(pl_module, self.layout, self.exclude)
        options = sketch_class(self.sketch_kind).layout_options(self.layout)
        if self.sketch_dim is not None and self.sketch_dim > self.layout.dim:
            # D = N loses nothing; the default D meeting a small model is no mistake worth a warning
            say = rank_zero_info if self.sketch_dim == DEFAULT_SKETCH_DIM else rank_zero_warn
            say(f"GradientSketch: sketch_dim={self.sketch_dim} > N={self.layout.dim}; using "
                f"sketch_dim={self.layout.dim}.")
            self.sketch_dim = self.layout.dim
        self.sketch = make(self.sketch_kind, self.layout.dim, self.sketch_dim, self.seed, **options)
        self.dirpath = trainer.strategy.broadcast(self.dirpath)
        path = self.store_path
        # rank 0 creates the store: its view decides, on every rank
        self._created_store = trainer.strategy.broadcast(
            None if (path / MANIFEST).exists() else not path.exists()
        )
        self.store = _open_store(self, trainer)
        if trainer.is_global_zero:  # the store's lock is held: no other writer of this run directory is live
            for folder in (self.weights_path, Path(self.dirpath) / CURVATURE_DIR):
                sweep_temp_files(folder)  # left by a killed run (the store folder is swept when locked)
        self._run_id = self.store.run_id if trainer.world_size == 1 else None
        guard_checkpoint_io(trainer)  # a damaged `ckpt_path` fails typed, before Lightning restores it

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is None:
            return
        self._writer.forget_replays()
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
            self._mode_impl.resumed(trainer)
        elif self.store.num_rows and trainer.world_size == 1 and self.store.resume_point is None:
            # Rows of a run killed before its first Lightning checkpoint: no checkpoint can resume them,
            # and this fit re-writes them from step 0, so they are discarded.
            orphans = self.store.num_rows
            self.store.rollback(0)
            rank_zero_warn(
                f"GradientSketch: discarded {orphans} orphan rows in {str(self.store_path)!r}: they were "
                f"written by a run that stopped before its first checkpoint, so no checkpoint can resume "
                f"them. This fit rewrites the store from the start."
            )
        elif self.store.num_rows and trainer.world_size == 1:
            raise StoreWriteError(
                f"The store {str(self.store_path)!r} already holds {self.store.num_rows} rows and this fit "
                f"does not resume from a checkpoint; resume with `trainer.fit(..., ckpt_path=...)` or use a "
                f"new dirpath."
            )
        self._hooks = not self.support.unsupported
        self._hooks_exact = None
        self._mode_impl.fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is not None:
            self._mode_impl.train_start(trainer, pl_module)

    # ------------------------------------------------------------------ per-step and per-epoch hooks
    def _confirm_checkpoint(self) -> None:
        """Record the store's resume point once the first Lightning checkpoint that refers to it exists.

        ``on_save_checkpoint`` runs before Lightning writes the checkpoint file; a process killed in
        between leaves no checkpoint, so the rows it committed must stay orphans that a fresh fit
        discards. With Lightning's default checkpoint IO the file is written before the next hook of
        this callback (the next batch, the next save, the end of the fit) runs, so reaching that hook
        shows the file exists. An asynchronous ``CheckpointIO`` (``AsyncCheckpointIO``) writes it in
        a background thread: the resume point may then be recorded while the file is still being
        written, and a kill in that window leaves a store that a fresh fit refuses.
        """
        if self._checkpoint_pending and self.store is not None:
            self._checkpoint_pending = False
            if self.store.resume_point is None:
                self.store.mark_resume_point()

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._confirm_checkpoint()
        if self._skip(trainer):
            return
        self._mode_impl.batch_start(trainer, pl_module, batch)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mode_impl.after_backward(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer):
            return
        self._mode_impl.batch_end(trainer, pl_module, batch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._confirm_checkpoint()
        if self._skip(trainer):
            return
        self._mode_impl.epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints and fit end
    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.store is None:
            return
        self._confirm_checkpoint()  # a save that calls this hook again has written its previous file
        self._commit(trainer)
        if self.store.resume_point is None:  # rows a checkpoint can resume are no orphans (see on_fit_start)
            self._checkpoint_pending = True
        if trainer.world_size > 1:  # every rank runs this hook; record each shard's generation
            gens = trainer.strategy.all_gather(torch.tensor([self._generation], dtype=torch.long))
            self._generations = [int(g) for g in gens.reshape(-1).tolist()]
        # Lightning collects every callback's state_dict() *before* it calls on_save_checkpoint
        # (CheckpointConnector.dump_checkpoint), so the entry it stored predates the commit above and
        # holds the previous generation(s). Replace it: a resume must roll the store back to the
        # generation committed with this checkpoint, not to the one before.
        # The digest of the weights and optimizer states this checkpoint holds: Lightning writes the
        # file after this hook, so the file's own hash cannot be recorded inside it. Sharded strategies
        # (FSDP, DeepSpeed) hand each rank a partial checkpoint, so only whole ones get a digest.
        state = self.state_dict()
        if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            state[CHECKPOINT_DIGEST_KEY] = checkpoint_digest(checkpoint)
        checkpoint.setdefault("callbacks", {})[self.state_key] = state

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store is None:
            return
        self._mode_impl.close()
        self._commit(trainer)
        self._checkpoint_pending = False
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
        self._mode_impl.close()
        self.store.close()
        self.store = None
        unguard_checkpoint_io(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Keep the last committed state; drop the uncommitted buffer and release the writer lock.
        self._writer.discard()
        unguard_checkpoint_io(trainer)
        self._mode_impl.close()
        if self.store is not None:
            self.store.close()
            self.store = None


def _resolve_every_n_epochs(mode: str, every_n_epochs: int | None, every_n_steps: int | None) -> int | None:
    """The epoch cadence to use: 1 by default in checkpoint mode.

    Raises:
        SketchConfigError: a cadence in inline mode (which sketches every trained batch), or both
            cadences at once (as ``ModelCheckpoint`` refuses conflicting triggers).
    """
    if mode == "checkpoint" and every_n_epochs is None and every_n_steps is None:
        return 1
    if mode == "inline" and (every_n_epochs is not None or every_n_steps is not None):
        name, n = (("every_n_epochs", every_n_epochs) if every_n_epochs is not None
                   else ("every_n_steps", every_n_steps))
        raise SketchConfigError(
            f"GradientSketch({name}={n}) has no effect in inline mode, which sketches every trained batch "
            f"into one slice per epoch. Drop `{name}`, or use mode='checkpoint' to sketch the attribution "
            f"set on that schedule."
        )
    if every_n_epochs is not None and every_n_steps is not None:
        raise SketchConfigError(
            f"GradientSketch(every_n_epochs={every_n_epochs}, every_n_steps={every_n_steps}): set only one "
            f"of them (every_n_steps takes a slice every n optimizer steps, every_n_epochs every n epochs)."
        )
    return every_n_epochs
