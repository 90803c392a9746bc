"""HessianSpectrum: snapshots of the top Hessian eigenvalues during training.

arXiv 2402.03994, eq. 10; Sec. 5.5.

A thin Lightning adapter over :func:`lightning_sketch.spectrum.spectrum_snapshot`: on a schedule of
``trainer.global_step`` values it runs Lanczos (full re-orthogonalisation) on the sketched
operator v ↦ Φ H Φᵀ v over a probe set fixed at the start of training, logs scalars under
``hessian/...``, writes one snapshot file per step (format in
:mod:`lightning_sketch.spectrum.snapshot`) and draws the eigenvalue trajectories and densities at
the end of ``fit``.

Each snapshot's Lanczos stops once its top-k Ritz pairs have converged (residual ≤ ``tol``·|λ_max|,
``SpectrumNumerics``), or after ``num_iter`` steps; the residuals, flags and the steps taken are in
the snapshot file and logged. A fit in which some snapshot's pairs did not converge warns once (rank
zero), naming the first such step and what to change.

Cost: by default (``budget=1.0``) the snapshots of a fit together take at most about as long as its
training steps, so the fit takes about twice as long as without the callback. The callback times
the training steps (``on_train_batch_start`` → ``on_train_batch_end``; before the first step, one
forward+backward over a probe batch, timed in ``on_train_start``, stands in) and each snapshot's HVPs, and
:mod:`lightning_sketch.spectrum.budget` turns the share left to a snapshot into HVP counts: Lanczos
steps for the top-k pairs first, then density probes and steps from what remains (no density when
nothing does). With ``probe_batches`` unset, the first snapshot's share also sets the probe set's
size, once per fit: 4 batches, or as many as still pay the unbudgeted Lanczos steps (at least 1),
since top-k pairs that converge on fewer examples tell more than unconverged ones on more. A
snapshot that cannot afford k HVPs from what the whole fit has left is skipped, with one warning
per fit. Explicit counts (``num_iter``, ``density_runs``, ``density_iter``,
``density=True``, ``trace=True``) are kept and their snapshots never skipped, with one warning when
they exceed the budget.

It never changes training: HVPs use ``torch.func``/``autograd.grad`` (``.grad`` untouched), the
module's train/eval mode is restored, and the global RNG streams are forked and restored.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_sketch._checks import boolean, integer, is_int, number, one_of, positive_int, refuse, str_list
from lightning_sketch.callbacks._progress import progress_bar
from lightning_sketch.callbacks._spectrum_options import SpectrumNumerics
from lightning_sketch.callbacks._strategy import check_model_parallel
from lightning_sketch.exceptions import (
    RunMismatchError,
    SketchConfigError,
    UnsupportedModelError,
    UnsupportedStrategyError,
)
from lightning_sketch.gradients import module_loss_fn, train_mode
from lightning_sketch.gradients.sharded import gathered
from lightning_sketch.layout import ParamLayout
from lightning_sketch.report.plots import save_png, spectrum_history_figure
from lightning_sketch.sketches import KINDS, derive_seed, make
from lightning_sketch.spectrum.budget import (
    DEFAULT_DENSITY_ITER,
    DEFAULT_DENSITY_RUNS,
    DEFAULT_PROBE_BATCHES,
    affordable_probe_batches,
    default_lanczos_steps,
    snapshot_seconds,
)
from lightning_sketch.spectrum.monitor import spectrum_snapshot
from lightning_sketch.spectrum.snapshot import SnapshotWriter, load_snapshot

__all__ = ["PAPER_STEPS", "HessianSpectrum", "SpectrumNumerics"]

#: the paper's explicit snapshot steps (App. B.8), besides "every 1,000 steps".
PAPER_STEPS: tuple[int, ...] = (0, 10, 50, 100, 150, 200, 250, 500)


def _last_batch_of_fit(trainer: Trainer) -> bool:
    """Whether the batch that just ended is the fit's last: ``max_steps`` reached, or the last batch
    of the last of ``max_epochs``."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(trainer.is_last_batch) and max_epochs is not None and max_epochs >= 0 and (
        trainer.current_epoch + 1 >= max_epochs)


