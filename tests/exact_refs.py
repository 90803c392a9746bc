"""Exact references shared by the tests (importable from any test: ``tests`` is on pytest's pythonpath).

:func:`loop_grads` is THE per-example gradient reference: one example at a time, plain
``torch.autograd.grad`` on the module's real parameters, no ``torch.func``, no hooks, no sketching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


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
