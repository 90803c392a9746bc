"""Private base of :class:`~lightning_sketch.callbacks.gradient_sketch.GradientSketch`.

The attributes ``GradientSketch.__init__`` sets that its mode components read, declared once for them
(checkpoint mode: ``_gradient_sketch_slices._CheckpointSlices``; inline mode:
``_gradient_sketch_inline._InlineRows``), the interface of those components (``_Mode``), the row
writer both modes share (``_RowWriter``: append / flush / commit) and the setup-time support check
with its ``exclude=`` advice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_sketch.callbacks._gradient_sketch_io import _as_ids
from lightning_sketch.data import default_ids
from lightning_sketch.exceptions import DuplicateIdError, LightningSketchError, UnsupportedModelError
from lightning_sketch.gradients import GradientCapture, module_loss_fn, sketch_gradients
from lightning_sketch.gradients.capture import capture_support
from lightning_sketch.store import finite_rows

# The logger of the public module: its records keep the name they had before this module was split out.
log = logging.getLogger("lightning_sketch.callbacks.gradient_sketch")


class _Mode(Protocol):
    """What ``GradientSketch``'s hooks delegate to: one component per mode, holding that mode's state.

    ``GradientSketch.__init__`` builds the one its ``mode`` names; each hook calls the method of the
    same moment, after the checks the hook makes for every mode (no store: nothing to do; sanity
    checking and ``fast_dev_run``: no rows).
    """

    #: inline steps whose rows were dropped because the 16-bit gradient scaler overflowed (0 in
    #: checkpoint mode, which sketches no training step).
    skipped_overflow_steps: int

    def setup(self) -> None:
        """A new fit (``setup``): forget what the previous fit of this callback decided."""

    def fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_fit_start``, after the store was rolled back and the hook paths reset."""

    def resumed(self, trainer: Trainer) -> None:
        """``on_fit_start`` of a fit that resumes a checkpoint, right after the store's rollback."""

    def train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_train_start``."""

    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """``on_train_batch_start``."""

    def after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_after_backward``."""

    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """``on_train_batch_end``."""

    def epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``on_train_epoch_end``."""

    def close(self) -> None:
        """Release a live gradient capture (fit end, teardown, an exception)."""


class _RowWriter:
    """The plumbing that turns sketched rows into store appends, shared by both modes.

    Owns the inline buffer (rows of each slice waiting for one store append), the ids a resumed
    slice may see replayed (``_replayable``) and the count of non-finite rows dropped; the store is
    the caller's (the callback's, set in ``setup``).
    """

    def __init__(self, nan_policy: str) -> None:
        self.nan_policy = nan_policy
        self._buffer: dict[str, list[tuple[Tensor, Tensor]]] = {}
        # inline mode after a resume: the ids the last resumed slice holds, which Lightning may replay
        self._replayable: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.skipped_nonfinite = 0

    def expect_replays(self, name: str, committed: np.ndarray) -> None:
        """The resumed slice ``name`` holds the sorted unique ids ``committed``: their first rows since
        the resume are replays (see :meth:`flush`)."""
        self._replayable[name] = (committed, np.zeros(len(committed), dtype=bool))

    def forget_replays(self) -> None:
        self._replayable = {}

    def discard(self) -> None:
        """Drop the uncommitted buffer (the last committed state is kept)."""
        self._buffer = {}

    def append(self, store: Any, ids: Tensor, rows: Tensor, name: str, trainer: Trainer,
               defer: bool = False) -> None:
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
            self._buffer.setdefault(name, []).append((ids, rows))
            return
        store.append(ids, rows, checkpoint=name, rank=trainer.global_rank, nan_policy=self.nan_policy)

    def flush(self, store: Any, trainer: Trainer) -> None:
        """Move the inline buffer (rows ``[B, D]`` float32 per slice) into the store's buffer.

        After a resume, Lightning may train again on examples whose rows the resumed slice already
        holds (it replays the batches of an epoch from its start when the train loader cannot resume
        mid-epoch, or when the checkpoint was saved in ``on_train_epoch_end``). The first row since
        the resume of each id committed before it is skipped and counted as ``skipped_duplicates`` of
        the slice. Any other repeated id (within a batch, or twice since the fit started: broken
        ``ids_fn``, a sampler drawing with replacement) raises :class:`DuplicateIdError`.
        """
        for name, parts in self._buffer.items():
            ids = torch.cat([i for i, _ in parts])
            rows = torch.cat([r for _, r in parts])
            replayed = torch.from_numpy(self.take_replayed(name, ids.numpy()))
            if bool(replayed.any()):
                store.append(ids[replayed], rows[replayed], checkpoint=name, rank=trainer.global_rank,
                             on_duplicate="skip", nan_policy=self.nan_policy)
                rank_zero_warn(
                    f"GradientSketch inline: {int(replayed.sum())} rows of examples the resumed slice "
                    f"{name!r} already holds were skipped (counted as skipped_duplicates in the store "
                    f"manifest): Lightning replayed their batches after the resume. For rows equal to an "
                    f"uninterrupted run's, save checkpoints on the last batch of an epoch (ModelCheckpoint("
                    f"every_n_train_steps=<steps per epoch>)) or give the train loader "
                    f"state_dict/load_state_dict."
                )
            fresh = ~replayed
            try:
                store.append(ids[fresh], rows[fresh], checkpoint=name, rank=trainer.global_rank,
                             nan_policy=self.nan_policy)
            except DuplicateIdError as err:
                raise DuplicateIdError(
                    f"GradientSketch inline: an example id was trained twice in slice {name!r} ({err}). "
                    f"Each example of an epoch needs its own id: check ids_fn / id_key (they must return "
                    f"dataset indices, not labels), and use a sampler without replacement."
                ) from err
        self._buffer = {}

    def take_replayed(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Mask ``[B]`` bool of the ``ids`` that are the first occurrence since the resume of an id the
        resumed slice ``name`` committed before it; those ids are marked as taken."""
        mask = np.zeros(len(ids), dtype=bool)
        replay = self._replayable.get(name)
        if replay is None or not len(replay[0]):
            return mask
        committed, taken = replay  # sorted unique int64 ids, and which of them came back already
        pos = np.minimum(np.searchsorted(committed, ids), len(committed) - 1)
        for j in np.flatnonzero(committed[pos] == ids):
            if not taken[pos[j]]:
                taken[pos[j]] = True
                mask[j] = True
        return mask

    def commit(self, store: Any, trainer: Trainer) -> int:
        """Flush the buffer and commit the store; its new generation."""
        self.flush(store, trainer)
        return store.commit()


