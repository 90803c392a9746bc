"""The ``nn.MultiheadAttention`` reader of :class:`~lightning_sketch.gradients.capture.GradientCapture`.

Its ``in_proj_weight``/``out_proj`` are used functionally inside ``F.multi_head_attention_forward``
(module hooks never see them): while an attention module runs, ``torch.nn.functional.linear`` is
routed through a reader that records the projections' inputs and output gradients (packed, split
and separate projection weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from lightning_sketch.exceptions import SketchInputError
from lightning_sketch.gradients._capture_kernels import _CaptureKernels
from lightning_sketch.gradients._capture_plan import _attr


class _MHAReader(_CaptureKernels):
    """The hooks that read an attention module's functional projections."""

    def _hook_mha(self, module: nn.MultiheadAttention, local: dict[str, int]) -> None:
        expected = self._own_params(module, local)
        # parameter object -> (layout index, role) for the projections F.multi_head_attention_forward uses
        targets = {id(p): (local[n], p) for n, p in expected.items()}
        state: dict[str, Any] = {}

        def identify(t: Tensor | None) -> tuple[int, int] | None:
            """(layout index, first row) of a projection weight/bias, itself or a row-block view."""
            if t is None:
                return None
            hit = targets.get(id(t))
            if hit is not None:
                return hit[0], 0
            base = t._base
            if base is None:
                return None
            hit = targets.get(id(base))
            if hit is None:
                return None
            step = base.stride(0) if base.ndim > 0 else 1
            return hit[0], (t.storage_offset() - base.storage_offset()) // step

        def reader(orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
            def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
                out = orig(input, weight, bias)
                wid, bid = identify(weight), identify(bias)
                if (wid is None and bid is None) or not out.requires_grad:
                    return out
                size, x = state["size"], input.detach()

                def batch_first(t: Tensor) -> Tensor:  # inside the functional: [T, B, E] or [T*B, E]
                    t = t.reshape(-1, size, t.shape[-1]) if t.ndim == 2 else t
                    return t.transpose(0, 1)

                def grad_hook(grad_out: Tensor) -> None:
                    delta = batch_first(grad_out.detach())
                    if wid is not None:
                        self._add_outer(wid[0], delta, batch_first(x), row=wid[1])
                    if bid is not None:
                        self._add_vector(bid[0], delta.sum(1), offset=bid[1])

                self._watch(out, grad_hook)
                return out

            return linear

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._busy or any(_attr(mod, n) is not p for n, p in expected.items()):
                return
            if not torch.is_grad_enabled():
                return
            query = args[0] if args else kwargs["query"]
            if query.ndim != 3:
                raise SketchInputError(
                    "GradientCapture: nn.MultiheadAttention got an unbatched (2-D) query; per-example "
                    "gradients need batched inputs [B, L, E] (batch_first=True) or [L, B, E]."
                )
            state["size"] = query.shape[0] if mod.batch_first else query.shape[1]
            state["orig"] = TF.linear
            TF.linear = reader(state["orig"])

        def post_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if "orig" in state:
                TF.linear = state.pop("orig")

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
