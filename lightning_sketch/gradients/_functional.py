"""Private helpers shared by the gradient and HVP functions: a functional view of ``loss_fn``.

``loss_fn(module, batch) -> Tensor[B]`` is called on the user's own module; a tiny wrapper module
holding it as a submodule lets :func:`torch.func.functional_call` swap in other parameter values
without copying the model or touching its ``.grad``, parameters or train/eval mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_sketch._checks import positive_int
from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients._batch import Batch as Batch
from lightning_sketch.gradients._batch import batch_leaves as batch_leaves
from lightning_sketch.gradients._batch import batch_size as batch_size
from lightning_sketch.gradients.loss import LossFn
from lightning_sketch.layout import ParamLayout
from lightning_sketch.linalg import LinearOperator
from lightning_sketch.sketches.base import Sketch

_PREFIX = "model."


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``; ``model`` is registered, not copied."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model, batch)


def check_model(model: nn.Module) -> None:
    """Refuse train-mode BatchNorm: it couples examples (no per-example loss exists) and its
    running-statistics update would modify the model's buffers."""
    if not isinstance(model, nn.Module):
        raise SketchInputError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    bad = [
        n or "<root>"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if bad:
        raise UnsupportedModelError(
            f"BatchNorm module(s) {bad} are in train mode: per-example gradients and HVPs are undefined "
            f"when the batch statistics couple examples. Call model.eval() for the computation (and "
            f"restore the mode after), or replace BatchNorm with GroupNorm."
        )


def resolve_layout(model: nn.Module, layout: ParamLayout | None) -> ParamLayout:
    if layout is None:
        return ParamLayout.from_module(model)
    if not isinstance(layout, ParamLayout):
        raise SketchConfigError(f"`layout` must be a ParamLayout or None, got {type(layout).__name__}.")
    return layout


def check_sketch(sketch: Sketch, layout: ParamLayout) -> None:
    if not isinstance(sketch, Sketch):
        raise SketchConfigError(f"`sketch` must be a lightning_sketch Sketch, got {type(sketch).__name__}.")
    if sketch.dim != layout.dim:
        raise SketchConfigError(
            f"`sketch.dim` must equal the layout's parameter count N = {layout.dim}, got {sketch.dim}; "
            f"build the sketch with make(kind, dim={layout.dim}, sketch_dim=...) for this model and layout."
        )


def split_state(model: nn.Module, layout: ParamLayout) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(selected params, everything else held fixed) as detached tensors, keyed for ``_LossModule``."""
    selected = layout.params(model)
    fixed = {_PREFIX + n: p.detach() for n, p in model.named_parameters() if n not in selected}
    fixed.update({_PREFIX + n: b for n, b in model.named_buffers()})
    return selected, fixed


def lift(
    theta0: dict[str, Tensor], layout: ParamLayout, lift_op: LinearOperator, omega: Tensor
) -> dict[str, Tensor]:
    """θ0 + Pω per tensor (``lift_op`` is P, e.g. ``sketch.op.T`` for the subspace θ0 + Φᵀω of eq. 4).

    The one implementation of the implicit lift: the implicit per-example sketches, the implicit
    sketched HVP and :class:`~lightning_sketch.intrinsic.Subspace` (through ``lift_op``) share it.
    """
    delta = layout.unflatten(lift_op(omega))
    return {n: theta0[n] + delta[n] for n in layout.names}


def loss_call(
    module: _LossModule, selected: Mapping[str, Tensor], fixed: Mapping[str, Tensor], batch: Batch
) -> Tensor:
    """``loss_fn(model with θ_selected = selected, batch)`` as a functional call."""
    params = {_PREFIX + n: t for n, t in selected.items()}
    return functional_call(module, {**fixed, **params}, (batch,), strict=False)


def check_losses(losses: Any, batch_size: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.ndim != 1 or losses.shape[0] != batch_size:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise SketchInputError(
            f"`loss_fn(module, batch)` must return per-example losses of shape [B] = [{batch_size}], got "
            f"{shape}; use reduction='none' (e.g. F.cross_entropy(..., reduction='none'))."
        )
    return losses


# ----------------------------------------------------------------- batches
def in_dims(batch: Batch) -> Any:
    """vmap ``in_dims`` for ``batch``: 0 for batched tensors, None for the rest (same structure)."""

    def dim(v: Any) -> int | None:
        return 0 if isinstance(v, Tensor) and v.ndim >= 1 else None

    if isinstance(batch, Tensor):
        return 0
    if isinstance(batch, Mapping):
        return {k: dim(v) for k, v in batch.items()}
    return type(batch)(dim(v) for v in batch) if isinstance(batch, tuple) else [dim(v) for v in batch]


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    def cut(v: Any) -> Any:
        return v[start:stop] if isinstance(v, Tensor) and v.ndim >= 1 else v

    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch) if isinstance(batch, tuple) else [cut(v) for v in batch]


def unsqueeze_example(example: Batch) -> Batch:
    """One vmapped example -> a batch of one (what ``loss_fn`` expects)."""

    def up(v: Any) -> Any:
        return v.unsqueeze(0) if isinstance(v, Tensor) else v

    if isinstance(example, Tensor):
        return example.unsqueeze(0)
    if isinstance(example, Mapping):
        return {k: up(v) for k, v in example.items()}
    return type(example)(up(v) for v in example) if isinstance(example, tuple) else [up(v) for v in example]


@contextmanager
def quiet_vmap() -> Iterator[None]:
    """torch's "performance drop ... batching rule" notices of ``vmap`` (attention, some fused ops) silenced:
    they are about torch's internals, say nothing the user can act on, and would repeat on every batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        yield


def check_chunk_size(chunk_size: int | None, size: int) -> int:
    if chunk_size is None:
        return size
    return min(positive_int("chunk_size", chunk_size), size)


def as_batch_list(batches: Iterable[Batch]) -> list[Batch]:
    """A fixed list of batches; a lone Tensor or dict is refused (wrap it in a list)."""
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, (Sequence, Iterable)):
        raise SketchInputError(
            f"`batches` must be a list of batches, got {type(batches).__name__}; wrap a single batch as "
            "[batch]."
        )
    out = list(batches)
    if not out:
        raise SketchInputError("`batches` is empty; pass at least one batch.")
    return out