class _GradientSketchBase(Callback):
    """What ``GradientSketch`` shares with its mode components (their ``host``): its attributes (all
    set in its ``__init__``) and the helpers both modes use (example ids, the loss, sketched rows,
    commits)."""

    # arguments (see GradientSketch.__init__)
    dirpath: str
    sketch_kind: str
    sketch_dim: int | None
    seed: int
    mode: str
    every_n_epochs: int | None
    every_n_steps: int | None
    include: list[str] | None
    exclude: list[str] | None
    id_key: str
    nan_policy: str
    dtype: str
    chunk_size: int | None
    save_weights: bool
    attribution_dataloader: Any
    loss_fn: Callable[[nn.Module, Any], Tensor] | None
    ids_fn: Callable[[Any], Tensor] | None
    curvature: str
    task: Any
    # state
    _last_step_done: int
    _slices: list[str]
    _generation: int | None
    _resume_generation: int | None
    _generations: list[int] | None
    _resume_generations: list[int] | None
    store: Any
    sketch: Any
    layout: Any
    support: Any
    _hooks: bool
    _hooks_exact: bool | None
    #: the rows of both modes go through it
    _writer: _RowWriter

    @property
    def store_path(self) -> Path:
        """``<dirpath>/store``."""
        return Path(self.dirpath) / "store"

    @property
    def weights_path(self) -> Path:
        """``<dirpath>/weights``."""
        return Path(self.dirpath) / "weights"

    def _skip(self, trainer: Trainer) -> bool:
        # Trainer sets fast_dev_run in __init__ (_init_debugging_flags) without declaring it on the class
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]
        return trainer.sanity_checking or bool(fast_dev_run) or self.store is None

    def _commit(self, trainer: Trainer) -> None:
        self._generation = self._writer.commit(self.store, trainer)

    def _ids(self, batch: Any) -> Tensor:
        return _as_ids(self.ids_fn(batch) if self.ids_fn is not None else default_ids(batch, self.id_key))

    def _loss_fn(self, pl_module: LightningModule) -> Callable[[nn.Module, Any], Tensor]:
        return module_loss_fn(pl_module, self.loss_fn, who="GradientSketch ")

    def _slice_capture(self, pl_module: LightningModule) -> GradientCapture | None:
        """One capture for a whole pass over a set of batches (its plan and buffer reused), carrying
        the fit's verdict of the hook paths against autograd (``_capture_check``); None without hooks."""
        if not self._hooks:
            return None
        cap = GradientCapture(pl_module, self.sketch, self.layout, loss_scale="sum")
        cap.exact = self._hooks_exact
        return cap

    def _sketch_rows(self, pl_module: LightningModule, fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                     cap: Any) -> Any:
        """``[B, D]`` sketched per-example gradients of ``fn`` on ``batch`` (eval mode, the caller's
        context); the capture's verdict against autograd is kept for the fit (``_hooks_exact``)."""
        rows = _vmap_guard(lambda: sketch_gradients(
            pl_module, fn, batch, self.sketch, mode="auto" if self._hooks else "explicit",
            layout=self.layout, chunk_size=self.chunk_size, capture=cap,
        ), self.support, self.exclude)
        if cap is not None:
            self._hooks_exact = cap.exact
        return rows


