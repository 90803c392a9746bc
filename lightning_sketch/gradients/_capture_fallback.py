"""The per-module ``torch.func`` fallback of :class:`~lightning_sketch.gradients.capture.GradientCapture`.

A module off the fast path has its forward inputs saved; when its output gradient δ arrives,
``vmap(grad(⟨module(x_b; θ_m), δ_b⟩))`` over the examples gives the per-example gradients of that
module's own parameters only (one extra forward and backward of that module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from lightning_sketch.gradients._capture_kernels import _CaptureKernels
from lightning_sketch.gradients._capture_plan import _attr

FallbackHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


def _detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, tree)


@contextlib.contextmanager
def _fork_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class _FallbackHooks(_CaptureKernels):
    """The hooks of modules that go through ``torch.func`` one module at a time."""

    def _fallback_hook(
        self, owner: nn.Module, local: dict[str, int], expected: dict[str, Tensor]
    ) -> FallbackHook:
        def forward_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if self._busy or any(_attr(module, n) is not p for n, p in expected.items()):
                return
            if not torch.is_grad_enabled():
                return
            leaves = pytree.tree_leaves(output)
            saved = (_detach_tree(args), _detach_tree(kwargs))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.requires_grad:
                    self._watch(leaf, self._fallback_grad(module, local, saved, i))

        return forward_hook

    def _fallback_grad(
        self, module: nn.Module, local: dict[str, int], saved: tuple[Any, Any], leaf: int
    ) -> Callable[[Tensor], None]:
        def grad_hook(grad_out: Tensor) -> None:
            delta = grad_out.detach()
            size = delta.shape[0]
            args, kwargs = saved

            def dim(v: Any) -> int | None:
                return 0 if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == size else None

            def up(v: Any) -> Any:
                return v.unsqueeze(0) if isinstance(v, Tensor) else v

            def loss(params: dict[str, Tensor], a: Any, k: Any, d: Tensor) -> Tensor:
                a = pytree.tree_map(up, a) if a is not None else a
                out = functional_call(module, params, tuple(a), pytree.tree_map(up, k), strict=False)
                picked = pytree.tree_leaves(out)[leaf]
                return (picked[0] * d).sum()

            in_dims = (None, pytree.tree_map(dim, list(args)), pytree.tree_map(dim, kwargs), 0)
            params = {n: _attr(module, n).detach() for n in local}
            fn = vmap(grad(loss), in_dims=in_dims, randomness="different")
            self._busy = True
            try:
                with torch.enable_grad(), _fork_rng(delta.device):
                    grads = fn(params, list(args), kwargs, delta)
            finally:
                self._busy = False
            for n, idx in local.items():
                self._add_vector(idx, grads[n].reshape(size, -1))

        return grad_hook
