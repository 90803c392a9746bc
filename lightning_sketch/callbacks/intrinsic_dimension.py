"""``IntrinsicDimension``: subspace training θ = θ0 + Φᵀω and the paper's single-run doubling search.

The callback reparametrises the LightningModule with
:meth:`~lightning_sketch.intrinsic.Subspace.attach` in ``setup`` (before ``configure_optimizers``),
so an ordinary ``configure_optimizers`` over ``self.parameters()`` trains only ω (θ0 is frozen).

**Evaluation cadence.** The metric is the module's own validation metric: the callback reads
``trainer.callback_metrics[monitor]`` in ``on_validation_end``, i.e. after each of Lightning's
validation runs. Set the cadence c on the Trainer, e.g. ``Trainer(val_check_interval=c,
check_val_every_n_epoch=None)`` for every c optimiser steps; ``eval_every_n_steps=c`` additionally
makes a round last at least c optimiser steps when validation runs more often. The module must
``self.log(monitor, ...)`` in ``validation_step`` (with ``sync_dist=True`` under DDP; rank 0's value
is broadcast anyway, so every rank takes the same decision).

**Search mode** (arXiv 2402.03994, Listing 9): start at ``d_min`` active coordinates of one projection
of size ``sketch_dim`` = D_max; after each round, stop (``trainer.should_stop``) once the metric
reaches the target, double d (unmasking coordinates; learned values are kept) when the round
gained less than ``delta``, fail when d cannot grow. The target is ``target`` if given, else
``target_fraction × reference_score`` (90% of the full fine-tuning score by default). These five
settings form the :class:`SearchCriteria` option group (``criteria:`` in YAML). To measure
the reference yourself, run a plain fit first (:func:`measure_reference_score`). The metric at θ0
seeds the search (Listing 9's ``previous = metric(θ0)``): the callback measures it with Lightning's
sanity check over the whole validation set, so in search mode it sets ``num_sanity_val_steps=-1``
for fit (a resumed run restores the baseline from its checkpoint instead). When 2d would pass
``sketch_dim`` the doubling is clamped there; the result (``summary()["clamped"]`` and the history)
says so.

**Fixed mode**: plain subspace training at active size ``d``; with a ``target`` it records whether
the target was reached. This is the **verification run** that removes the factor-2 ambiguity of
D*: train with ``mode="fixed", d=D*//2, criteria=SearchCriteria(target=...)`` for as many steps as
the search took; if the target is not reached, D_int lies in (D*/2, D*].

**Outputs**: ``callback.d_star`` (None until found), ``callback.history`` (dicts with step, d,
metric, action), metrics ``intrinsic/d``, ``intrinsic/metric`` and ``intrinsic/d_star`` through
``trainer.loggers``, and ``<dirpath>/intrinsic_dimension.json`` (rank 0) with the spec, target,
status, D* and history, and ``intrinsic_dimension.png`` (the metric against steps and against d) at
the end of fit. ``dirpath`` defaults to ``trainer.log_dir`` or ``default_root_dir``.

**Resuming and DDP**: ``state_dict`` holds the search state, the active size and the history; ω is a
parameter of the module, so it is in the model checkpoint, and Φ is rebuilt from its seed on every
rank (compare ranks with ``Subspace.projection_checksum()``). Take checkpoints *after* validation
(``ModelCheckpoint(save_on_train_epoch_end=False)``, or with a ``monitor``): a checkpoint saved by
``every_n_train_steps`` at a step that also validates is written before that validation, and
Lightning does not replay it on resume, so that search round would be lost (tests/reliability).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sketch.callbacks._intrinsic_support import (
    _check_init_args,
    _check_omega_in_optimizer,
    _check_strategy,
    _disk_sha,
    measure_reference_score,
)
from lightning_sketch.callbacks._search_options import SearchCriteria
from lightning_sketch.exceptions import (
    LightningSketchError,
    RunMismatchError,
    StoreConflictError,
    SubspaceError,
)
from lightning_sketch.intrinsic import Action, DoublingSearch, Subspace
from lightning_sketch.io.safeio import (
    DirLock,
    load_checked_json,
    new_run_id,
    sweep_temp_files,
    write_checked_json,
)
from lightning_sketch.report.plots import plot_search
from lightning_sketch.sketches import sketch_class

__all__ = ["IntrinsicDimension", "SearchCriteria", "measure_reference_score"]

_STATE = "intrinsic_dimension.json"
_PLOT = "intrinsic_dimension.png"


class IntrinsicDimension(Callback):
    """Train in a random subspace θ = θ0 + Φᵀω and find the intrinsic dimension D* in one run.

    Args:
        sketch_kind: sketch kind of Φ (``qk`` default, the paper's Kronecker sketch of its
            intrinsic-dimension runs, Sec. 5.4 and Table 10; ``dense`` for small models; ``affd``,
            ``afjl``, ``ffd``, ...); the same argument name as in ``GradientSketch`` and
            ``HessianSpectrum``. Every step applies Φᵀ and Φ to N-vectors, so the kind sets the
            cost: on MiniLM (N = 22.7M, CPU) a fit took 1.9× a plain one with ``qk``, 3.8× with
            ``afjl`` and 8.1× with ``affd``, with D* within a factor 2 of each other on MiniLM and
            on the digits MLP (``benchmarks/RESULTS.md``, "Real models", "Intrinsic dimension").
        sketch_dim: D (D_max in search mode): the size of the drawn projection, SAID scalars included.
        seed: seed of Φ (identical Φ on every rank and after a resume).
        said: one learned scalar per parameter tensor (structure-aware intrinsic dimension).
        normalize: scale Φᵀ by √(D/N) for unit-norm columns (Li et al. 2018).
        mode: ``"search"`` (doubling search) or ``"fixed"`` (train at active size ``d``).
        d: active size in fixed mode (default: all of ``sketch_dim``).
        monitor: name of the validation metric the module logs, e.g. ``"val_acc"``.
        higher_is_better: direction of ``monitor`` (False for a loss).
        eval_every_n_steps: c, the minimum optimiser steps per round; None: every validation run is a round.
        criteria: the search's settings, a :class:`SearchCriteria`: first active size ``d_min``,
            minimum gain per round ``delta`` (in units of ``monitor``) and the target (``target``,
            or ``target_fraction`` × ``reference_score``); default ``SearchCriteria()``, which has no
            target (enough for fixed mode only). In YAML a mapping ``criteria: {target: 0.9}``.
        stop_when_done: set ``trainer.should_stop`` when the target is reached or the search fails.
        include: fnmatch patterns of the parameters to reparametrise (default: all trainable).
        exclude: fnmatch patterns of parameters to leave as they are (they stay trainable).
        dirpath: where ``intrinsic_dimension.json`` is written (default: the trainer's log dir). Rank 0
            locks it for the fit (``.intrinsic_dimension.lock``; a second run fails at ``setup``) and
            refuses to write if the file changed behind it (``StoreConflictError``).
        plot: also save ``intrinsic_dimension.png`` (metric against steps and against d) at the end of fit.

    Raises:
        SubspaceError: for an invalid argument combination (e.g. search mode without a target).
        SketchConfigError: for an unknown ``sketch_kind``.
    """

    def __init__(
        self,
        sketch_kind: str = "qk",
        sketch_dim: int = 1024,
        seed: int = 0,
        said: bool = False,
        normalize: bool = True,
        mode: Literal["search", "fixed"] = "search",
        d: int | None = None,
        monitor: str = "val_acc",
        higher_is_better: bool = True,
        eval_every_n_steps: int | None = None,
        criteria: SearchCriteria | None = None,
        stop_when_done: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dirpath: str | None = None,
        plot: bool = True,
    ) -> None:
        super().__init__()
        if criteria is not None and not isinstance(criteria, SearchCriteria):
            raise SubspaceError(f"`criteria` must be a SearchCriteria, got {type(criteria).__name__}.")
        self.criteria = criteria if criteria is not None else SearchCriteria()
        sketch_class(sketch_kind)  # an unknown kind fails here, not at setup
        _check_init_args(self.criteria, sketch_kind, sketch_dim, mode, d, monitor, eval_every_n_steps,
                         said=said, normalize=normalize, higher_is_better=higher_is_better,
                         stop_when_done=stop_when_done)
        target, d_min = self.criteria.resolved_target, self.criteria.d_min
        self.sketch_kind, self.sketch_dim, self.seed = sketch_kind, sketch_dim, seed
        self.said, self.normalize = said, normalize
        self.mode, self.d, self.monitor = mode, d, monitor
        self.higher_is_better, self.eval_every_n_steps = higher_is_better, eval_every_n_steps
        self.stop_when_done = stop_when_done
        self.include, self.exclude, self.dirpath, self.plot = include, exclude, dirpath, plot
        self.search: DoublingSearch | None = None
        if mode == "search" and target is not None:  # (search mode without a target was refused above)
            delta = self.criteria.delta
            self.search = DoublingSearch(d_min, sketch_dim, delta, float(target), higher_is_better)
        self.history: list[dict[str, Any]] = []
        self.status = "running"
        self.reached: bool | None = None
        self._last_round_step = 0
        self._subspace: Subspace | None = None
        self._lock: DirLock | None = None
        self._seen: str | None = None
        #: the id recorded in the state file (kept from an existing file, else new); rank 0 only
        self._run_id: str | None = None

    # ----------------------------------------------------------------- identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            sketch_kind=self.sketch_kind, sketch_dim=self.sketch_dim, seed=self.seed, mode=self.mode
        )

    @property
    def target(self) -> float | None:
        """The resolved target: ``criteria.target``, else ``target_fraction × reference_score`` (or None)."""
        return self.criteria.resolved_target

    @property
    def d_min(self) -> int:
        """``criteria.d_min``, the first active size of the search."""
        return self.criteria.d_min

    @property
    def delta(self) -> float:
        """``criteria.delta``, the minimum gain per round below which d doubles."""
        return self.criteria.delta

    @property
    def reference_score(self) -> float | None:
        """``criteria.reference_score``, the full fine-tuning score (or None)."""
        return self.criteria.reference_score

    @property
    def d_star(self) -> int | None:
        """D*, the active size at which the target was reached (None until then)."""
        return self.search.d_star if self.search is not None else (self.active if self.reached else None)

    @property
    def active(self) -> int:
        """The current active size d."""
        if self.search is not None:
            return self.search.d
        return self.d if self.d is not None else self.sketch_dim

    @property
    def subspace(self) -> Subspace | None:
        """The attached :class:`Subspace` (after ``setup``)."""
        return self._subspace

    def projection_checksum(self) -> str:
        """sha256 of Φ's spec and of Φᵀ on a fixed probe (equal on every rank iff Φ is; see ``Subspace``).

        Raises:
            SubspaceError: before ``setup`` attached the subspace.
        """
        if self._subspace is None:
            raise SubspaceError("No subspace yet: `projection_checksum` is available after the trainer's "
                                "setup.")
        return self._subspace.projection_checksum()

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        sub = Subspace.of(pl_module)
        if sub is None:  # idempotent: setup runs for fit, validate, test and predict
            sub = Subspace.attach(
                pl_module, kind=self.sketch_kind, sketch_dim=self.sketch_dim, seed=self.seed, said=self.said,
                normalize=self.normalize, include=self.include, exclude=self.exclude,
            )
            rank_zero_info(f"IntrinsicDimension: N={sub.layout.dim} reparametrised as θ0 + Φᵀω, "
                           f"{sub.extra_repr()}")
        self._subspace = sub
        sub.set_active(self.active)
        search = self.search
        if stage == "fit" and search is not None and search.rounds == 0 and search.previous is None:
            # Listing 9 compares the first round with metric(θ0): validate the whole set before training.
            if trainer.num_sanity_val_steps not in (-1, math.inf):
                rank_zero_info("IntrinsicDimension: num_sanity_val_steps=-1 so that the search starts from "
                               "metric(θ0).")
            trainer.num_sanity_val_steps = math.inf
        if self.dirpath is None:
            self.dirpath = trainer.log_dir or trainer.default_root_dir
        self.dirpath = trainer.strategy.broadcast(self.dirpath)
        if stage == "fit" and trainer.is_global_zero and self._lock is None:
            # one writer per directory for the whole fit; a second run into it fails here
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            self._lock = DirLock(
                self.dirpath, ".intrinsic_dimension.lock", what="intrinsic-dimension directory"
            )
            self._seen = _disk_sha(Path(self.dirpath) / _STATE)
            sweep_temp_files(self.dirpath, targets=[_STATE, _PLOT])  # left by a killed run; the lock is ours
            self._run_id = _state_run_id(Path(self.dirpath) / _STATE) or new_run_id()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """ω must be trained: refuse (or repair) an optimizer built from a submodule's parameters."""
        if self._subspace is None:
            return
        _check_omega_in_optimizer(trainer, self._subspace)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or self._subspace is None or self.status != "running":
            return
        step = trainer.global_step
        if trainer.sanity_checking:
            full = trainer.num_sanity_val_steps in (-1, math.inf)
            if full and self.search is not None and self.search.rounds == 0 and self.search.previous is None:
                metric = self._metric(trainer)
                self.search.baseline(metric)
                self.history.append({"step": step, "d": self.active, "metric": metric, "action": "baseline"})
            return
        if step == 0 or (self.eval_every_n_steps and step - self._last_round_step < self.eval_every_n_steps):
            return
        metric = self._metric(trainer)
        self._last_round_step = step
        d_round = self.active
        if self.search is not None:
            action = self.search.update(metric, step=step)
            self._subspace.set_active(self.search.d)
            if action is Action.DONE:
                self.status, self.reached = "done", True
            elif action is Action.FAIL:
                self.status, self.reached = "failed", False
        else:
            reached = self.target is not None and (
                metric >= self.target if self.higher_is_better else metric <= self.target
            )
            action = Action.DONE if reached else Action.CONTINUE
            if reached:
                self.status, self.reached = "done", True
            elif self.target is not None:
                self.reached = False
        self.history.append(
            {"step": step, "d": d_round, "metric": metric, "action": action.value, "next_d": self.active}
        )
        if self.status != "running" and self.stop_when_done:
            trainer.should_stop = True
        scalars = {"intrinsic/d": float(d_round), "intrinsic/metric": metric}
        if self.d_star is not None:
            scalars["intrinsic/d_star"] = float(self.d_star)
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=step)
        self._write(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.search is None and self.status == "running":
            # fixed mode ends with the fit: "finished" without a target, "not_reached" with one
            self.status = "finished" if self.target is None else "not_reached"
            if self.target is not None:
                self.reached = False
        if self.search is not None and not any(h["action"] != "baseline" for h in self.history):
            rank_zero_warn(
                f"IntrinsicDimension: no validation round ran during fit, so the search never started "
                f"(d = {self.active}). Check the val_dataloader (empty?) and val_check_interval / "
                f"check_val_every_n_epoch."
            )
        self._write(trainer)
        if self.plot and trainer.is_global_zero and self.dirpath is not None and self.history:
            # written atomically (plots.save_png): never through a planted link
            plot_search(self.history, self.target, Path(self.dirpath) / _PLOT)

    def _metric(self, trainer: Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise SubspaceError(
                f"`monitor`={self.monitor!r} was not logged by validation; logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Log it with self.log({self.monitor!r}, ...) in "
                "validation_step."
            )
        return float(trainer.strategy.broadcast(float(value), src=0))

    # ----------------------------------------------------------------- outputs
    def summary(self) -> dict[str, Any]:
        """JSON-serialisable result: spec, target, status, D*, history."""
        sub = self._subspace
        return {
            "mode": self.mode,
            "status": self.status,
            "d_star": self.d_star,
            "clamped": self.search.clamped if self.search is not None else False,
            "reached": self.reached,
            "active": self.active,
            "monitor": self.monitor,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "reference_score": self.reference_score,
            "delta": self.delta,
            "d_min": self.d_min,
            "sketch_dim": self.sketch_dim,
            "num_params": sub.layout.dim if sub is not None else None,
            "spec": sub.spec if sub is not None else None,
            "projection_state_bytes": sub.sketch.state_bytes if sub is not None else None,
            "history": self.history,
            "run_id": self._run_id,
        }

    def _write(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero or self.dirpath is None:
            return
        path = Path(self.dirpath) / _STATE
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = self._lock

        def check() -> None:  # generation check: the file is still the one this writer last saw
            if lock is None:
                return
            lock.check()
            if _disk_sha(path) != self._seen:
                raise StoreConflictError(
                    f"{str(path)!r} changed on disk since this run last wrote it: another run writes the "
                    "same directory. Nothing was written; give each run its own `dirpath`."
                )

        check()
        # unique O_EXCL temp file + rename, never through a planted symlink; carries its own sha256;
        # checked again right before the rename
        self._seen, _ = write_checked_json(path, self.summary(), what="intrinsic-dimension state",
                                           before_replace=check)

    # ----------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "search": self.search.state_dict() if self.search is not None else None,
            "history": [dict(h) for h in self.history],
            "status": self.status,
            "reached": self.reached,
            "last_round_step": self._last_round_step,
            "spec": self._subspace.spec if self._subspace is not None else None,
            "run_id": self._run_id,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded = state_dict.get("run_id")
        if recorded is not None and self._run_id is not None and recorded != self._run_id and \
                self._seen is not None:
            raise RunMismatchError(
                f"{str(Path(str(self.dirpath)) / _STATE)!r} belongs to run {self._run_id!r}, but the resume "
                f"checkpoint was saved with run {recorded!r}: the intrinsic-dimension directory is another "
                "run's. Resume with this run's directory."
            )
        if recorded is not None:
            self._run_id = recorded
        if state_dict.get("search") is not None and self.mode == "search":
            self.search = DoublingSearch.from_state_dict(state_dict["search"])
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.status = state_dict.get("status", "running")
        self.reached = state_dict.get("reached")
        self._last_round_step = int(state_dict.get("last_round_step", 0))
        if self._subspace is not None:
            self._subspace.set_active(self.active)


def _state_run_id(path: Path) -> str | None:
    """The ``run_id`` of the state file at ``path`` (None when absent, unreadable or without one)."""
    try:
        data = load_checked_json(path, what="intrinsic-dimension state")
    except LightningSketchError:
        return None
    value = data.get("run_id")
    return value if isinstance(value, str) else None
