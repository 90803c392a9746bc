"""Per-example gradients and their sketches (arXiv 2402.03994, eqs. 4–5, Listing 6).

Per-example gradients use ``torch.func``: ``vmap(grad(ℓ))`` over examples with the model called
through ``functional_call`` (the ``torch.func`` per-sample-gradient recipe), in chunks of
``chunk_size`` examples so that at most ``chunk_size × N`` gradient entries exist at once.
Non-selected parameters are held fixed; buffers pass through unchanged.

Dropout in train mode: ``vmap`` runs with ``randomness="different"``, so every example draws its
own mask from the global RNG (as a loop over examples would, though not with the same masks).
Callers that must not disturb the global RNG (the callbacks) fork it around the call. Train-mode
BatchNorm is refused (:class:`UnsupportedModelError`).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from lightning_sketch.exceptions import NotBatchFirstError, SketchConfigError, UnsupportedModelError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients._capture_check import (
    CHECKED_EXAMPLES,
    hook_error,
    mismatched_parameters,
    tolerance,
)
from lightning_sketch.gradients.capture import GradientCapture, hooked_sketch
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch

__all__ = ["finite_mask", "hook_capture", "per_example_grads", "sketch_gradients"]


def _example_loss(module: F._LossModule, fixed: dict[str, Tensor]):
    def loss_one(selected: dict[str, Tensor], example: F.Batch) -> Tensor:
        losses = F.check_losses(F.loss_call(module, selected, fixed, F.unsqueeze_example(example)), 1)
        return losses[0]

    return loss_one


def per_example_grads(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    layout: ParamLayout | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example gradients g_b = ∇_θ ℓ(θ; x_b), flattened in layout order.

    Args:
        model: the module (not modified: no ``.grad``, parameter, buffer or mode change).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` per-example losses; it is called with a
            batch of one example inside ``vmap``.
        batch: a Tensor, a dict or a tuple/list of tensors sharing the leading dimension B.
        layout: which parameters (default: all trainable ones).
        chunk_size: examples per ``vmap`` call (default: the whole batch).

    Returns:
        ``[B, N]`` in the parameters' dtype. Non-finite entries are returned as they are; see
        :func:`finite_mask`.

    Raises:
        UnsupportedModelError: for train-mode BatchNorm.
        SketchInputError: for a malformed batch or a ``loss_fn`` not returning ``[B]``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.randn(4, 3)
        >>> g = per_example_grads(model, lambda m, b: m(b).squeeze(-1), x)
        >>> torch.allclose(g, x)  # d(w·x)/dw = x
        True
    """
    F.check_model(model)
    layout = F.resolve_layout(model, layout)
    size = F.batch_size(batch)
    chunk = F.check_chunk_size(chunk_size, size)
    selected, fixed = F.split_state(model, layout)
    module = F._LossModule(model, loss_fn)
    fn = vmap(grad(_example_loss(module, fixed)), in_dims=(None, F.in_dims(batch)), randomness="different")
    dtype = next(iter(selected.values())).dtype
    device = next(iter(selected.values())).device
    out = torch.empty(size, layout.dim, dtype=dtype, device=device)
    with torch.enable_grad(), F.quiet_vmap():
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            grads = fn(selected, F.slice_batch(batch, start, stop))
            out[start:stop] = layout.flatten(grads)
    return out


def finite_mask(g: Tensor) -> Tensor:
    """``BoolTensor[B]``: True for rows of ``g [B, ...]`` whose entries are all finite.

    Example:
        >>> finite_mask(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])).tolist()
        [True, False]
    """
    return torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)


def _implicit(
    model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, sketch: Sketch, layout: ParamLayout, chunk: int
) -> Tensor:
    """∇_ω ℓ(θ0 + Φᵀω; x_b) at ω = 0 for every example (paper eq. 4)."""
    selected, fixed = F.split_state(model, layout)
    module = F._LossModule(model, loss_fn)
    loss_one = _example_loss(module, fixed)

    lift_op = sketch.op.T

    def lifted(omega: Tensor, example: F.Batch) -> Tensor:
        return loss_one(F.lift(selected, layout, lift_op, omega), example)

    p0 = next(iter(selected.values()))
    omega0 = torch.zeros(sketch.sketch_dim, dtype=p0.dtype, device=p0.device)
    fn = vmap(grad(lifted), in_dims=(None, F.in_dims(batch)), randomness="different")
    size = F.batch_size(batch)
    out = torch.empty(size, sketch.sketch_dim, dtype=p0.dtype, device=p0.device)
    with torch.enable_grad(), F.quiet_vmap():
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            out[start:stop] = fn(omega0, F.slice_batch(batch, start, stop))
    return out