def _check_support(pl_module: nn.Module, layout: Any, exclude: list[str] | None) -> Any:
    """Setup-time check of the per-example gradient paths: log the modules covered, warn once about
    the per-module fallback, refuse modules no path serves with ``exclude=`` advice."""

    compiled = _compiled_modules(pl_module)
    if compiled:
        raise UnsupportedModelError(
            f"GradientSketch: {compiled} {'is' if len(compiled) == 1 else 'are'} torch.compile'd; "
            "per-example gradients are taken through module hooks and torch.func, which a compiled graph "
            "bypasses, so no row could be computed. Sketch the uncompiled model (compile it after the "
            "sketched run), or leave these modules uncompiled."
        )
    support = capture_support(pl_module, layout)
    if support.unsupported:
        rank_zero_warn(
            "GradientSketch: no hook path covers "
            + "; ".join(f"{n or '<root>'} ({r})" for n, r in support.unsupported.items())
            + ", so per-example gradients use vmap over the whole model (slower; inline mode then takes "
            f"them in eval mode before the step). To keep the hook path: GradientSketch(..., "
            f"exclude={_advice(support, exclude)!r})."
        )
        return support
    log.info("GradientSketch: %s", support.summary().replace("\n", "; "))
    if support.fallback:
        slow = support.fallback_params()
        rank_zero_warn(
            "GradientSketch: these modules are not on the hook fast path and go through a per-module "
            f"torch.func fallback (one extra forward+backward of each): {support.summary().splitlines()[1]}. "
            f"Exact for modules that treat examples independently; random ones (dropout inside) are "
            f"recomputed with other masks. To skip them: "
            f"GradientSketch(..., exclude={list(exclude or []) + slow!r})."
        )
    return support


def _compiled_modules(pl_module: nn.Module) -> list[str]:
    """Names of the ``torch.compile``'d modules (``OptimizedModule``) in ``pl_module``, the root as
    ``<the LightningModule>`` (Lightning marks a compiled LightningModule with ``_compiler_ctx``)."""
    from torch._dynamo.eval_frame import OptimizedModule  # torch's public torch.compile wrapper class

    names = [n or "<the LightningModule>" for n, m in pl_module.named_modules()
             if isinstance(m, OptimizedModule)]
    if getattr(pl_module, "_compiler_ctx", None) and "<the LightningModule>" not in names:
        names.insert(0, "<the LightningModule>")
    return names


def _advice(support: Any, exclude: list[str] | None) -> list[str]:
    names = [p for n in support.unsupported for p in support.params.get(n, [])]
    return list(exclude or []) + names


def _vmap_guard(fn: Callable[[], Tensor], support: Any, exclude: list[str] | None) -> Tensor:
    """Run the whole-model vmap path; turn a failure inside the model's forward into advice."""

    try:
        return fn()
    except LightningSketchError:
        raise
    except (RuntimeError, TypeError, ValueError) as err:
        if not support.unsupported:  # the hook path ran: an error of the model's own forward
            raise
        raise UnsupportedModelError(
            f"GradientSketch: vmap over the whole model failed ({type(err).__name__}: {str(err)[:300]}). "
            f"It is only used because no hook path covers {sorted(support.unsupported)}; leave those "
            f"parameters out with GradientSketch(..., exclude={_advice(support, exclude)!r})."
        ) from err
