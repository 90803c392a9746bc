"""The accumulation kernels of :class:`~lightning_sketch.gradients.capture.GradientCapture`.

:class:`_CaptureKernels` holds the ``[B, N]`` gradient (or ``[B, D]`` ``per_layer`` sketch) buffer
and adds each hooked module's per-example contribution to it: outer products Σ_t a_bt c_btᵀ
(``Linear``, ``Conv1D``, the unfolded ``Conv1d/2d``), vectors (biases, norm affine parameters,
the fallback), embedding rows; plus the fast-path forward hooks that feed them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as TF

from lightning_sketch.exceptions import NotBatchFirstError
from lightning_sketch.gradients._capture_plan import _attr, _conv_padding
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch
from lightning_sketch.sketches.per_layer import PerLayerSketch

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], None]


def _earliest(edges: list[GradientEdge]) -> list[GradientEdge]:
    """The edges from whose node no other edge's node is reachable in the autograd graph.

    One iterative depth-first pass over the graph below them, memoised per node (written by hand:
    ``torch.autograd.graph`` has no reachability query).
    """
    marked = {id(e.node) for e in edges}
    below: dict[int, bool] = {}  # node id -> some marked node lies strictly below it

    def reaches(root: Any) -> bool:
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if key in below and not expanded:
                continue
            nexts = [n for n, _ in node.next_functions if n is not None]
            if expanded:
                below[key] = any(id(n) in marked or below.get(id(n), False) for n in nexts)
                continue
            stack.append((node, True))
            stack.extend((n, False) for n in nexts if id(n) not in below)
        return below[id(root)]

    return [e for e in edges if not reaches(e.node)]


class _CaptureKernels:
    """Buffer and kernels shared by the fast path, the attention reader and the fallback."""

    _model: nn.Module
    _sketch: Sketch | None
    #: The sketch when it is factorised (``supports_factorized``), for its ``blocks``/``factors``.
    _per_layer: PerLayerSketch | None
    _factorized: bool
    _layout: ParamLayout
    _scale: Literal["mean", "sum"]
    _handles: list[Any]
    _buffer: Tensor | None
    #: True while the fallback runs its own forward/backward of a module (the hooks ignore it).
    _busy: bool
    batch_size: int | None
    #: The previous batch's buffer, when nothing handed out aliases it: refilled with zeros instead of
    #: allocating afresh (on CPU a fresh [B, N] buffer costs its page faults: 27 ms at 16 x 1.7M).
    _spare: Tensor | None
    #: Whether :meth:`grads` handed out the current buffer itself (it must then never become spare).
    _lent: bool
    #: Whether hooked tensors are recorded (only for :func:`hooked_sketch`'s own backward).
    _track: bool
    #: The gradient edge (autograd node, output index) of every tensor a hook was put on since the last
    #: reset while ``_track``, with the tensor's size; None for a leaf (no edge to stop at). Edges, not
    #: tensors: they keep no activation alive, and an in-place change of the tensor afterwards
    #: (``ReLU(inplace=True)``) does not move them, so they name exactly the gradient the hook sees.
    _watched: list[tuple[GradientEdge, int] | None]

    def _watch(self, t: Tensor, hook: Callable[[Tensor], None]) -> None:
        """Put ``hook`` on ``t``'s gradient and, while tracking, record its edge (:meth:`_grad_targets`)."""
        t.register_hook(hook)
        if self._track:
            # a leaf has no edge to stop at: differentiate w.r.t. the parameters then
            self._watched.append(None if t.grad_fn is None else (get_gradient_edge(t), t.numel()))

    def _grad_targets(self) -> list[GradientEdge] | None:
        """Gradient edges a backward may stop at while still firing every hook, else None.

        Differentiating the loss with respect to these (instead of the parameters) fires every hook
        while autograd skips the batch's parameter gradients (``Xᵀ δ`` per layer), which the capture
        does not use. Only the earliest hooked edges are returned (those below which no other hooked
        edge lies in the autograd graph): every later one is on a path from the loss to one of them, so
        the backward passes, and fires the hook, at each; autograd returns (and holds) the gradients of
        the earliest only. None when nothing was recorded, when a hooked tensor is a leaf, or when those
        gradients would hold more entries than the larger of N and the capture's own buffer (stopping
        there must not take more memory than the parameter gradients or rows it replaces).
        """
        if not self._watched or any(w is None for w in self._watched):
            return None
        watched = cast("list[tuple[GradientEdge, int]]", self._watched)
        sizes = {(id(e.node), e.output_nr): (e, n) for e, n in watched}
        targets = _earliest([e for e, _ in sizes.values()])
        width = self._per_layer.sketch_dim if self._per_layer is not None else self._layout.dim
        budget = max(self._layout.dim, (self.batch_size or 1) * width)
        held = sum(sizes[(id(e.node), e.output_nr)][1] for e in targets)
        return targets if held <= budget else None

    # ----------------------------------------------------------------- accumulation
    def _out(self, size: int, like: Tensor) -> Tensor:
        if self._buffer is None:
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            width = self._per_layer.sketch_dim if self._per_layer is not None else self._layout.dim
            spare, self._spare, self._lent = self._spare, None, False
            if spare is not None and spare.shape == (size, width) and spare.dtype == dtype and (
                spare.device == like.device
            ):
                self._buffer = spare.zero_()
            else:
                self._buffer = torch.zeros(size, width, dtype=dtype, device=like.device)
        elif self._buffer.shape[0] != size:
            raise NotBatchFirstError(
                f"Hooked layers saw batch sizes {self._buffer.shape[0]} and {size}; inputs must be "
                f"batch-first and one batch per GradientCapture (call reset() between batches; set "
                f"`batch_size` so that embeddings of broadcast ids [1, T] are expanded)."
            )
        return self._buffer

    def _add_outer(self, idx: int, a: Tensor, c: Tensor, row: int = 0) -> None:
        """Rows ``row : row + a.shape[-1]`` of parameter ``idx`` (a matrix view rows × cols) get
        Σ_t a_bt c_btᵀ; ``a [B, T, ra]``, ``c [B, T, cols]``."""
        out = self._out(a.shape[0], a)
        a, c = a.to(out.dtype), c.to(out.dtype)
        if self._per_layer is not None:
            block = self._per_layer.blocks[idx]
            L, R = self._per_layer.factors(block, out)
            # A parameter reaching an outer product is a matrix, and its block has both factors.
            assert R is not None
            left = a @ L[:, row : row + a.shape[-1]].T  # [B, T, d_o]
            sk = torch.bmm(left.transpose(1, 2), c @ R.T).reshape(a.shape[0], block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim] += sk
        else:
            off, numel = self._layout.offsets[idx], self._layout.numels[idx]
            rows = self._layout.shapes[idx][0]
            view = out[:, off : off + numel].view(a.shape[0], rows, numel // rows)
            # accumulate in place (no [B, ra, cols] temporary and no separate add pass)
            view[:, row : row + a.shape[-1]].baddbmm_(a.transpose(1, 2), c)

    def _add_vector(self, idx: int, g: Tensor, offset: int = 0) -> None:
        """Entries ``offset : offset + g.shape[-1]`` of the flattened parameter ``idx`` get ``g [B, n]``."""
        out = self._out(g.shape[0], g)
        g = g.reshape(g.shape[0], -1).to(out.dtype)
        if self._per_layer is not None:
            block = self._per_layer.blocks[idx]
            L, R = self._per_layer.factors(block, out)
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
        if self._per_layer is not None:
            block = self._per_layer.blocks[idx]
            L, R = self._per_layer.factors(block, out)
            assert R is not None  # an embedding weight is a matrix: its block has both factors
            left = L.T[ids]  # [B, T, d_o]: the columns of L picked by the tokens
            sk = torch.bmm(left.transpose(1, 2), delta @ R.T).reshape(size, block.out_dim)
            out[:, block.out_offset : block.out_offset + block.out_dim] += sk
        else:
            off, numel = self._layout.offsets[idx], self._layout.numels[idx]
            rows, width = self._layout.shapes[idx]
            example = torch.arange(size, device=ids.device).unsqueeze(1).expand_as(ids)
            # scatter-add straight into the buffer (no dense [B, rows, width] temporary)
            rows_view = out[:, off : off + numel].view(size, rows, width)
            rows_view.index_put_((example, ids), delta, accumulate=True)

    # ----------------------------------------------------------------- fast-path hooks
    @staticmethod
    def _own_params(module: nn.Module, local: dict[str, int]) -> dict[str, Tensor]:
        return {n: _attr(module, n) for n in local}

    def _make_hook(self, owner: nn.Module, kind: str, local: dict[str, int]) -> ForwardHook:
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

            self._watch(output, grad_hook)

        return forward_hook

    def _accumulate(
        self, module: nn.Module, kind: str, x: Tensor, delta: Tensor, w: int | None, b: int | None
    ) -> None:
        size = delta.shape[0]
        if kind == "embedding":
            if w is not None:
                self._add_embedding(w, x, delta, cast(nn.Embedding, module).padding_idx)
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
                conv = cast("nn.Conv1d | nn.Conv2d", module)  # _fast_kind's "conv" is exactly these
                xin = x.unsqueeze(2) if isinstance(conv, nn.Conv1d) else x
                kernel = tuple(conv.kernel_size)
                dilation, stride = tuple(conv.dilation), tuple(conv.stride)
                if isinstance(conv, nn.Conv1d):
                    kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
                acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
                padding = _conv_padding(conv)
                assert padding is not None  # _fast_kind gives "conv" only when the padding is unfoldable
                inp = TF.unfold(xin.to(acc), kernel, dilation, padding, stride).transpose(1, 2)
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
            running_mean, running_var = module.running_mean, module.running_var
            if module.training or running_mean is None:
                mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            else:
                assert running_var is not None  # BatchNorm registers running_var with running_mean
                shape = [1, -1] + [1] * (x.ndim - 2)
                mean, var = running_mean.to(dt).view(shape), running_var.to(dt).view(shape)
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
            # The remaining norms of _fast_kind's "norm": LayerNorm and RMSNorm.
            layer = cast("nn.LayerNorm | nn.RMSNorm", module)
            normalized_shape = tuple(layer.normalized_shape)
            last = tuple(range(x.ndim - len(normalized_shape), x.ndim))
            if isinstance(layer, nn.LayerNorm):
                mean, var = x.mean(last, keepdim=True), x.var(last, unbiased=False, keepdim=True)
                xhat = (x - mean) / torch.sqrt(var + layer.eps)
            else:  # nn.RMSNorm
                eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
                xhat = x * torch.rsqrt(x.pow(2).mean(last, keepdim=True) + eps)
            lead = (delta * xhat).reshape(size, -1, *normalized_shape)
            gw = lead.sum(1)
            gb = delta.reshape(size, -1, *normalized_shape).sum(1)
        if w is not None:
            self._add_vector(w, gw.reshape(size, -1))
        if b is not None:
            self._add_vector(b, gb.reshape(size, -1))