def sketch_gradients(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    sketch: Sketch,
    mode: Literal["explicit", "implicit", "factorized", "hooks", "auto"] = "explicit",
    layout: ParamLayout | None = None,
    chunk_size: int | None = None,
    capture: GradientCapture | None = None,
) -> Tensor:
    """Sketched per-example gradients Φ g_b, ``[B, D]`` (arXiv 2402.03994, eqs. 4–5, Listing 6).

    Modes (all give the same numbers up to rounding):

    - ``"explicit"`` (eq. 5): per-example gradients ``[chunk, N]`` then ``sketch.apply``;
      the paper finds it the faster one (Table 4).
    - ``"implicit"`` (eq. 4): ∇_ω ℓ(θ0 + Φᵀω) at ω = 0, vmapped over examples; never forms an
      N-dimensional per-example gradient.
    - ``"factorized"``: only for sketches with ``supports_factorized`` (``per_layer``); one ordinary
      forward and backward of the summed loss with :class:`~lightning_sketch.gradients.GradientCapture`
      hooks computing (L δ_b)(R x_b)ᵀ per layer (Choe et al. 2024). Uses
      ``torch.autograd.grad``, so ``.grad`` is untouched.
    - ``"hooks"``: like ``"explicit"`` (per-example gradients ``[chunk, N]``, then
      ``sketch.apply``) but the gradients come from the same hooks instead of ``vmap`` over the
      whole forward, so models with data-dependent control flow (Hugging Face) work.
    - ``"auto"``: ``"factorized"`` for a ``per_layer`` sketch, else ``"hooks"``; ``"explicit"``
      when some selected parameter is out of the hooks' reach (parametrised models).

    The hook modes cover the modules listed in :mod:`lightning_sketch.gradients.capture`
    and fall back to ``torch.func`` per module (not per model) for the others.

    Args:
        model: the module (not modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        batch: as in :func:`per_example_grads`.
        sketch: Φ with ``sketch.dim == layout.dim``.
        mode: see above.
        layout: which parameters (default: all trainable ones).
        chunk_size: examples per ``vmap`` call (explicit/implicit).
        capture: the hook modes: a ``GradientCapture(model, sketch, layout, loss_scale="sum")`` to
            reuse across calls (one plan of the modules, and its ``[B, N]`` buffer refilled instead
            of allocated per call); built per call when None.

    Returns:
        ``[B, D]`` in the parameters' dtype.

    Raises:
        SketchConfigError: if ``sketch.dim`` differs from N, or for an unknown ``mode``.
        UnsupportedModelError: for train-mode BatchNorm, or modules ``"factorized"`` cannot cover.

    Example:
        >>> import torch
        >>> from lightning_sketch.sketches import make
        >>> model = torch.nn.Linear(4, 2)
        >>> loss_fn = lambda m, b: m(b).pow(2).sum(-1)
        >>> s = make("dense", dim=10, sketch_dim=3, seed=0)
        >>> x = torch.randn(5, 4)
        >>> e = sketch_gradients(model, loss_fn, x, s, mode="explicit")
        >>> i = sketch_gradients(model, loss_fn, x, s, mode="implicit")
        >>> e.shape, torch.allclose(e, i, atol=1e-5)
        (torch.Size([5, 3]), True)
    """
    if mode not in ("explicit", "implicit", "factorized", "hooks", "auto"):
        raise SketchConfigError(
            f"`mode` must be 'explicit', 'implicit', 'factorized', 'hooks' or 'auto', got {mode!r}."
        )
    F.check_model(model)
    layout = F.resolve_layout(model, layout)
    F.check_sketch(sketch, layout)
    size = F.batch_size(batch)
    chunk = F.check_chunk_size(chunk_size, size)
    if mode == "implicit":
        return _implicit(model, loss_fn, batch, sketch, layout, chunk)
    if capture is not None and (
        capture._model is not model or capture._sketch is not sketch or capture._scale != "sum"
        or capture._layout.names != layout.names or capture._layout.shapes != layout.shapes
    ):
        raise SketchConfigError(
            "`capture` must be GradientCapture(model, sketch, layout, loss_scale='sum') for this very model, "
            "sketch and layout; pass capture=None to build one per call."
        )
    auto = mode == "auto"
    if auto:
        if capture is None:  # one plan of the model's modules, reused by hooked_sketch
            capture = hook_capture(model, sketch, layout)
        # no capture: parameters no hook sees (parametrisations), so vmap over the whole model
        mode = "explicit" if capture is None else "factorized" if sketch.supports_factorized else "hooks"
    if mode == "factorized" and not sketch.supports_factorized:
        raise SketchConfigError(
            f"mode='factorized' needs a kind='per_layer' sketch, got {sketch.kind!r}; use mode='hooks' or "
            "'auto'."
        )
    if auto and capture is not None and mode in ("factorized", "hooks"):
        return _checked_hooks(model, loss_fn, batch, sketch, layout, chunk, capture)
    if mode in ("factorized", "hooks"):
        return hooked_sketch(model, loss_fn, batch, sketch, layout, chunk_size=chunk, capture=capture)
    return _explicit(model, loss_fn, batch, sketch, layout, chunk)


