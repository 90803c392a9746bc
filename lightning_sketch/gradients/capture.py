"""Hook-based per-example gradients and sketches: no ``vmap`` over the whole forward (LoGra-style, Choe et al. 2024).

:class:`GradientCapture` observes an ordinary forward + backward of a batch and builds, from the
hooked layer inputs x and output gradients δ, either the per-example gradients ``[B, N]``
(``sketch=None`` or a whole-model sketch, applied at the end) or, for the ``per_layer`` sketch
(:class:`~lightning_sketch.sketches.per_layer.PerLayerSketch`, LoGra-style, Choe et al. 2024), the
per-example sketches directly: for a weight whose per-example gradient is Σ_t a_bt c_btᵀ its
block L G Rᵀ is Σ_t (L a_bt)(R c_btᵀ), so no per-example gradient is ever formed.

Fast path (t: positions, summed; every module must take batch-first inputs):

- ``nn.Linear`` on ``[B, in]`` or ``[B, ..., in]`` inputs: G = Σ_t δ_t x_tᵀ; bias Σ_t δ_t.
- ``nn.Embedding`` (``padding_idx`` rows get no gradient; not ``max_norm``/``scale_grad_by_freq``,
  which couple examples or write the weight): G = Σ_t e_{id_t} δ_tᵀ.
- Hugging Face ``Conv1D`` (GPT-2; weight ``[in, out]``): G = Σ_t x_t δ_tᵀ.
- ``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1, zero padding): the unfolded input plays x.
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` affine parameters:
  Σ δ ⊙ x̂ with x̂ recomputed from the saved input (BatchNorm: the statistics the forward used; in
  train mode they couple examples, so rows are each example's contribution to the batch gradient).
- ``nn.MultiheadAttention``: its ``in_proj_weight``/``out_proj`` are used functionally inside
  ``F.multi_head_attention_forward`` (module hooks never see them); while an attention module
  runs, the capture routes ``torch.nn.functional.linear`` through a reader that records the
  projections' inputs and output gradients (packed, split and separate projection weights).

Every other module owning selected parameters falls back **per module**: its forward inputs are
saved and, when its output gradient δ arrives, ``vmap(grad(⟨module(x_b; θ_m), δ_b⟩))`` over the
examples gives the per-example gradients of that module's own parameters only (one extra forward
and backward of that module). Fallback modules must process examples independently along dim 0;
random ones (dropout inside) are recomputed with other masks (in eval mode they are exact).
:func:`capture_support` lists what is covered and what falls back.

Hooks only read: forward hooks save inputs and register tensor hooks that return ``None``, so
training gradients are bit-for-bit unchanged. Forward calls through
``torch.func.functional_call`` (every other function of this package, HVPs included) do not use
the module's own parameter objects and are ignored, so they may run inside the context.
A parameter used by a module other than the one that registers it (e.g. ``F.linear(h,
self.embed.weight)`` written in a parent's ``forward``) is invisible to hooks: tie weights by
sharing the Parameter between modules (``head.weight = embed.weight``), which is covered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as TF
from torch.utils import _pytree as pytree

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch

__all__ = ["CaptureSupport", "GradientCapture", "capture_support", "hooked_sketch"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _conv_padding(module: nn.Module) -> tuple[int, int] | None:
    """Zero padding as (pad_h, pad_w) of the 2-D view, or None if unfold cannot reproduce the conv."""
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    kernel = tuple(module.kernel_size)
    dilation = tuple(module.dilation)
    if module.padding == "valid":
        pad: tuple[int, ...] = (0,) * len(kernel)
    elif module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in totals):
            return None
        pad = tuple(t // 2 for t in totals)
    else:
        pad = tuple(module.padding)
    return (0, pad[0]) if isinstance(module, nn.Conv1d) else (pad[0], pad[1])


def _is_hf_conv1d(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.ndim == 2
        and getattr(module, "nf", None) == w.shape[1]
    )


def _fast_kind(module: nn.Module) -> str | None:
    """The fast-path handler for ``module``'s own ``weight``/``bias``, or None."""
    own = {n for n, p in module._parameters.items() if p is not None}
    if isinstance(module, nn.MultiheadAttention):
        extra = own - {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
        return "mha" if not extra else None  # bias_k / bias_v enter through a concatenation
    if not own <= {"weight", "bias"}:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv" if _conv_padding(module) is not None else None
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, _NORMS):
        return "norm"
    return None


