"""The hook paths checked against plain autograd, once per capture, on the first batch they serve.

The hook paths of :mod:`~lightning_sketch.gradients.capture` read layer inputs and output
gradients and assume every hooked tensor is batch-first with one row per example. A model can
break that without any module the plan could flag: a sequence-first layer (``[T, B, C]``), or a
table shared by the batch (``self.proj(self.table)``, ``[T, C]``, added to ``[B, T, C]``), whose
leading dimension happens to equal B. The rows are then wrong with no error. So the first time a
capture serves :func:`~lightning_sketch.gradients.sketch_gradients` in eval mode, two of its rows
are compared with ``torch.autograd.grad`` of those two examples' losses on the same forward (the
exact per-example gradient, whatever the model does inside), sketched by the same Φ.

A parameter used outside the module that registers it (``F.linear(h, self.emb.weight)`` in a
parent's forward) is caught the same way: its hooked rows miss that use.

The reference costs one forward and two backward passes of that chunk, once per capture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients.capture import hooked_sketch
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch

__all__ = ["CHECKED_EXAMPLES", "hook_error", "mismatched_parameters", "tolerance"]

#: Largest [B, N] per-example gradient (bytes) formed to name the parameters the hooks get wrong.
_NAMING_BYTES = 256 * 2**20

#: Rows compared with autograd on a capture's first eval-mode batch.
CHECKED_EXAMPLES = 2


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of hooked rows that still counts as rounding: 1e-2 for float32/64
    (GPU TF32 convolutions reach about 1e-3), 1e-1 for float16/bfloat16. A wrong path is off by
    O(1) (a shared table's gradient summed over the batch)."""
    return 1e-1 if dtype in (torch.float16, torch.bfloat16) else 1e-2


def _exact_rows(model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, layout: ParamLayout) -> Tensor:
    """``[n, N]``: ∇θ ℓ_b of the first n = min(2, B) examples by ``torch.autograd.grad`` of
    ``losses[b]`` alone, the losses computed on the whole ``batch`` (so a layer whose leading
    dimension equals B only by coincidence sees the same shapes as under the hooks)."""
    size = F.batch_size(batch)
    n = min(CHECKED_EXAMPLES, size)
    own = dict(model.named_parameters())
    params = [own[name] for name in layout.names]
    with torch.enable_grad():
        losses = F.check_losses(loss_fn(model, batch), size)
        flat = []
        for b in range(n):
            grads = torch.autograd.grad(losses[b], params, retain_graph=b + 1 < n, allow_unused=True)
            flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for p, g in zip(params, grads)]))
    return torch.stack(flat).detach()


def _relative_error(got: Tensor, want: Tensor) -> float | None:
    """‖got − want‖ / max(‖got‖, ‖want‖) in float64; 0.0 when both are zero, None (no verdict)
    when either holds NaN or inf."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        return None
    scale = max(float(want.norm()), float(got.norm()))
    return 0.0 if scale == 0.0 else float((got - want).norm()) / scale


def hook_error(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    sketch: Sketch | None,
    layout: ParamLayout,
    rows: Tensor,
) -> float | None:
    """Relative Frobenius error of ``rows[:n]`` (hooked, ``[B, D]`` or ``[B, N]``) against the
    exact sketched per-example gradients Φ ∇θ ℓ_b of the first n = min(2, B) examples of ``batch``
    (:func:`_exact_rows`). Call it in eval mode: train-mode dropout draws other masks. None (no
    verdict) when either side holds NaN or inf (non-finite inputs or losses).
    """
    ref = _exact_rows(model, loss_fn, batch, layout).to(rows.dtype)
    if sketch is not None:
        ref = sketch.apply(ref)
    return _relative_error(rows[: ref.shape[0]], ref)


def mismatched_parameters(
    model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, layout: ParamLayout
) -> list[str] | None:
    """The parameters whose hooked per-example gradients (unsketched) differ from autograd's on the
    first examples of ``batch``, for the warning; None when ``[B, N]`` would exceed 256 MiB."""
    if F.batch_size(batch) * layout.dim * 4 > _NAMING_BYTES:
        return None
    rows = hooked_sketch(model, loss_fn, batch, None, layout)
    want = _exact_rows(model, loss_fn, batch, layout)
    bad = []
    for name, off, numel in zip(layout.names, layout.offsets, layout.numels):
        err = _relative_error(rows[: want.shape[0], off : off + numel], want[:, off : off + numel])
        if err is not None and err > tolerance(rows.dtype):
            bad.append(name)
    return bad