def hook_capture(model: nn.Module, sketch: Sketch | None, layout: ParamLayout) -> GradientCapture | None:
    """A ``GradientCapture(model, sketch, layout, loss_scale="sum")`` for the hook paths of
    :func:`sketch_gradients` (reuse it across calls: its check against autograd runs once), or None
    where no hook path covers the model (``mode="auto"`` then takes ``torch.func``)."""
    try:
        return GradientCapture(model, sketch, layout, loss_scale="sum")
    except UnsupportedModelError:
        return None


def _explicit(model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, sketch: Sketch, layout: ParamLayout,
              chunk: int) -> Tensor:
    size = F.batch_size(batch)
    parts = []
    for start in range(0, size, chunk):
        sub = F.slice_batch(batch, start, min(start + chunk, size))
        parts.append(sketch.apply(per_example_grads(model, loss_fn, sub, layout=layout)))
    return torch.cat(parts, dim=0)


def _checked_hooks(model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, sketch: Sketch, layout: ParamLayout,
                   chunk: int, capture: GradientCapture) -> Tensor:
    """``mode="auto"`` through the hooks, checked against autograd on the capture's first eval-mode
    batch (``_capture_check``); ``torch.func`` over the whole model from then on if they disagree
    or meet a tensor that is not batch-first."""
    if capture.exact is False:
        return _explicit(model, loss_fn, batch, sketch, layout, chunk)
    try:
        rows = hooked_sketch(model, loss_fn, batch, sketch, layout, chunk_size=chunk, capture=capture)
    except NotBatchFirstError as err:
        if capture.exact:
            raise
        capture.exact = False
        _warn_hooks_off(str(err))
        return _explicit(model, loss_fn, batch, sketch, layout, chunk)
    if capture.exact is None and not any(m.training for m in model.modules()):
        first = batch if chunk >= F.batch_size(batch) else F.slice_batch(batch, 0, chunk)
        err_rel = hook_error(model, loss_fn, first, sketch, layout, rows)
        if err_rel is None:  # non-finite gradients: no verdict, checked again on the next batch
            return rows
        if not err_rel <= tolerance(rows.dtype):
            capture.exact = False
            names = mismatched_parameters(model, loss_fn, first, layout)
            _warn_hooks_off(
                f"on the first {CHECKED_EXAMPLES} examples of a batch of {F.batch_size(first)} they differ "
                f"from autograd's per-example gradients by a relative error of {err_rel:.3g}"
                + (f", in {names[:8]}" if names else "")
            )
            return _explicit(model, loss_fn, batch, sketch, layout, chunk)
        capture.exact = True
    return rows


def _warn_hooks_off(why: str) -> None:
    warnings.warn(
        f"The hook paths cannot give this model's per-example gradients ({why}). Usual causes: a layer "
        "whose input is not batch-first (a sequence-first layer, or a table shared by every example such "
        "as `self.proj(self.pos_table)`), or a parameter used outside the module that registers it "
        "(`F.linear(h, self.emb.weight)` in a parent's forward; share the Parameter between modules "
        "instead). Using torch.func over the whole model (exact, slower).",
        stacklevel=3,
    )