@dataclass(frozen=True)
class CaptureSupport:
    """Which modules of a model :class:`GradientCapture` covers, and how.

    Attributes:
        fast: ``{module name: handler}`` for modules on the fast path (``"linear"``,
            ``"embedding"``, ``"conv"``, ``"hf_conv1d"``, ``"norm"``, ``"mha"``).
        fallback: ``{module name: class name}`` for modules whose selected parameters go
            through ``torch.func`` per module (slower; exact for modules that treat examples
            independently and are not random).
        unsupported: ``{module name: reason}`` for modules no path can serve (refused).
        params: ``{module name: [parameter names]}`` of the selected parameters each owns.
    """

    fast: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    params: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per group, for logs and error messages."""
        lines = [f"fast path: {len(self.fast)} module(s)"]
        if self.fallback:
            lines.append(
                "per-module torch.func fallback (slower): "
                + ", ".join(f"{n or '<root>'} ({c})" for n, c in self.fallback.items())
            )
        if self.unsupported:
            lines.append("unsupported: " + "; ".join(f"{n or '<root>'}: {r}" for n, r in self.unsupported.items()))
        return "\n".join(lines)

    def fallback_params(self) -> list[str]:
        """The selected parameter names that go through the per-module fallback."""
        return [p for n in self.fallback for p in self.params.get(n, [])]


def _functional_owner(module: nn.Module) -> bool:
    """A module whose parameters are consumed outside its own forward (torch parametrisations,
    :class:`~lightning_sketch.intrinsic.Subspace`)."""
    from torch.nn.utils import parametrize

    return isinstance(module, parametrize.ParametrizationList) or type(module).__name__ == "Subspace"


def _plan(model: nn.Module, layout: ParamLayout) -> tuple[CaptureSupport, list[tuple[str, nn.Module, str, dict[str, int]]]]:
    """(support, [(module name, module, handler, {local param name: layout index})])."""
    own = dict(model.named_parameters())
    index = {id(own[n]): i for i, n in enumerate(layout.names)}
    support = CaptureSupport()
    plan = []
    mha_children: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            mha_children.update(id(c) for c in module.modules() if c is not module)
    for name, module in model.named_modules():
        if id(module) in mha_children:
            continue  # out_proj: used functionally by its attention module, handled there
        local = {n: index[id(p)] for n, p in module._parameters.items() if p is not None and id(p) in index}
        if isinstance(module, nn.MultiheadAttention):
            for n, p in module.out_proj._parameters.items():
                if p is not None and id(p) in index:
                    local[f"out_proj.{n}"] = index[id(p)]
        if not local:
            continue
        support.params[name] = [layout.names[i] for i in local.values()]
        kind = _fast_kind(module)
        if _functional_owner(module):
            support.unsupported[name] = (
                f"{type(module).__name__} holds parameters that other modules use functionally (a "
                f"parametrisation or subspace); no hook sees them, only the whole-model vmap path"
            )
            continue
        if kind is not None:
            support.fast[name] = kind
        elif isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            support.unsupported[name] = (
                "nn.MultiheadAttention with bias_k/bias_v and batch_first=False (sequence-first inputs)"
            )
            continue
        elif isinstance(module, nn.Embedding):
            support.unsupported[name] = "nn.Embedding with max_norm (renormalises the weight in place)"
            continue
        else:
            kind = "fallback"
            support.fallback[name] = type(module).__name__
        plan.append((name, module, kind, local))
    return support, plan


def capture_support(model: nn.Module, layout: ParamLayout | None = None) -> CaptureSupport:
    """Which modules owning ``layout``'s parameters take the fast path, the fallback, or none.

    Example:
        >>> import torch
        >>> class Scale(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.s = torch.nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.s
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), Scale())
        >>> sup = capture_support(model)
        >>> sup.fast, sup.fallback
        ({'0': 'linear'}, {'1': 'Scale'})
    """
    return _plan(model, F.resolve_layout(model, layout))[0]


def _attr(module: nn.Module, dotted: str) -> Any:
    """``module.a.b`` by name; under ``functional_call`` this is the substituted tensor."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, tree)


