"""Hook-based per-example gradients and sketches: no ``vmap`` over the whole forward (LoGra-style,
Choe et al. 2024).

:class:`GradientCapture` observes an ordinary forward + backward of a batch and builds, from the
hooked layer inputs x and output gradients δ, either the per-example gradients ``[B, N]``
(``sketch=None`` or a whole-model sketch, applied at the end) or, for the ``per_layer`` sketch
(:class:`~lightning_sketch.sketches.per_layer.PerLayerSketch`, LoGra-style, Choe et al. 2024), the
per-example sketches directly: for a weight whose per-example gradient is Σ_t a_bt c_btᵀ its
block L G Rᵀ is Σ_t (L a_bt)(R c_btᵀ), so no per-example gradient is ever formed.

Fast path (t: positions, summed; every module must take batch-first inputs):

- ``nn.Linear`` on ``[B, in]`` or ``[B, ..., in]`` inputs: G = Σ_t δ_t x_tᵀ; bias Σ_t δ_t.
- ``nn.Embedding`` (``padding_idx`` rows get no gradient; not ``max_norm``/``scale_grad_by_freq``,
  which couple examples or write the weight): G = Σ_t e_{id_t} δ_tᵀ. Ids shared by the batch
  (positions ``[T]`` or ``[1, T]``, broadcast over it) are fed expanded to ``[B, T]``
  (``_capture_shared``; :meth:`GradientCapture.probe` tells positions from one id per example).
- Hugging Face ``Conv1D`` (GPT-2; weight ``[in, out]``): G = Σ_t x_t δ_tᵀ.
- ``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1, zero padding): the unfolded input plays x.
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` affine parameters:
  Σ δ ⊙ x̂ with x̂ recomputed from the saved input (BatchNorm: the statistics the forward used; in
  train mode they couple examples, so rows are each example's contribution to the batch gradient).
- ``nn.MultiheadAttention``: its ``in_proj_weight``/``out_proj`` are used functionally inside
  ``F.multi_head_attention_forward`` (module hooks never see them); while an attention module
  runs, the capture routes ``torch.nn.functional.linear`` through a reader that records the
  projections' inputs and output gradients (packed, split and separate projection weights).

Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, batch-first or not) are recomputed once,
unrolled and batched, and their affine maps' gradients read per example (``_capture_rnn``); a
per-example loop of that module alone serves ``proj_size`` and train-mode inter-layer dropout
(``_capture_fallback``).

Every other module owning selected parameters falls back **per module**: its forward inputs are
saved and, when its output gradient δ arrives, ``vmap(grad(⟨module(x_b; θ_m), δ_b⟩))`` over the
examples gives the per-example gradients of that module's own parameters only (one extra forward
and backward of that module). Fallback modules must process examples independently along dim 0;
random ones (dropout inside) are recomputed with other masks (in eval mode they are exact).
:func:`capture_support` lists what is covered and what falls back.

Modules: the per-module-type rules and :func:`capture_support` live in ``_capture_plan``, the
accumulation kernels and fast-path hooks in ``_capture_kernels``, the attention reader in
``_capture_mha`` and the fallback in ``_capture_fallback``; this module assembles them.

Hooks only read: forward hooks save inputs and register tensor hooks that return ``None``, so
training gradients are bit-for-bit unchanged. Forward calls through
``torch.func.functional_call`` (every other function of this package, HVPs included) do not use
the module's own parameter objects and are ignored, so they may run inside the context.
A parameter used by a module other than the one that registers it (e.g. ``F.linear(h,
self.embed.weight)`` written in a parent's ``forward``) is invisible to hooks: tie weights by
sharing the Parameter between modules (``head.weight = embed.weight``), which is covered.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients._capture_fallback import _FallbackHooks, rnn_cudnn_off
from lightning_sketch.gradients._capture_mha import _MHAReader
from lightning_sketch.gradients._capture_plan import CaptureSupport, _plan, capture_support
from lightning_sketch.gradients._capture_shared import expanded_ids, probe_shared
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch
from lightning_sketch.sketches.per_layer import PerLayerSketch

__all__ = ["CaptureSupport", "GradientCapture", "capture_support", "hooked_sketch"]


class GradientCapture(_MHAReader, _FallbackHooks):
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
        # `supports_factorized` promises PerLayerSketch's `blocks` and `factors` (the one such kind).
        self._per_layer = cast(PerLayerSketch, sketch) if self._factorized else None
        if sketch is not None and self._factorized:
            expected = sketch.layout_options(layout)["shapes"]
            if sketch.options["shapes"] != expected:
                raise SketchConfigError(
                    f"The per_layer sketch's `shapes` {sketch.options['shapes']} differ from the layout's "
                    f"{expected}; build it with PerLayerSketch.for_module(model, sketch_dim, layout=layout)."
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
        self._watched: list[tuple[GradientEdge, int] | None] = []
        self._track = False
        self._spare: Tensor | None = None
        self._lent = False
        #: B of the batch observed next (set by the caller). An ``nn.Embedding`` whose ids are shared
        #: by the batch (positions ``[T]`` or ``[1, T]``, broadcast later) is then fed its ids
        #: expanded to ``[B, T]``: the same output values, but the output gradient stays per
        #: example (``_capture_shared``). Its ``.grad`` is summed in another order (rounding).
        self.batch_size: int | None = None
        #: {id(embedding): its ids [T] are shared by the batch}, from :meth:`probe` (1-D ids of
        #: length B are taken as one id per example while undecided).
        self._shared: dict[int, bool] = {}
        self._probed = False
        #: Whether the hook paths gave this model's exact per-example gradients when checked
        #: against autograd on the first eval-mode batch of ``sketch_gradients(mode="auto")``
        #: (``_capture_check``): None until checked; False sends that function to ``torch.func``.
        self.exact: bool | None = None

    # ----------------------------------------------------------------- context
    def __enter__(self) -> GradientCapture:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.reset()
        for _name, module, kind, local in self._plan:
            if kind == "mha":
                # _fast_kind's "mha" is given to nn.MultiheadAttention only
                self._hook_mha(cast(nn.MultiheadAttention, module), local)
            elif kind == "fallback":
                params = self._own_params(module, local)
                hook = self._fallback_hook(module, local, params)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif kind == "rnn":
                params = self._own_params(module, local)
                hook = self._rnn_hook(cast(nn.RNNBase, module), local, params)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(module, kind, local)))
                if kind == "embedding":
                    self._handles.append(module.register_forward_pre_hook(self._expand_ids))
        return self

    def _expand_ids(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        size = self.batch_size
        if self._busy or not size or not args or not isinstance(args[0], Tensor):
            return None
        if not torch.is_grad_enabled():
            return None
        ids = expanded_ids(args[0], size, self._shared.get(id(module)))
        return None if ids is None else (ids, *args[1:])

    def probe(self, loss_fn: F.LossFn, batch: F.Batch) -> None:
        """Decide, once, which embeddings called with 1-D ids are shared by the batch (positions
        ``wpe(arange(T))``) from the first two examples of ``batch`` (``_capture_shared``); call it
        before the first captured forward when T may equal B. Eval mode, RNG forked, nothing kept.

        Raises:
            UnsupportedModelError: if a shared embedding's output is used other than broadcast
                over the batch (feeding it ids ``[B, T]`` would change the losses).
        """
        if self._probed or F.batch_size(batch) < 2:
            return
        embeddings = {n: cast(nn.Embedding, m) for n, m, kind, _ in self._plan if kind == "embedding"}
        self._busy = True  # this context's own hooks (if entered) ignore the probe's forwards
        try:
            self._shared.update(probe_shared(self._model, loss_fn, batch, embeddings))
        finally:
            self._busy = False
        self._probed = True

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._watched = []  # do not keep the step's activations alive past the context

    def reset(self) -> None:
        """Forget what was accumulated so far (call between batches when reusing the context)."""
        self._buffer = None
        self._watched = []

    def _raw(self) -> Tensor:
        if self._buffer is None:
            raise SketchInputError(
                "No per-example sketches yet: run a forward and a backward (with grad enabled) of the batch "
                "loss inside the `with GradientCapture(...)` block first."
            )
        return self._buffer

    def _factor(self, scale: float) -> float:
        """The one multiplier of the raw buffer: B for ``loss_scale="mean"``, times the caller's
        ``scale``."""
        assert self._buffer is not None  # called after _raw(), which raises while the buffer is None
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
        buffer = raw = self._raw()
        if not self._factorized:
            raw = self._sketch.apply(raw)  # linear: scaling [B, D] after it is cheaper than [B, N] before
        factor = self._factor(scale)
        out = raw if factor == 1.0 else raw * factor
        if not self._lent and out.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
            self._spare = buffer  # nothing handed out aliases it: the next batch refills it
        return out

    def grads(self, scale: float = 1.0) -> Tensor:
        """``[B, N]`` per-example gradients in layout order (not for a ``per_layer`` sketch),
        times ``scale`` (as in :meth:`sketches`).

        Raises:
            SketchInputError: if nothing was captured yet or the capture is factorised.
        """
        if self._factorized:
            raise SketchInputError(
                "A per_layer GradientCapture never forms per-example gradients; call sketches()."
            )
        raw = self._raw()
        factor = self._factor(scale)
        if factor == 1.0:
            self._spare, self._lent = None, True  # handed out: never refilled behind the caller's back
            return raw
        return raw * factor


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
    losses with respect to the earliest hooked outputs' gradient edges (the parameters when a hooked
    tensor is a leaf), so no ``.grad`` is written and no batch gradient is formed.
    ``[B, D]`` (or ``[B, N]``). ``capture``: a ``GradientCapture(model, sketch, layout,
    loss_scale="sum")`` to reuse, with its buffer (built if None). Reentrant activation checkpointing
    (``use_reentrant=True``) refuses ``autograd.grad`` in torch itself; the non-reentrant kind works."""
    size = F.batch_size(batch)
    chunk = F.check_chunk_size(chunk_size, size)
    own = dict(model.named_parameters())
    params = [own[n] for n in layout.names]
    cap = GradientCapture(model, sketch, layout, loss_scale="sum") if capture is None else capture
    cap.probe(loss_fn, batch)
    parts = []
    for start in range(0, size, chunk):
        sub = batch if chunk == size else F.slice_batch(batch, start, min(start + chunk, size))
        cap.batch_size = min(chunk, size - start)
        with cap, torch.enable_grad(), rnn_cudnn_off(model):
            cap._track = True
            try:
                losses = F.check_losses(loss_fn(model, sub), min(chunk, size - start))
                # Stopping the backward at the hooked outputs skips the batch's parameter gradients
                # (unused here): docs/measurements.md, "Per-example gradients".
                targets = cap._grad_targets()
            finally:
                cap._track = False
            cap._watched = []
            if targets is None:
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
            else:
                torch.autograd.grad(losses.sum(), targets, allow_unused=True)
            del targets
        parts.append(cap.grads() if sketch is None else cap.sketches())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
