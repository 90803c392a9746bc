"""Checks and helpers of :class:`~lightning_sketch.callbacks.IntrinsicDimension`.

Argument and strategy checks, the check that ω is trained, the state file's on-disk hash and
:func:`measure_reference_score` (re-exported by :mod:`lightning_sketch.callbacks.intrinsic_dimension`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_sketch._checks import boolean, integer, one_of, positive_int
from lightning_sketch.callbacks._search_options import SearchCriteria
from lightning_sketch.exceptions import StoreNotFoundError, SubspaceError, UnsupportedStrategyError
from lightning_sketch.intrinsic import Subspace
from lightning_sketch.io.safeio import file_sha256
from lightning_sketch.sketches import KINDS

__all__ = ["measure_reference_score"]


def _disk_sha(path: Path) -> str | None:
    """sha256 of the state file on disk now (None when absent)."""
    try:
        return file_sha256(path, what="intrinsic-dimension state")[0]
    except StoreNotFoundError:
        return None


def _check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies at setup (by type, so that subclasses are caught and DDP is not).

    ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` or tensor parallelism) is refused too: its
    ``configure_model`` runs after this setup and would shard the reparametrised tensors, while
    θ = θ0 + Φᵀω needs the whole flattened θ on every rank. Sharding would save nothing worth having
    here: ω (D numbers) is the only trained tensor, so DDP holds no optimizer state beyond O(D).
    """
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise UnsupportedStrategyError(
            f"IntrinsicDimension does not support {type(strategy).__name__}: θ = θ0 + Φᵀω needs the whole "
            f"flattened model on every rank; use strategy='ddp' (ω is tiny, so DDP traffic is O(D)) and "
            f"drop the fully_shard/parallelize_module calls from configure_model."
        )


def _check_omega_in_optimizer(trainer: Trainer, sub: Subspace) -> None:
    """ω (and the SAID scalars) must be in an optimizer, else the search trains nothing.

    ``configure_optimizers`` over a submodule (``SGD(self.model.parameters())``, as Lightning's own
    ``LightningTransformer``) leaves ω, which lives on the LightningModule, outside the optimizer.
    Without LR schedulers ω is added to the first optimizer as a new parameter group with that
    optimizer's defaults (and a warning); with schedulers (whose per-group state would not match)
    the fit is refused with the change to make.
    """
    wanted = [p for p in sub.parameters() if p.requires_grad]
    held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [p for p in wanted if id(p) not in held]
    if not missing:
        return
    names = [n for n, p in sub.named_parameters() if any(p is m for m in missing)]
    if not trainer.optimizers:
        raise SubspaceError("IntrinsicDimension: the module configured no optimizer, so ω would never be "
                            "trained.")
    if trainer.lr_scheduler_configs or len(trainer.optimizers) > 1:
        raise SubspaceError(
            f"IntrinsicDimension: the subspace coordinates {names} (intrinsic_subspace.*) are in no "
            "optimizer, so the search would train nothing. configure_optimizers must build the optimizer "
            "from self.parameters() (not a submodule's, e.g. self.model.parameters()), or add "
            "self.intrinsic_subspace.parameters()."
        )
    opt = trainer.optimizers[0]
    opt.add_param_group({"params": missing})
    rank_zero_warn(
        f"IntrinsicDimension: the subspace coordinates {names} were in no optimizer (configure_optimizers "
        f"uses a submodule's parameters); added them to {type(opt).__name__} as a parameter group with its "
        f"defaults (lr={opt.defaults.get('lr')}). Build the optimizer from self.parameters() to choose their "
        "settings."
    )


def _check_types(sketch_kind: Any, monitor: Any, **flags: Any) -> None:
    one_of("sketch_kind", sketch_kind, sorted(KINDS), error=SubspaceError)
    if not isinstance(monitor, str) or not monitor:
        raise SubspaceError("`monitor` must be the name (str) of a logged validation metric, got "
                            f"{monitor!r}.")
    for name, flag in flags.items():
        boolean(name, flag, error=SubspaceError)


def measure_reference_score(
    trainer: Trainer,
    model: LightningModule,
    monitor: str = "val_acc",
    **fit_kwargs: Any,
) -> float:
    """The full fine-tuning score the search's target is a fraction of: ``fit`` then ``validate``.

    Args:
        trainer: a Trainer for the ordinary (full-parameter) training run.
        model: the LightningModule, with no IntrinsicDimension callback on ``trainer``.
        monitor: the validation metric to read.
        **fit_kwargs: passed to ``trainer.fit`` (``datamodule=`` or
            ``train_dataloaders=``/``val_dataloaders=``).

    Raises:
        SubspaceError: if ``monitor`` is not among the validation results.
    """
    trainer.fit(model, **fit_kwargs)
    val_kwargs = {k: v for k, v in fit_kwargs.items() if k in ("datamodule", "val_dataloaders")}
    if "val_dataloaders" in val_kwargs:
        val_kwargs["dataloaders"] = val_kwargs.pop("val_dataloaders")
    results = trainer.validate(model, verbose=False, **val_kwargs)
    if not results or monitor not in results[0]:
        raise SubspaceError(f"`monitor`={monitor!r} not in the validation results {results}; log it in "
                            "validation_step.")
    return float(results[0][monitor])


def _check_init_args(
    criteria: SearchCriteria,
    sketch_kind: str,
    sketch_dim: int,
    mode: str,
    d: int | None,
    monitor: str,
    eval_every_n_steps: int | None,
    **flags: bool,
) -> None:
    """IntrinsicDimension's argument checks that span several arguments (raised in ``__init__``)."""
    one_of("mode", mode, ("search", "fixed"), error=SubspaceError)
    positive_int("sketch_dim", sketch_dim, error=SubspaceError)
    integer("d", d, minimum=1, maximum=sketch_dim, allow_none=True, error=SubspaceError,
            hint="d is at most `sketch_dim`.")
    positive_int("eval_every_n_steps", eval_every_n_steps, allow_none=True, error=SubspaceError)
    _check_types(sketch_kind, monitor, **flags)
    target, d_min = criteria.resolved_target, criteria.d_min
    if mode == "search":
        if target is None:
            raise SubspaceError(
                "Search mode needs a target: pass criteria=SearchCriteria(target=...) (absolute) or "
                "SearchCriteria(reference_score=...) (the full fine-tuning score; target = "
                "target_fraction x reference_score); in YAML a `criteria:` mapping. Measure the "
                "reference with lightning_sketch.callbacks.intrinsic_dimension.measure_reference_score."
            )
        if d_min > sketch_dim:
            raise SubspaceError(f"`d_min` must be <= `sketch_dim` (got {d_min} > {sketch_dim}): lower "
                                "`criteria.d_min` or raise `sketch_dim`.")
