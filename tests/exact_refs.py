"""Exact references shared by the tests (importable from any test: ``tests`` is on pytest's pythonpath).

:func:`loop_grads` is THE per-example gradient reference: one example at a time, plain
``torch.autograd.grad`` on the module's real parameters, no ``torch.func``, no hooks, no sketching.

:func:`dense_hessian` is THE dense Hessian reference: ``torch.func.hessian`` of the mean
per-example loss as a function of the flat parameter vector θ (the layout's order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sketch.layout import ParamLayout


def _example(batch: Any, i: int) -> Any:
    """Example ``i`` of a dict / tuple / list batch, keeping a batch dimension of 1."""
    if isinstance(batch, Mapping):
        return {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}
    if isinstance(batch, Sequence):
        return type(batch)(v[i : i + 1] for v in batch)
    raise TypeError(f"batch must be a dict, tuple or list of tensors, got {type(batch).__name__}")


def _size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next(v.shape[0] for v in values if isinstance(v, Tensor))


def loop_grads(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any, layout: Any = None) -> Tensor:
    """Exact per-example gradients ``[B, N]`` of ``loss_fn(model, example)`` by a Python loop.

    Args:
        model: the module (its parameters are differentiated in place; nothing is written).
        loss_fn: per-example losses ``[1]`` (or a scalar) for a one-example batch.
        batch: a dict or a tuple/list of tensors with the batch dimension first.
        layout: a ``ParamLayout`` selecting and ordering the parameters (default: every trainable
            parameter in ``named_parameters()`` order).
    """
    named = dict(model.named_parameters())
    if layout is None:
        params = [p for p in named.values() if p.requires_grad]
    else:
        params = [named[n] for n in layout.names]
    rows = []
    for i in range(_size(batch)):
        loss = loss_fn(model, _example(batch, i)).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` substitutes the
    model's parameters (and the loss sees them, e.g. ``m.shift``) for the length of one call."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch).reshape(-1)


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    layout: Any = None,
) -> Tensor:
    """Dense ``[N, N]`` Hessian of the mean per-example loss over every example of ``batches``.

    H = ∇²_θ (1/B) Σ_b ℓ(θ; z_b) by ``torch.func.hessian`` of the loss of the flat θ. Parameters
    outside ``layout`` are held at their values. Scaled dot-product attention runs on its math
    kernel (the fused kernels have no double backward).

    Args:
        model: the module (nothing is written to it).
        loss_fn: per-example losses ``[B]`` of ``loss_fn(model, batch)``.
        batches: the batches whose examples the mean runs over (unequal sizes are weighted by size).
        layout: a ``ParamLayout`` selecting and ordering θ (default: every trainable parameter).
    """
    layout = ParamLayout.from_module(model) if layout is None else layout
    wrapper = _LossOf(model, loss_fn)
    fixed = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n not in layout.names}
    theta0 = layout.flatten(layout.params(model)).detach()

    def mean_loss(theta: Tensor) -> Tensor:
        params = {**fixed, **{f"model.{n}": t for n, t in layout.unflatten(theta).items()}}
        losses = [torch.func.functional_call(wrapper, params, (b,)) for b in batches]
        return torch.cat(losses).mean()

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.hessian(mean_loss)(theta0)


class TickClock:
    """An exact clock for time-budget tests: it advances one unit at every forward of ``module``, so a
    training step costs 1 and an HVP one per probe batch, whatever the machine's load."""

    def __init__(self, module: nn.Module) -> None:
        self.now = 0.0
        module.register_forward_pre_hook(self._tick)

    def _tick(self, *args: Any) -> None:
        self.now += 1.0

    def __call__(self) -> float:
        return self.now

