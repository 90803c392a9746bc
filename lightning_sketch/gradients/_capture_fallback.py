"""The per-module fallbacks of :class:`~lightning_sketch.gradients.capture.GradientCapture`.

A module off the fast path has its forward inputs saved; when its output gradient δ arrives,
``vmap(grad(⟨module(x_b; θ_m), δ_b⟩))`` over the examples gives the per-example gradients of that
module's own parameters only (one extra forward and backward of that module).

Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) are recomputed once, unrolled and batched, with
the gradients of every step's affine maps read off per example (``_capture_rnn``); the layers that
recomputation does not cover (``proj_size``, inter-layer dropout in train mode) go through a
per-example loop instead:
``vmap`` cannot batch their fused kernels, and their batch dimension is 1 when
``batch_first=False`` (and for the hidden states ``h_n``/``c_n`` always). Each example's input
(and initial state) is run through the module alone and ``torch.autograd.grad`` of
⟨output_b, δ_b⟩ gives its gradient: B small forwards and backwards of that module per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

from lightning_sketch.exceptions import LightningSketchError, UnsupportedModelError
from lightning_sketch.gradients._capture_kernels import _CaptureKernels
from lightning_sketch.gradients._capture_plan import _attr
from lightning_sketch.gradients._capture_rnn import rnn_terms
from lightning_sketch.gradients._functional import quiet_vmap

FallbackHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


def _detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, tree)


@contextlib.contextmanager
def _fork_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def rnn_cudnn_off(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """cuDNN off while a model holding recurrent layers is differentiated: cuDNN's RNN backward
    refuses eval mode, in which slices and queries are taken (other cuDNN settings are kept)."""
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32)


class _FallbackHooks(_CaptureKernels):
    """The hooks of modules that go through ``torch.func`` one module at a time."""

    def _skip(self, module: nn.Module, expected: dict[str, Tensor]) -> bool:
        """A forward to ignore: inside our own recomputation, with swapped parameters, or without grad."""
        return (self._busy or any(_attr(module, n) is not p for n, p in expected.items())
                or not torch.is_grad_enabled())

    def _fallback_hook(
        self, owner: nn.Module, local: dict[str, int], expected: dict[str, Tensor]
    ) -> FallbackHook:
        def forward_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if self._skip(module, expected):
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
                with torch.enable_grad(), _fork_rng(delta.device), quiet_vmap():
                    grads = fn(params, list(args), kwargs, delta)
            except LightningSketchError:
                raise
            except (RuntimeError, TypeError, ValueError) as err:
                raise self._fallback_error(module, local, err) from err
            finally:
                self._busy = False
            for n, idx in local.items():
                self._add_vector(idx, grads[n].reshape(size, -1))

        return grad_hook

    def _fallback_error(
        self, module: nn.Module, local: dict[str, int], err: Exception
    ) -> UnsupportedModelError:
        names = [self._layout.names[i] for i in local.values()]
        return UnsupportedModelError(
            f"The per-module per-example gradient fallback of {type(module).__name__} failed "
            f"({type(err).__name__}: {str(err)[:300]}); it needs a module that treats the examples of a "
            f"batch independently along dim 0. Leave its parameters out with exclude={names!r}."
        )

    # ----------------------------------------------------------------- recurrent layers
    def _rnn_hook(
        self, owner: nn.RNNBase, local: dict[str, int], expected: dict[str, Tensor]
    ) -> FallbackHook:
        def forward_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if self._skip(module, expected):
                return
            x = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            if not isinstance(x, Tensor) or x.ndim != 3:
                what = "a PackedSequence" if isinstance(x, PackedSequence) else (
                    f"an input of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
                raise UnsupportedModelError(
                    f"{type(module).__name__} got {what}; per-example gradients of recurrent layers need "
                    f"batched, padded inputs ({'[B, T, F]' if owner.batch_first else '[T, B, F]'}). Pad the "
                    f"sequences instead of packing them, or leave the layer out with "
                    f"exclude={[self._layout.names[i] for i in local.values()]!r}."
                )
            bdim = 0 if owner.batch_first else 1
            saved = (x.detach(), _detach_tree(hx))
            for i, leaf in enumerate(pytree.tree_leaves(output)):
                if isinstance(leaf, Tensor) and leaf.requires_grad:
                    # the output is batch-first or not as the input; h_n and c_n are [layers, B, H]
                    self._watch(leaf, self._rnn_grad(owner, local, saved, i, bdim if i == 0 else 1))

        return forward_hook

    def _rnn_grad(
        self, module: nn.RNNBase, local: dict[str, int], saved: tuple[Tensor, Any], leaf: int, out_dim: int
    ) -> Callable[[Tensor], None]:
        def grad_hook(grad_out: Tensor) -> None:
            delta = grad_out.detach()
            x, hx = saved
            bdim = 0 if module.batch_first else 1
            size = x.shape[bdim]
            names = list(local)
            rows: dict[str, list[Tensor]] = {n: [] for n in names}
            self._busy = True
            try:
                with torch.enable_grad(), _fork_rng(delta.device), rnn_cudnn_off(module):
                    terms = rnn_terms(module, x, hx, leaf, delta)  # one batched recomputation
                    if terms is not None:
                        for n, idx in local.items():
                            kind, a, c = terms[n]
                            if kind == "outer":
                                assert c is not None
                                self._add_outer(idx, a, c)
                            else:
                                self._add_vector(idx, a)
                        return
                    for b in range(size):
                        params = {n: _attr(module, n).detach().requires_grad_() for n in names}
                        h_b = pytree.tree_map(
                            lambda h: h.narrow(1, b, 1) if isinstance(h, Tensor) else h, hx  # noqa: B023
                        )
                        inputs = (x.narrow(bdim, b, 1),) if h_b is None else (x.narrow(bdim, b, 1), h_b)
                        out = pytree.tree_leaves(functional_call(module, params, inputs, strict=False))[leaf]
                        grads = torch.autograd.grad((out * delta.narrow(out_dim, b, 1)).sum(),
                                                    [params[n] for n in names], allow_unused=True)
                        for n, g in zip(names, grads):
                            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
            except LightningSketchError:
                raise
            except (RuntimeError, TypeError, ValueError) as err:
                raise self._fallback_error(module, local, err) from err
            finally:
                self._busy = False
            for n, idx in local.items():
                self._add_vector(idx, torch.stack(rows[n]).reshape(size, -1))

        return grad_hook
