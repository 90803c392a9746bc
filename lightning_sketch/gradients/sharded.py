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

from lightning_sketch.exceptions import UnsupportedStrategyError

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


def _fsdp_hook_ids(module: nn.Module) -> list[tuple[dict[int, Any], int]]:
    """(hook dict, hook id) of the forward hooks FSDP2 registered for ``module``'s FSDP state.

    A grouped ``fully_shard([a, b])`` shares one state: its hooks on ``a`` and ``b`` are all listed.

    Raises:
        UnsupportedStrategyError: ``module`` is an ``FSDPModule`` but its forward hooks cannot be
            found where this torch version keeps them (a forward inside :func:`gathered` would run
            them, and the gradients through the whole parameters would be lost).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(module, FSDPModule):
        return []
    found: list[tuple[dict[int, Any], int]] = []
    try:
        state = fully_shard.state(module)  # type: ignore[attr-defined]  # set by @contract
        for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            handle = getattr(state, attr)
            # a grouped fully_shard([a, b]) holds one handle per module, pre and post in one _MultiHandle
            for h in getattr(handle, "handles", (handle,)):
                hooks = h.hooks_dict_ref()
                if hooks is None or h.id not in hooks:
                    raise AttributeError(f"{attr}: hook {h.id} is not registered on its module")
                if not any(d is hooks and i == h.id for d, i in found):
                    found.append((hooks, h.id))
    except AttributeError as err:
        raise UnsupportedStrategyError(
            f"gathered(): cannot find the forward hooks FSDP2 (fully_shard) registered on "
            f"{type(module).__name__} in torch {torch.__version__} ({err}); without removing them the "
            f"functional Hessian-vector products would get no gradient. Use strategy='ddp' for this "
            f"callback, or a torch version whose FSDP2 state keeps _pre_forward_hook_handle and "
            f"_post_forward_hook_handle."
        ) from err
    return found


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` holds its whole parameters as plain tensors and no FSDP2 hook runs.

    Args:
        model: any module; one without DTensor parameters is yielded unchanged (no collective).

    Yields:
        ``model`` itself, with each DTensor parameter ``p`` replaced by
        ``nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)`` (same global shape and
        dtype; one new Parameter per DTensor, shared by every module that holds it, so tied weights
        stay tied) and FSDP2's forward hooks removed; both are restored on exit. Hooks registered or
        removed inside the block stay so after it.

    Raises:
        UnsupportedStrategyError: an FSDP2 module whose forward hooks cannot be found (see
            :func:`_fsdp_hook_ids`); nothing is changed then.
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
    removed: list[tuple[dict[int, Any], int]] = []  # (hook dict, id), each once
    for module in model.modules():  # before any change: a refusal leaves the model as it was
        for hooks, hook_id in _fsdp_hook_ids(module):  # a grouped state lists its hooks for each module
            if not any(d is hooks and i == hook_id for d, i in removed):
                removed.append((hooks, hook_id))
    orders = {id(hooks): (hooks, list(hooks)) for hooks, _ in removed}  # each dict's order before
    taken: dict[tuple[int, int], Any] = {}
    try:
        whole_params: dict[int, nn.Parameter] = {}  # id(DTensor) -> its whole Parameter
        with torch.no_grad():
            for module, name, p in swapped:
                if id(p) not in whole_params:
                    full = p.full_tensor().detach().clone()
                    whole_params[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad)
                module._parameters[name] = whole_params[id(p)]
        for hooks, hook_id in removed:
            taken[(id(hooks), hook_id)] = hooks.pop(hook_id)
        yield model
    finally:
        for key, (hooks, before) in orders.items():
            # Put back only the hooks taken out, at their old places; a hook registered inside the
            # block keeps its place after them, one removed inside the block stays removed.
            now = dict(hooks)
            hooks.clear()
            for hook_id in before:
                if (key, hook_id) in taken:
                    hooks[hook_id] = taken[(key, hook_id)]
                elif hook_id in now:
                    hooks[hook_id] = now.pop(hook_id)
            hooks.update(now)
        for module, name, p in swapped:
            module._parameters[name] = p