class HessianSpectrum(Callback):
    """Top-k Hessian eigenvalues (sketched), RNEG, outliers, alignment and density during ``fit``.

    Args:
        k: number of top eigenpairs per snapshot.
        sketch_kind: sketch kind for Φ (``affd`` as in the paper), or ``None`` for the exact,
            unsketched operator (small models only: the Krylov basis then holds N-vectors).
        sketch_dim: D, the sketch dimension (capped at N with a warning).
        seed: seed of Φ and of the callback's own generators (start and probe vectors).
        every_n_steps: also snapshot when ``global_step % every_n_steps == 0`` (None: off).
        at_steps: explicit snapshot steps (default: the paper's 0, 10, 50, ..., 500).
        probe_batches: number of batches of the train dataloader forming the fixed probe set. None
            (default): 4, or fewer when a budget is set and its share for the first snapshot cannot
            pay the unbudgeted Lanczos steps over 4 batches (``spectrum.budget.affordable_probe_batches``;
            decided once per fit, at the first snapshot, and recorded in each snapshot's meta).
        density: an SLQ spectral density (``density_runs × density_iter`` HVPs): None (default) when
            the budget leaves room for it after the top-k pairs, True always, False never.
        trace: also estimate the trace of Φ H Φᵀ by Hutch++ (``trace_matvecs`` HVPs).
        budget: the snapshots of a fit together may take at most ``budget`` times its training time
            (the wall time of its training steps, measured): 1.0 (default) keeps the fit within about
            2× a fit without the callback. Each snapshot gets an equal share of what is left; its unset
            counts (``num_iter``, ``density``, ``density_runs``, ``density_iter``) are chosen to fit.
            ``None``: no budget (every snapshot runs ``min(D, max(4k, 40))`` Lanczos steps at most and,
            unless ``density=False``, 4 density probes of 40 steps). Every snapshot runs at least k
            Lanczos steps, and the fit's first always runs (its HVPs measure what an HVP costs), so a fit
            shorter than about one such snapshot exceeds the budget; later snapshots that the fit's
            remaining budget cannot pay k HVPs for are skipped (``skipped``).
        numerics: the numerical settings, a :class:`SpectrumNumerics` (most Lanczos steps
            ``num_iter``, convergence ``tol`` and ``stop_early``, ``hvp_method``, Krylov ``dtype``,
            module ``mode``, ``outlier_threshold``, ``density_runs``, ``density_iter``,
            ``trace_matvecs``); default ``SpectrumNumerics()``. In YAML a mapping
            ``numerics: {num_iter: 40}``.
        dirpath: directory of the snapshot files; default
            ``<trainer.log_dir or default_root_dir>/hessian_spectrum``. Rank 0 locks it for the whole
            fit (:class:`~lightning_sketch.spectrum.snapshot.SnapshotWriter`): a second run into the
            same directory fails at ``setup`` with ``StoreWriteError``.
        plot: draw ``spectrum.png`` (trajectories and densities) at the end of ``fit``.
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses; default
            ``pl_module.per_example_loss(batch)``. Not settable from YAML.
        probe_dataloader: an iterable of batches to take the probe set from instead of the train
            dataloader. Not settable from YAML.
        include: fnmatch patterns of the parameters whose Hessian block is studied (default: all
            trainable), as in ``GradientSketch(include=...)``; with the same patterns and sketch
            spec the snapshots match a gradient store's layout (``arnoldi_if``).
        exclude: fnmatch patterns of parameters to leave out (held fixed in the HVPs).

    Raises:
        SketchConfigError: on invalid arguments.

    Example::
        trainer = Trainer(callbacks=[HessianSpectrum(k=10, sketch_kind="affd", sketch_dim=1024)])
    """

    def __init__(
        self,
        k: int = 10,
        sketch_kind: str | None = "affd",
        sketch_dim: int = 1024,
        seed: int = 0,
        every_n_steps: int | None = 1000,
        at_steps: list[int] | None = None,
        probe_batches: int | None = None,
        density: bool | None = None,
        trace: bool = False,
        budget: float | None = 1.0,
        numerics: SpectrumNumerics | None = None,
        dirpath: str | None = None,
        plot: bool = True,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        probe_dataloader: Any = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        super().__init__()
        for name, pats in (("include", include), ("exclude", exclude)):
            str_list(name, pats, allow_none=True,
                     hint=f"Patterns are fnmatch strings; write [{pats!r}] for one.")
        k = positive_int("k", k)
        sketch_dim = positive_int("sketch_dim", sketch_dim)
        every_n_steps = positive_int("every_n_steps", every_n_steps, allow_none=True)
        probe_batches = positive_int("probe_batches", probe_batches, allow_none=True)
        if numerics is not None and not isinstance(numerics, SpectrumNumerics):
            raise SketchConfigError(f"`numerics` must be a SpectrumNumerics, got {type(numerics).__name__}.")
        self.numerics = numerics if numerics is not None else SpectrumNumerics()
        one_of("sketch_kind", sketch_kind, sorted(KINDS), allow_none=True)
        seed = integer("seed", seed)
        steps = list(PAPER_STEPS) if at_steps is None else at_steps
        if not isinstance(steps, (list, tuple)) or not all(is_int(s) and s >= 0 for s in steps):
            raise refuse("at_steps", "a list of non-negative ints", at_steps, allow_none=True)
        steps = [int(s) for s in steps]
        trace = boolean("trace", trace)
        plot = boolean("plot", plot)
        density = boolean("density", density, allow_none=True, hint="None: when the budget allows.")
        budget = number("budget", budget, low=0, low_open=True, allow_none=True,
                        hint="Snapshots' time over training time; 1.0 keeps the fit within about 2x.")
        if loss_fn is not None and not callable(loss_fn):
            raise SketchConfigError("`loss_fn` must be callable(module, batch) -> [B], got "
                                    f"{type(loss_fn).__name__}.")
        self.k, self.sketch_kind, self.sketch_dim, self.seed = k, sketch_kind, sketch_dim, seed
        self.every_n_steps, self.at_steps = every_n_steps, sorted(set(steps))
        self.probe_batches, self.density, self.trace = probe_batches, density, trace
        self.budget = budget
        self.dirpath, self.plot = dirpath, plot
        self.loss_fn, self.probe_dataloader = loss_fn, probe_dataloader
        self.include, self.exclude = include, exclude
        self.history: list[dict[str, Any]] = []
        self._last_step: int = -1
        self._probe: list[Any] | None = None
        self._probe_fixed = False  # the probe set's size is decided at the first snapshot of a fit
        self._last_step_s: float | None = None
        self._sketch: Any = None
        self._layout: Any = None
        self._dir: Path | None = None
        self._writer: SnapshotWriter | None = None
        #: (run_id, index generation) of the snapshot directory recorded in the resume checkpoint
        self._resume_index: tuple[Any, Any] | None = None
        self._warned_unconverged = False
        #: the clock timing training steps and snapshots (seconds, monotonic); tests replace it.
        self.clock: Callable[[], float] = time.perf_counter
        self.skipped: list[int] = []
        self._reset_timing()

    def _reset_timing(self) -> None:
        self._step_seconds, self._steps_timed = 0.0, 0
        self._step_t0: float | None = None
        self._spent, self._per_matvec, self._fit_start = 0.0, math.nan, 0
        self._first_step_seconds: float | None = None
        self._warned_skip = self._warned_explicit = False

    # ------------------------------------------------------------------ policy
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            sketch_kind=self.sketch_kind, sketch_dim=self.sketch_dim, seed=self.seed, k=self.k
        )

    def should_run(self, step: int) -> bool:
        """Whether ``global_step == step`` is a snapshot step (and not already done)."""
        if step <= self._last_step:
            return False
        return step in self.at_steps or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._warned_unconverged = False
        self._reset_timing()
        self._check_strategy(trainer.strategy)
        self._loss_fn(pl_module)  # fail at setup, not at the first snapshot
        base = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hessian_spectrum")
        self._dir = Path(trainer.strategy.broadcast(base))
        if trainer.is_global_zero and self._writer is None:
            # one writer per directory for the whole fit: a second run into it fails here, not mid-way
            self._writer = SnapshotWriter(self._dir)

    def _check_strategy(self, strategy: Strategy) -> None:
        """Refuse, at setup, the strategies whose parameters the HVPs cannot read (by type, so DDP passes)."""
        if check_model_parallel(strategy, "HessianSpectrum"):
            return  # FSDP2: every snapshot gathers the whole parameters (gradients.sharded.gathered)
        sharded = isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))
        if sharded and self.numerics.hvp_method != "finite_difference":
            raise UnsupportedStrategyError(
                f"HessianSpectrum with {type(strategy).__name__} needs "
                f"hvp_method='finite_difference' (got {self.numerics.hvp_method!r}): sharded parameters "
                "break double-backward and forward-mode HVPs. With FSDP2 (ModelParallelStrategy and "
                "fully_shard) every hvp_method works."
            )

    def _loss_fn(self, pl_module: LightningModule) -> Callable[[Any, Any], Tensor]:
        return module_loss_fn(pl_module, self.loss_fn, who="HessianSpectrum ", error=UnsupportedModelError)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        """Fix the probe set, the parameter layout and Φ (once per fit); return the probe set."""
        if self._probe is not None:
            return self._probe
        loader = self.probe_dataloader if self.probe_dataloader is not None else trainer.train_dataloader
        if loader is None:
            raise UnsupportedModelError(
                "HessianSpectrum found no train dataloader; pass `probe_dataloader=`."
            )
        probe: list[Any] = []
        # Iterating a shuffling DataLoader draws from the global RNG: fork it so training is unchanged.
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                probe.append(trainer.strategy.batch_to_device(batch, pl_module.device))
                if len(probe) >= (self.probe_batches or DEFAULT_PROBE_BATCHES):
                    break
        if not probe:
            raise UnsupportedModelError("HessianSpectrum's probe dataloader is empty; it needs at least one "
                                        "batch.")
        self._probe = probe
        self._layout = ParamLayout.from_module(pl_module, include=self.include, exclude=self.exclude)
        n = self._layout.dim
        if self.sketch_kind is None:
            self._sketch = None
        else:
            d = self.sketch_dim
            if self.sketch_kind == "identity":
                d = n
            elif d > n:
                rank_zero_warn(f"HessianSpectrum: sketch_dim={d} > N={n}; using sketch_dim={n}.")
                d = n
            self._sketch = make(self.sketch_kind, n, d, seed=self.seed)
        return probe

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_snapshot(trainer, pl_module)
        self._step_t0 = self.clock()  # after this hook's snapshot: the step's own time starts here

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_t0 is not None:
            self._step_seconds += self.clock() - self._step_t0
            self._steps_timed += 1
            self._step_t0 = None
        if _last_batch_of_fit(trainer):
            # The fit's last step is snapshot here, before that step's checkpoint is saved (Lightning runs
            # checkpoint callbacks after the others): a resume from that checkpoint is a finished fit in
            # which Lightning calls no training hook, so it could not take the snapshot later.
            # on_train_end remains the guard for fits that stop otherwise (early stopping, a time limit).
            self._maybe_snapshot(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = int(trainer.global_step)
        # fast_dev_run: see _maybe_snapshot
        if self.budget is not None and not trainer.fast_dev_run:  # type: ignore[attr-defined]
            # Timed here, before any batch: from on_train_batch_start on, other callbacks' hooks (an inline
            # GradientSketch's capture) would record this forward+backward as part of the training step.
            probe = self._prepare(trainer, pl_module)
            self._first_step_seconds = self._probe_step_seconds(pl_module, probe[0])

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Last-step guard: the final optimizer step has no following batch start.
        self._maybe_snapshot(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plot and self.history and trainer.is_global_zero and self._dir is not None:
            self.plot_history(self._dir / "spectrum.png")
        trainer.strategy.barrier()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # release the cached probe batches; a new fit fixes a new probe set
            self._probe, self._sketch, self._layout = None, None, None
            self._probe_fixed = False
            self._close_writer()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _maybe_snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Trainer sets fast_dev_run in __init__ (_init_debugging_flags) without declaring it on the class
        if trainer.sanity_checking or trainer.fast_dev_run:  # type: ignore[attr-defined]
            return
        step = int(trainer.global_step)
        if not self.should_run(step):
            return
        self._prepare(trainer, pl_module)
        self.snapshot(trainer, pl_module, step)

    def snapshot(self, trainer: Trainer, pl_module: LightningModule, step: int) -> dict[str, Any] | None:
        """Run one snapshot now (all ranks), log it, write its file (rank 0) and record it.

        Returns:
            The history entry, or None when the budget is spent (the step is added to ``skipped``).
        """
        probe = self._prepare(trainer, pl_module)
        allowance = self._allowance(trainer, pl_module, step, probe)
        if allowance is not None and self._skip(trainer, step, allowance):
            return None
        probe = self._fix_probe(trainer, probe, allowance)
        world = trainer.world_size
        ddp_reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if world > 1 else None
        bar = progress_bar(trainer, self._expected_matvecs(), f"HessianSpectrum step {step}", unit="HVP")
        reduce = ddp_reduce
        if bar is not None:  # every matvec (and the probe gradient) passes through `reduce`: count it there

            def reduce(t: Tensor) -> Tensor:
                bar.update(1)
                return ddp_reduce(t) if ddp_reduce is not None else t

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "hessian_spectrum", f"step{step}"))
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:
            num = self.numerics
            # gathered: under FSDP2 the HVPs run on whole, plain parameters (one copy per rank)
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), gathered(pl_module), \
                    train_mode(pl_module, num.mode == "train"):
                snap = spectrum_snapshot(
                    pl_module, self._loss_fn(pl_module), probe, k=min(self.k, self._op_dim()),
                    sketch=self._sketch, num_iter=self._num_iter(), method=num.hvp_method,
                    layout=self._layout, generator=gen, density=self.density, density_runs=num.density_runs,
                    density_iter=None if num.density_iter is None else min(num.density_iter, self._op_dim()),
                    trace=self.trace,
                    trace_matvecs=num.trace_matvecs, threshold=num.outlier_threshold,
                    dtype=getattr(torch, num.dtype), reduce=reduce, cache_graph=num.cache_graph,
                    tol=num.tol, tol_scale="norm", stop_early=num.stop_early,
                    max_seconds=None if allowance is None else allowance[0], clock=self.clock,
                )
        finally:
            if bar is not None:
                bar.close()
        scalars = snap.scalars()
        self._spent += snap.seconds
        if math.isfinite(snap.seconds_per_matvec):
            self._per_matvec = snap.seconds_per_matvec
        if allowance is not None:
            scalars["budget_seconds"] = allowance[0]
            self._warn_explicit(snap, step, allowance[0])
        self._warn_unconverged(snap, step)
        entry = {"step": step, "eigenvalues": snap.eigs.eigenvalues.tolist(), "scalars": scalars,
                 "file": None}
        if trainer.is_global_zero and self._dir is not None:
            if self._writer is None:  # snapshot() called outside fit
                self._writer = SnapshotWriter(self._dir)
            meta = {"sketch_spec": snap.sketch_spec, "scalars": scalars, "which": "LA",
                    "num_matvecs": snap.num_matvecs, "lanczos_matvecs": snap.eigs.num_matvecs,
                    "tol": self.numerics.tol, "tol_scale": "norm", "hvp_method": self.numerics.hvp_method,
                    "budget": self.budget,
                    "density_runs": 0 if snap.density is None else len(snap.density.nodes),
                    "world_size": world,
                    "probe_batches": len(probe), "layout_fingerprint": self._layout.fingerprint()}
            entry["file"] = str(self._writer.write(step, snap.arrays(), meta))
        for logger in trainer.loggers:
            logger.log_metrics({f"hessian/{k}": v for k, v in scalars.items()}, step=step)
        self.history.append(entry)
        self._last_step = step
        trainer.strategy.barrier()
        return entry

    def _warn_unconverged(self, snap: Any, step: int) -> None:
        """Warn (rank zero, once per fit) when this snapshot's top-k pairs missed ``numerics.tol``."""
        conv = snap.eigs.converged
        if self._warned_unconverged or bool(conv.all()):
            return
        self._warned_unconverged = True
        k, steps = int(conv.numel()), snap.eigs.num_matvecs
        worst = float(snap.relative_residuals().max())
        more = (f"raise `numerics.num_iter` (SpectrumNumerics(num_iter=...), now {steps}; at most "
                f"D={self._op_dim()}) or " if steps < self._op_dim() else "")
        if self.budget is not None and self.numerics.num_iter is None and steps < default_lanczos_steps(
                conv.numel(), self._op_dim()):
            more = (f"raise `budget` (now {self.budget:g}: it allowed {steps} Lanczos steps), set "
                    f"`numerics.num_iter` (an explicit count is kept whatever the budget) or ")
        rank_zero_warn(
            f"HessianSpectrum: at step {step} only {int(conv.sum())} of {k} top eigenpairs converged after "
            f"{steps} Lanczos steps (largest relative residual {worst:.3g} > tol={self.numerics.tol:g}); "
            f"their eigenvalues are approximate. To converge, {more}ask for fewer eigenpairs (`k`). "
            "Warned once per fit; every snapshot logs hessian/converged and hessian/max_rel_residual."
        )

    # ------------------------------------------------------------------ budget
    def _allowance(self, trainer: Trainer, pl_module: LightningModule, step: int,
                   probe: list[Any]) -> tuple[float, float] | None:
        """``(seconds for this snapshot, seconds left to the fit's snapshots)`` (rank 0's), or None."""
        if self.budget is None:
            return None
        if self._steps_timed:
            step_s = self._step_seconds / self._steps_timed
        elif self._first_step_seconds is not None:  # before the first step, timed in on_train_start
            step_s = self._first_step_seconds
        else:  # called outside fit: one forward+backward over a probe batch stands in for a step
            step_s = self._probe_step_seconds(pl_module, probe[0])
        total = float(trainer.estimated_stepping_batches)
        if math.isfinite(total):
            train_steps, left = max(1.0, total - self._fit_start), self._snapshots_left(step, int(total))
        else:  # an open-ended fit: the steps up to the next snapshot pay for this one
            nxt = self._next_step(step)
            train_steps, left = float(nxt - self._fit_start), 1
        share = snapshot_seconds(self.budget, step_s, train_steps, self._spent, max(1, left))
        self._last_step_s = step_s
        out = (share, share * max(1, left))
        return tuple(trainer.strategy.broadcast(out))  # type: ignore[return-value]

    def _fix_probe(self, trainer: Trainer, probe: list[Any],
                   allowance: tuple[float, float] | None) -> list[Any]:
        """At the first snapshot of a fit: with ``probe_batches=None`` under a budget, keep the most
        batches over which the snapshot's share still pays the unbudgeted Lanczos steps (rank 0 decides
        for all); the probe set is fixed from then on."""
        if self._probe_fixed:
            return probe
        self._probe_fixed = True
        if self.probe_batches is not None or allowance is None or self._last_step_s is None:
            return probe
        keep = affordable_probe_batches(allowance[0], self._last_step_s, min(self.k, self._op_dim()),
                                        self._op_dim(), most=len(probe))
        keep = int(trainer.strategy.broadcast(keep))
        self._probe = probe = probe[:keep]
        return probe

    def _probe_step_seconds(self, pl_module: LightningModule, batch: Any) -> float:
        """Wall time of one forward+backward over ``batch`` (no ``.grad`` written, RNG and mode restored)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        # eval mode: BatchNorm must not update its running statistics outside training
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), train_mode(pl_module, False):
            t = self.clock()
            loss = self._loss_fn(pl_module)(pl_module, batch).mean()
            torch.autograd.grad(loss, params, allow_unused=True)
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            seconds = self.clock() - t
        self._spent += seconds
        return seconds

    def _skip(self, trainer: Trainer, step: int, allowance: tuple[float, float]) -> bool:
        """Skip (and say so once per fit) when the fit's budget cannot pay for k HVPs."""
        per = self._per_matvec
        least = min(self.k, self._op_dim()) * per
        enough = self._explicit() or not math.isfinite(per) or allowance[1] >= least
        if trainer.strategy.broadcast(bool(enough)):  # rank 0 decides: every rank runs the snapshot or none
            return False
        self.skipped.append(step)
        self._last_step = step
        if not self._warned_skip:
            self._warned_skip = True
            rank_zero_warn(
                f"HessianSpectrum: skipped the snapshot at step {step}: the budget (budget={self.budget:g}, "
                f"snapshots together at most {self.budget:g}x the training time) has {allowance[1]:.3g} s "
                f"left, less than k={self.k} HVPs of {per:.3g} s. Raise `budget`, snapshot less often "
                "(`at_steps`, `every_n_steps`) or pass budget=None. Warned once per fit; the skipped steps "
                "are in `HessianSpectrum.skipped`."
            )
        return True

    def _explicit(self) -> list[str]:
        """The counts set explicitly (kept over the budget; such snapshots are never skipped)."""
        num = self.numerics
        return [name for name, on in (
            ("numerics.num_iter", num.num_iter is not None), ("density=True", self.density is True),
            ("numerics.density_runs", num.density_runs is not None),
            ("numerics.density_iter", num.density_iter is not None), ("trace=True", self.trace),
        ) if on]

    def _warn_explicit(self, snap: Any, step: int, allowed: float) -> None:
        """Warn once per fit when explicit counts made a snapshot exceed its share of the budget."""
        explicit = self._explicit()
        if self._warned_explicit or not explicit or snap.seconds <= allowed:
            return
        self._warned_explicit = True
        rank_zero_warn(
            f"HessianSpectrum: the snapshot at step {step} took {snap.seconds:.3g} s "
            f"({snap.num_matvecs} HVPs) "
            f"against the {allowed:.3g} s its share of budget={self.budget:g} allowed, because explicit "
            f"settings are kept over the budget: {', '.join(explicit)}. Leave them unset to let the budget "
            "choose, or raise `budget` (None: no budget). Warned once per fit."
        )

    def _next_step(self, step: int) -> int:
        later = [s for s in self.at_steps if s > step]
        if self.every_n_steps is not None:
            later.append((step // self.every_n_steps + 1) * self.every_n_steps)
        return min(later) if later else step + 1

    def _snapshots_left(self, step: int, last: int) -> int:
        """Scheduled snapshot steps in ``[step, last]``."""
        if last < step:
            return 1
        extra = sum(1 for s in self.at_steps if step <= s <= last and (
            self.every_n_steps is None or s % self.every_n_steps))
        if self.every_n_steps is None:
            return max(1, extra)
        n = self.every_n_steps
        return max(1, extra + last // n - (step - 1) // n if step > 0 else extra + last // n + 1)

    def _op_dim(self) -> int:
        return self._sketch.sketch_dim if self._sketch is not None else self._layout.dim

    def _expected_matvecs(self) -> int:
        """Matvecs of one snapshot (Lanczos, density, trace, plus the probe gradient): the bar's total."""
        dim = self._op_dim()
        lanczos = self._num_iter() or min(dim, max(4 * self.k, 40))
        runs = self.numerics.density_runs or DEFAULT_DENSITY_RUNS
        steps = min(self.numerics.density_iter or DEFAULT_DENSITY_ITER, dim)
        density = runs * steps if self.density is not False else 0
        return lanczos + density + (self.numerics.trace_matvecs if self.trace else 0) + 1

    def _num_iter(self) -> int | None:
        if self.numerics.num_iter is None:
            return None
        return min(self.numerics.num_iter, self._op_dim())

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        w = self._writer
        return {"history": list(self.history), "last_step": self._last_step, "dirpath": str(self._dir or ""),
                # the snapshot directory this checkpoint was saved with: a resume refuses another run's
                # index or an older copy of it
                "run_id": None if w is None else w.run_id,
                "index_generation": None if w is None else w.generation,
                "skipped": list(self.skipped)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = int(state_dict.get("last_step", -1))
        self.skipped = [int(s) for s in state_dict.get("skipped", [])]
        self._resume_index = (state_dict.get("run_id"), state_dict.get("index_generation"))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resume, self._resume_index = self._resume_index, None
        w = self._writer
        if w is None or resume is None:
            return
        run_id, gen = resume
        index = self._dir / "index.json" if self._dir is not None else "index.json"
        if isinstance(gen, int) and w.generation < gen:
            raise RunMismatchError(
                f"The spectrum index {str(index)!r} is at generation {w.generation}, older than "
                f"generation {gen} "
                f"recorded in the resume checkpoint {str(trainer.ckpt_path)!r}: an older copy of "
                "the index was "
                "put back (or it was deleted). Restore the index written with this checkpoint."
            )
        if run_id is not None and w.run_id != run_id:
            raise RunMismatchError(
                f"The spectrum index {str(index)!r} belongs to run {w.run_id!r}, but the resume checkpoint "
                f"{str(trainer.ckpt_path)!r} was saved with run {run_id!r}: the snapshot directory "
                "is another "
                "run's. Resume with this run's snapshot directory."
            )

    # ------------------------------------------------------------------ plot
    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Eigenvalue trajectories (left) and SLQ densities (right) as a PNG (``plots``)."""
        densities = []
        for j, e in enumerate(self.history):
            if not e.get("file") or not Path(e["file"]).is_file():
                continue
            snap = load_snapshot(e["file"])
            if "density" in snap:
                densities.append((j, snap["density_grid"].numpy(), snap["density"].numpy()))
        fig = spectrum_history_figure(self.history, densities)
        # written atomically (plots.save_png): never through a planted symlink
        return save_png(fig, Path(path), dpi=100, what="spectrum plot")
