"""Whole parameters of a sharded (FSDP2 / DTensor) module, for the functional HVP code.

Under ``fully_shard`` (FSDP2) every parameter of a module is a ``DTensor`` holding one shard, and
FSDP2's forward hooks all-gather the shards into plain tensors for the duration of each forward.
``torch.func.functional_call`` and ``torch.autograd.grad`` cannot work through either: the
parameters it swaps in are replaced again by FSDP2's pre-forward hook, and reshaping a DTensor
sharded unevenly raises. :func:`gathered` gives the functional code an ordinary module for a while:

- every DTensor parameter is replaced by a plain ``nn.Parameter`` holding its whole value
  (``DTensor.full_tensor()``, an all-gather: every rank of the mesh must enter the context together,
  as it must run every collective of the strategy);
- FSDP2's own forward hooks are suspended, so a forward uses exactly the parameters in the module
  (or those ``functional_call`` swaps in) and runs no collective;
- on exit the DTensor parameters and the hooks are put back unchanged (also on an exception).

Inside, each rank holds one whole copy of the sharded parameters (``N`` values, their dtype) in
addition to its shards. Only FSDP2 (``fully_shard``) is handled: a module whose forward hooks come
from tensor parallelism (``parallelize_module``) would still see DTensor activations, so callers
refuse that case (:func:`sharded_parameter_names` tells them which parameters are DTensors).

Pure PyTorch; no Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["gathered", "sharded_parameter_names", "whole"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Names (``named_parameters()`` order) of the parameters of ``model`` that are DTensors."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return []
    return [n for n, p in model.named_parameters() if isinstance(p, dtensor)]


def whole(t: Tensor) -> Tensor:
    """The whole value of ``t``: ``t.full_tensor()`` for a DTensor (a collective every rank must
    enter), ``t`` itself otherwise. Same global shape and dtype."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        return cast(Tensor, t.full_tensor())  # type: ignore[attr-defined]
    return t


def _fsdp_hook_ids(module: nn.Module) -> list[tuple[Any, int]]:
    """(hook dict, hook id) of the forward hooks FSDP2 registered for ``module``'s own state."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(module, FSDPModule):
        return []
    state = fully_shard.state(module)  # type: ignore[attr-defined]  # set by @contract
    found = []
    for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
        handle = getattr(state, attr, None)
        for h in getattr(handle, "handles", (handle,)):  # a grouped fully_shard([a, b]) holds one per module
            hooks = h.hooks_dict_ref() if h is not None else None
            if h is not None and hooks is not None and h.id in hooks:
                found.append((hooks, h.id))
    return found


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` holds its whole parameters as plain tensors and no FSDP2 hook runs.

    Args:
        model: any module; one without DTensor parameters is yielded unchanged (no collective).

    Yields:
        ``model`` itself, with each DTensor parameter ``p`` replaced by
        ``nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)`` (same global shape and
        dtype) and FSDP2's forward hooks removed; both are restored on exit.
    """
    dtensor = _dtensor_type()
    swapped: list[tuple[nn.Module, str, Any]] = []
    if dtensor is not None:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, dtensor):
                    swapped.append((module, name, p))
    if not swapped:
        yield model
        return
    saved_hooks: list[tuple[Any, int, Any]] = []
    try:
        with torch.no_grad():
            for module, name, p in swapped:
                full = p.full_tensor().detach().clone()
                module._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
        for module in model.modules():
            for hooks, hook_id in _fsdp_hook_ids(module):
                saved_hooks.append((hooks, hook_id, dict(hooks)))
                del hooks[hook_id]
        yield model
    finally:
        restored: set[int] = set()
        for hooks, _, before in saved_hooks:
            if id(hooks) not in restored:  # the dict as it was before the first removal (order kept)
                restored.add(id(hooks))
                hooks.clear()
                hooks.update(before)
        for module, name, p in swapped:
            module._parameters[name] = p