class GradientCapture:
    """Context manager: per-example gradients or sketches from an ordinary forward + backward.

    Args:
        model: the module whose forward/backward is observed (never modified).
        sketch: ``None`` for the per-example gradients themselves (:meth:`grads`, ``[B, N]``); a
            ``per_layer`` sketch built over ``layout`` (``PerLayerSketch.for_module``) for the
            factorised path that never forms them; any other sketch of dimension N: the
            gradients are formed (``[B, N]`` memory) and ``sketch.apply``-ed in :meth:`sketches`.
        layout: the parameters (default: all trainable ones).
        loss_scale: ``"mean"`` if the backpropagated loss is the batch mean of per-example
            losses (the 1/B factor is undone), ``"sum"`` if it is their sum.

    Raises:
        UnsupportedModelError: for modules no path covers (see :func:`capture_support`).
        SketchConfigError: for a ``per_layer`` sketch not built over ``layout``.

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
        sketch: Sketch | None = None,
        layout: ParamLayout | None = None,
        loss_scale: Literal["mean", "sum"] = "mean",
    ) -> None:
        if loss_scale not in ("mean", "sum"):
            raise SketchConfigError(f"`loss_scale` must be 'mean' or 'sum', got {loss_scale!r}.")
        layout = F.resolve_layout(model, layout)
        if sketch is not None:
            F.check_sketch(sketch, layout)
        self._factorized = sketch is not None and sketch.supports_factorized
        if self._factorized:
            expected = sketch.layout_options(layout)["shapes"]
            if sketch.options["shapes"] != expected:
                raise SketchConfigError(
                    f"The per_layer sketch's `shapes` {sketch.options['shapes']} differ from the layout's {expected}; "
                    f"build it with PerLayerSketch.for_module(model, sketch_dim, layout=layout)."
                )
        layout.params(model)  # raises LayoutMismatchError if the model does not fit the layout
        self.support, self._plan = _plan(model, layout)
        if self.support.unsupported:
            bad = [p for n in self.support.unsupported for p in self.support.params.get(n, [])]
            raise UnsupportedModelError(
                f"No per-example gradient path covers {bad}: "
                + "; ".join(f"{n}: {r}" for n, r in self.support.unsupported.items())
                + ". Leave them out of the layout (ParamLayout.from_module(model, exclude=[...]), or the "
                "callbacks' `exclude=`)."
            )
        self._model, self._sketch, self._layout, self._scale = model, sketch, layout, loss_scale
        self._handles: list[Any] = []
        self._buffer: Tensor | None = None
        self._busy = False
        #: B of the batch observed next (set by the caller). An ``nn.Embedding`` called with a
        #: leading dimension of 1 while B > 1 (Hugging Face position ids ``[1, T]``, broadcast
        #: later) is then fed its ids expanded to ``[B, T]``: the same output values, but the
        #: output gradient stays per example. Its ``.grad`` is summed in another order (rounding).
        self.batch_size: int | None = None

    # ----------------------------------------------------------------- context
    def __enter__(self) -> GradientCapture:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.reset()
        for _name, module, kind, local in self._plan:
            if kind == "mha":
                self._hook_mha(module, local)
            elif kind == "fallback":
                params = self._own_params(module, local)
                self._handles.append(
                    module.register_forward_hook(self._fallback_hook(module, local, params), with_kwargs=True)
                )
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(module, kind, local)))
                if kind == "embedding":
                    self._handles.append(module.register_forward_pre_hook(self._expand_ids))
        return self

    def _expand_ids(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        size = self.batch_size
        if self._busy or not size or size == 1 or not args or not isinstance(args[0], Tensor):
            return None
        ids = args[0]
        if ids.ndim < 2 or ids.shape[0] != 1 or not torch.is_grad_enabled():
            return None
        return (ids.expand(size, *ids.shape[1:]), *args[1:])

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget what was accumulated so far (call between batches when reusing the context)."""
        self._buffer = None

    def _raw(self) -> Tensor:
        if self._buffer is None:
            raise SketchInputError(
                "No per-example sketches yet: run a forward and a backward (with grad enabled) of the batch loss "
                "inside the `with GradientCapture(...)` block first."
            )
        return self._buffer

    def _factor(self, scale: float) -> float:
        """The one multiplier of the raw buffer: B for ``loss_scale="mean"``, times the caller's ``scale``."""
        return float(scale) * (float(self._buffer.shape[0]) if self._scale == "mean" else 1.0)

    def sketches(self, scale: float = 1.0) -> Tensor:
        """``[B, D]`` per-example sketched gradients accumulated by the backward passes so far.

        Float32 for half-precision models (mixed precision accumulates in float32), else the
        parameters' dtype.

        Args:
            scale: a factor applied to the rows in the same single multiplication as the
                ``loss_scale`` rescaling (after the whole-model sketch, on ``[B, D]``); the
                callbacks pass the learning rate and gradient-accumulation factor here.

        Raises:
            SketchInputError: if no backward pass reached a hooked module yet, or ``sketch=None``.
        """
        if self._sketch is None:
            raise SketchInputError("This GradientCapture has no sketch (sketch=None); call grads() instead.")
        raw = self._raw()
        if not self._factorized:
            raw = self._sketch.apply(raw)  # linear: scaling [B, D] after it is cheaper than [B, N] before
        factor = self._factor(scale)
        return raw if factor == 1.0 else raw * factor

    def grads(self, scale: float = 1.0) -> Tensor:
        """``[B, N]`` per-example gradients in layout order (not for a ``per_layer`` sketch),
        times ``scale`` (as in :meth:`sketches`).

        Raises:
            SketchInputError: if nothing was captured yet or the capture is factorised.
        """
        if self._factorized:
            raise SketchInputError("A per_layer GradientCapture never forms per-example gradients; call sketches().")
        raw = self._raw()
        factor = self._factor(scale)
        return raw if factor == 1.0 else raw * factor

    # ----------------------------------------------------------------- accumulation
    def _out(self, size: int, like: Tensor) -> Tensor:
        if self._buffer is None:
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            width = self._sketch.sketch_dim if self._factorized else self._layout.dim
            self._buffer = torch.zeros(size, width, dtype=dtype, device=like.device)
        elif self._buffer.shape[0] != size:
            raise SketchInputError(
                f"Hooked layers saw batch sizes {self._buffer.shape[0]} and {size}; inputs must be batch-first "
                f"and one batch per GradientCapture (call reset() between batches; set `batch_size` so that "
                f"embeddings of broadcast ids [1, T] are expanded)."
            )
        return self._buffer

    def _add_outer(self, idx: int, a: Tensor, c: Tensor, row: int = 0) -> None:
        """Rows ``row : row + a.shape[-1]`` of parameter ``idx`` (a matrix view rows × cols) get
        Σ_t a_bt c_btᵀ; ``a [B, T, ra]``, ``c [B, T, cols]``."""
        out = self._out(a.shape[0], a)
        a, c = a.to(out.dtype), c.to(out.dtype)
        if self._factorized:
            block = self._sketch.blocks[idx]
            L, R = self._sketch.factors(block, out)
            left = a @ L[:, row : row + a.shape[-1]].T  # [B, T, d_o]
            sk = torch.bmm(left.transpose(1, 2), c @ R.T).reshape(a.shape[0], block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim] += sk
        else:
            off, numel = self._layout.offsets[idx], self._layout.numels[idx]
            rows = self._layout.shapes[idx][0]
            view = out[:, off : off + numel].view(a.shape[0], rows, numel // rows)
            view[:, row : row + a.shape[-1]] += torch.einsum("bta,btc->bac", a, c)

    def _add_vector(self, idx: int, g: Tensor, offset: int = 0) -> None:
        """Entries ``offset : offset + g.shape[-1]`` of the flattened parameter ``idx`` get ``g [B, n]``."""
        out = self._out(g.shape[0], g)
        g = g.reshape(g.shape[0], -1).to(out.dtype)
        if self._factorized:
            block = self._sketch.blocks[idx]
            L, R = self._sketch.factors(block, out)
            if R is None:
                sk = g @ L[:, offset : offset + g.shape[1]].T
            else:  # a whole matrix-shaped parameter (fallback, 2-D norm weights)
                full = g if g.shape[1] == block.numel else None
                if full is None:
                    full = g.new_zeros(g.shape[0], block.numel)
                    full[:, offset : offset + g.shape[1]] = g
                sk = (L @ full.view(-1, block.rows, block.cols) @ R.T).reshape(g.shape[0], block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim] += sk
        else:
            off = self._layout.offsets[idx] + offset
            out[:, off : off + g.shape[1]] += g

    def _add_embedding(self, idx: int, ids: Tensor, delta: Tensor, padding_idx: int | None) -> None:
        size = delta.shape[0]
        out = self._out(size, delta)
        ids = ids.reshape(size, -1)
        delta = delta.reshape(size, ids.shape[1], -1).to(out.dtype)
        if padding_idx is not None:
            delta = delta * (ids != padding_idx).unsqueeze(-1).to(delta.dtype)
        if self._factorized:
            block = self._sketch.blocks[idx]
            L, R = self._sketch.factors(block, out)
            left = L.T[ids]  # [B, T, d_o]: the columns of L picked by the tokens
            sk = torch.bmm(left.transpose(1, 2), delta @ R.T).reshape(size, block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim] += sk
        else:
            off, numel = self._layout.offsets[idx], self._layout.numels[idx]
            rows, width = self._layout.shapes[idx]
            rowsel = (torch.arange(size, device=ids.device).unsqueeze(1) * rows + ids).reshape(-1)
            flat = torch.zeros(size * rows, width, dtype=out.dtype, device=out.device)
            flat.index_add_(0, rowsel, delta.reshape(-1, width))
            out[:, off : off + numel] += flat.view(size, numel)

    # ----------------------------------------------------------------- fast-path hooks
    @staticmethod
    def _own_params(module: nn.Module, local: dict[str, int]) -> dict[str, Tensor]:
        return {n: _attr(module, n) for n in local}

    def _make_hook(self, owner: nn.Module, kind: str, local: dict[str, int]):
        # The parameter objects seen now: under torch.func.functional_call (per_example_grads, hvp,
        # torch.func transforms) the module holds substituted tensors, and such calls are skipped so
        # that they can run inside the context without adding anything.
        expected = self._own_params(owner, local)
        w, b = local.get("weight"), local.get("bias")

        def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._busy or any(getattr(module, n) is not p for n, p in expected.items()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not torch.is_grad_enabled():
                return
            x = args[0].detach()

            def grad_hook(grad_out: Tensor) -> None:
                self._accumulate(module, kind, x, grad_out.detach(), w, b)

            output.register_hook(grad_hook)

        return forward_hook

    def _accumulate(self, module: nn.Module, kind: str, x: Tensor, delta: Tensor, w: int | None, b: int | None) -> None:
        size = delta.shape[0]
        if kind == "embedding":
            if w is not None:
                self._add_embedding(w, x, delta, module.padding_idx)
            return
        if kind == "norm":
            self._norm(module, x, delta, w, b)
            return
        if kind == "conv":
            delta = delta.reshape(size, delta.shape[1], -1).transpose(1, 2)  # [B, P, out]
        else:
            delta = delta.reshape(size, -1, delta.shape[-1])  # [B, T, out]
        if w is not None:
            if kind == "conv":
                xin = x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x
                kernel = tuple(module.kernel_size)
                dilation, stride = tuple(module.dilation), tuple(module.stride)
                if isinstance(module, nn.Conv1d):
                    kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
                acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
                inp = TF.unfold(xin.to(acc), kernel, dilation, _conv_padding(module), stride).transpose(1, 2)
                self._add_outer(w, delta, inp)
            elif kind == "hf_conv1d":
                self._add_outer(w, x.reshape(size, -1, x.shape[-1]), delta)
            else:
                self._add_outer(w, delta, x.reshape(size, -1, x.shape[-1]))
        if b is not None:
            self._add_vector(b, delta.sum(1))

    def _norm(self, module: nn.Module, x: Tensor, delta: Tensor, w: int | None, b: int | None) -> None:
        size = delta.shape[0]
        dt = torch.float64 if delta.dtype == torch.float64 else torch.float32
        x, delta = x.to(dt), delta.to(dt)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            dims = [0] + list(range(2, x.ndim))
            use_batch = module.training or module.running_mean is None
            if use_batch:
                mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            else:
                shape = [1, -1] + [1] * (x.ndim - 2)
                mean, var = module.running_mean.to(dt).view(shape), module.running_var.to(dt).view(shape)
            xhat = (x - mean) / torch.sqrt(var + module.eps)
            reduce = list(range(2, x.ndim))
            gw = (delta * xhat).sum(reduce) if reduce else delta * xhat
            gb = delta.sum(reduce) if reduce else delta
        elif isinstance(module, nn.GroupNorm):
            g = x.reshape(size, module.num_groups, -1)
            mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
            xhat = ((g - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
            reduce = list(range(2, x.ndim))
            gw = (delta * xhat).sum(reduce) if reduce else delta * xhat
            gb = delta.sum(reduce) if reduce else delta
        else:
            nd = len(module.normalized_shape)
            dims = tuple(range(x.ndim - nd, x.ndim))
            if isinstance(module, nn.LayerNorm):
                mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
                xhat = (x - mean) / torch.sqrt(var + module.eps)
            else:  # nn.RMSNorm
                eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
                xhat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
            lead = (delta * xhat).reshape(size, -1, *module.normalized_shape)
            gw = lead.sum(1)
            gb = delta.reshape(size, -1, *module.normalized_shape).sum(1)
        if w is not None:
            self._add_vector(w, gw.reshape(size, -1))
        if b is not None:
            self._add_vector(b, gb.reshape(size, -1))

    # ----------------------------------------------------------------- nn.MultiheadAttention
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
            hit = targets.get(id(base)) if base is not None else None
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

                out.register_hook(grad_hook)
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
                    "GradientCapture: nn.MultiheadAttention got an unbatched (2-D) query; per-example gradients "
                    "need batched inputs [B, L, E] (batch_first=True) or [L, B, E]."
                )
            state["size"] = query.shape[0] if mod.batch_first else query.shape[1]
            state["orig"] = TF.linear
            TF.linear = reader(state["orig"])

        def post_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if "orig" in state:
                TF.linear = state.pop("orig")

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))

    # ----------------------------------------------------------------- per-module fallback
    def _fallback_hook(self, owner: nn.Module, local: dict[str, int], expected: dict[str, Tensor]):
        def forward_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._busy or any(_attr(module, n) is not p for n, p in expected.items()):
                return
            if not torch.is_grad_enabled():
                return
            leaves = pytree.tree_leaves(output)
            saved = (_detach_tree(args), _detach_tree(kwargs))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.requires_grad:
                    leaf.register_hook(self._fallback_grad(module, local, saved, i))

        return forward_hook

    def _fallback_grad(self, module: nn.Module, local: dict[str, int], saved: tuple[Any, Any], leaf: int):
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


@contextlib.contextmanager
def _fork_rng(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def hooked_sketch(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    sketch: Sketch | None,
    layout: ParamLayout,
    chunk_size: int | None = None,
    capture: GradientCapture | None = None,
) -> Tensor:
    """Per-example sketches (or gradients, ``sketch=None``) through :class:`GradientCapture`:
    per chunk of examples, one forward and ``torch.autograd.grad`` of the summed per-example
    losses (no ``.grad`` written). ``[B, D]`` (or ``[B, N]``). ``capture``: a
    ``GradientCapture(model, sketch, layout, loss_scale="sum")`` to reuse (built if None)."""
    size = F.batch_size(batch)
    chunk = F.check_chunk_size(chunk_size, size)
    own = dict(model.named_parameters())
    params = [own[n] for n in layout.names]
    cap = GradientCapture(model, sketch, layout, loss_scale="sum") if capture is None else capture
    parts = []
    for start in range(0, size, chunk):
        sub = batch if chunk == size else F.slice_batch(batch, start, min(start + chunk, size))
        cap.batch_size = min(chunk, size - start)
        with cap, torch.enable_grad():
            losses = F.check_losses(loss_fn(model, sub), min(chunk, size - start))
            torch.autograd.grad(losses.sum(), params, allow_unused=True)
        parts.append(cap.grads() if sketch is None else cap.sketches())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
