"""Hook-based per-example sketched gradients for the per-layer sketch (LoGra-style, Choe et al. 2024).

For ``nn.Linear`` the per-example weight gradient is Σ_t δ_bt x_btᵀ (δ: gradient of example b's
loss at the layer output, x: the layer input, t: sequence positions), so its per-layer sketch
L G Rᵀ (kind ``per_layer``, :class:`~lightning_sketch.sketches.per_layer.PerLayerSketch`) is
Σ_t (L δ_bt)(R x_bt)ᵀ: computed from the hooked activations without ever forming the [B, N]
per-example gradients. ``nn.Embedding`` uses the gathered columns of L; ``nn.Conv2d`` (groups=1,
zero padding) the unfolded input. Biases are sketched from Σ_t δ_bt.

Hooks only read: a forward hook saves the input and registers a tensor hook on the output that
returns ``None``, so the training gradients are bit-for-bit unchanged. Parameters of the layout
that no supported module covers (LayerNorm, ``nn.MultiheadAttention``'s functional projections,
...) are refused with :class:`UnsupportedModelError` listing them: exclude them from the layout
(e.g. ``ParamLayout.from_module(model, exclude=["*norm*", "*attn*"])``) or use
``sketch_gradients(mode="explicit")``. Inputs must be batch-first. Forward calls through
``torch.func.functional_call`` (every other function of this package, HVPs included) do not use
the module's own parameter objects and are ignored, so they may run inside the context.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch

__all__ = ["GradientCapture", "factorized_sketch"]


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    return tuple(module.padding)


def _supported(module: nn.Module, parent_is_mha: bool) -> bool:
    if parent_is_mha:
        return False  # MultiheadAttention uses its Linear's weights functionally: hooks never fire
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Embedding):
        return not module.scale_grad_by_freq
    return isinstance(module, nn.Conv2d) and _conv_padding(module) is not None


class GradientCapture:
    """Context manager: per-example ``per_layer`` sketches from an ordinary forward + backward.

    Args:
        model: the module whose forward/backward is observed (never modified).
        sketch: a ``per_layer`` sketch built over ``layout`` (``PerLayerSketch.for_module``).
        layout: the parameters sketched (default: all trainable ones).
        loss_scale: ``"mean"`` if the backpropagated loss is the batch mean of per-example
            losses (the 1/B factor is undone), ``"sum"`` if it is their sum.

    Example:
        >>> import torch
        >>> from lightning_sketch.sketches.per_layer import PerLayerSketch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        >>> sketch = PerLayerSketch.for_module(model, sketch_dim=8)
        >>> x = torch.randn(5, 4)
        >>> with GradientCapture(model, sketch) as cap:
        ...     model(x).pow(2).sum(-1).mean().backward()
        >>> cap.sketches().shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        sketch: Sketch,
        layout: ParamLayout | None = None,
        loss_scale: Literal["mean", "sum"] = "mean",
    ) -> None:
        from lightning_sketch.sketches.per_layer import PerLayerSketch

        if loss_scale not in ("mean", "sum"):
            raise SketchConfigError(f"`loss_scale` must be 'mean' or 'sum', got {loss_scale!r}.")
        if not isinstance(sketch, PerLayerSketch):
            raise SketchConfigError(
                f"GradientCapture needs a kind='per_layer' sketch, got {getattr(sketch, 'kind', type(sketch).__name__)!r}; "
                f"build one with PerLayerSketch.for_module(model, sketch_dim) or use sketch_gradients(mode='explicit')."
            )
        layout = F.resolve_layout(model, layout)
        F.check_sketch(sketch, layout)
        expected = [list(s) or [1] for s in layout.shapes]
        if sketch.options["shapes"] != expected:
            raise SketchConfigError(
                f"The per_layer sketch's `shapes` {sketch.options['shapes']} differ from the layout's {expected}; "
                f"build it with PerLayerSketch.for_module(model, sketch_dim, layout=layout)."
            )
        layout.params(model)  # raises LayoutMismatchError if the model does not fit the layout
        own = dict(model.named_parameters())
        index = {id(own[n]): i for i, n in enumerate(layout.names)}
        self._model, self._sketch, self._layout, self._scale = model, sketch, layout, loss_scale
        self._targets: list[tuple[nn.Module, int | None, int | None]] = []
        covered: set[int] = set()
        mha_children = {
            id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()
        }
        for module in model.modules():
            if not _supported(module, id(module) in mha_children):
                continue
            w = index.get(id(getattr(module, "weight", None)))
            b = index.get(id(getattr(module, "bias", None)))
            if w is not None or b is not None:
                self._targets.append((module, w, b))
                covered.update(i for i in (w, b) if i is not None)
        missing = [n for i, n in enumerate(layout.names) if i not in covered]
        if missing:
            raise UnsupportedModelError(
                f"GradientCapture covers nn.Linear, nn.Embedding and nn.Conv2d (groups=1, zero padding) only; "
                f"no hook can produce per-example gradients of {missing}. Exclude them from the layout "
                f"(ParamLayout.from_module(model, exclude=[...])) or use sketch_gradients(mode='explicit')."
            )
        self._handles: list[Any] = []
        self._buffer: Tensor | None = None

    # ----------------------------------------------------------------- context
    def __enter__(self) -> GradientCapture:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.reset()
        for module, w, b in self._targets:
            self._handles.append(module.register_forward_hook(self._make_hook(module, w, b)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget the sketches accumulated so far (call between batches when reusing the context)."""
        self._buffer = None

    def sketches(self) -> Tensor:
        """``[B, D]`` per-example sketched gradients accumulated by the backward passes so far.

        Raises:
            SketchInputError: if no backward pass reached a hooked module yet.
        """
        if self._buffer is None:
            raise SketchInputError(
                "No per-example sketches yet: run a forward and a backward (with grad enabled) of the batch loss "
                "inside the `with GradientCapture(...)` block first."
            )
        return self._buffer

    # ----------------------------------------------------------------- hooks
    def _make_hook(self, owner: nn.Module, w: int | None, b: int | None):
        # The parameter objects seen now: under torch.func.functional_call (per_example_grads, hvp,
        # torch.func transforms) the module holds substituted tensors, and such calls are skipped so
        # that they can run inside the context without adding to the sketches.
        weight, bias = getattr(owner, "weight", None), getattr(owner, "bias", None)

        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if module.weight is not weight or getattr(module, "bias", None) is not bias:
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not torch.is_grad_enabled():
                return
            x = args[0].detach()

            def grad_hook(grad: Tensor) -> None:
                self._accumulate(module, x, grad.detach(), w, b)

            output.register_hook(grad_hook)

        return forward_hook

    def _out(self, size: int, like: Tensor) -> Tensor:
        if self._buffer is None:
            self._buffer = torch.zeros(size, self._sketch.sketch_dim, dtype=like.dtype, device=like.device)
        elif self._buffer.shape[0] != size:
            raise SketchInputError(
                f"Hooked layers saw batch sizes {self._buffer.shape[0]} and {size}; inputs must be batch-first "
                f"and one batch per GradientCapture (call reset() between batches)."
            )
        return self._buffer

    def _accumulate(self, module: nn.Module, x: Tensor, delta: Tensor, w: int | None, b: int | None) -> None:
        size = delta.shape[0]
        if delta.dtype in (torch.float16, torch.bfloat16):
            delta = delta.float()  # mixed precision: sketch and accumulate in float32
        # A mean-reduced loss puts 1/B on every example's output gradient; undo it on the small
        # [B, d] sketches rather than on the [B, T, out] gradients.
        scale = float(size) if self._scale == "mean" else 1.0
        if isinstance(module, nn.Conv2d):
            delta = delta.reshape(size, delta.shape[1], -1).transpose(1, 2)  # [B, P, out]
        else:
            delta = delta.reshape(size, -1, delta.shape[-1])  # [B, T, out]
        out = self._out(size, delta)
        if w is not None:
            block = self._sketch.blocks[w]
            L, R = self._sketch.factors(block, delta)
            if isinstance(module, nn.Embedding):
                idx = x.reshape(size, -1)
                left = L.T[idx]  # [B, T, d_o]: the columns of L picked by the tokens
                if module.padding_idx is not None:
                    left = left * (idx != module.padding_idx).unsqueeze(-1).to(left.dtype)
                right = delta @ R.T  # [B, T, d_i]
            else:
                if isinstance(module, nn.Conv2d):
                    unfolded = TF.unfold(
                        x.to(delta.dtype),
                        module.kernel_size,
                        module.dilation,
                        _conv_padding(module),
                        module.stride,
                    )
                    inp = unfolded.transpose(1, 2)  # [B, P, in*kh*kw]
                else:
                    inp = x.to(delta.dtype).reshape(size, -1, x.shape[-1])
                left, right = delta @ L.T, inp @ R.T
            sk = torch.einsum("bto,bti->boi", left, right).reshape(size, block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim].add_(sk, alpha=scale)
        if b is not None:
            block = self._sketch.blocks[b]
            M, _ = self._sketch.factors(block, delta)
            out[:, block.out_offset : block.out_offset + block.out_dim].add_(delta.sum(1) @ M.T, alpha=scale)


def factorized_sketch(
    model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, sketch: Sketch, layout: ParamLayout
) -> Tensor:
    """``sketch_gradients(mode="factorized")``: one forward and ``torch.autograd.grad`` of the summed
    per-example losses under :class:`GradientCapture` (no ``.grad`` written). ``[B, D]``."""
    size = F.batch_size(batch)
    params = list(layout.params(model).keys())
    own = dict(model.named_parameters())
    with GradientCapture(model, sketch, layout, loss_scale="sum") as cap, torch.enable_grad():
        losses = F.check_losses(loss_fn(model, batch), size)
        torch.autograd.grad(losses.sum(), [own[n] for n in params], allow_unused=True)
    return cap.sketches()
