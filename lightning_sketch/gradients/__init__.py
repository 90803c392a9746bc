"""Per-example gradients, sketched gradients and (sketched) Hessian-vector products.

arXiv 2402.03994, eqs. 4-5 and 10, Listings 6-7.

Pure PyTorch (``torch.func``); no Lightning import. ``loss_fn(module, batch) -> Tensor[B]``
returns per-example losses everywhere; the model is flattened by a :class:`ParamLayout`.
"""

from __future__ import annotations

from lightning_sketch.gradients.capture import CaptureSupport, GradientCapture, capture_support
from lightning_sketch.gradients.hvp import HVPOperator, hvp, loss_grad, make_hvp, sketched_hvp
from lightning_sketch.gradients.loss import PerExampleLoss, eval_mode, module_loss_fn, train_mode
from lightning_sketch.gradients.per_example import finite_mask, per_example_grads, sketch_gradients
from lightning_sketch.layout import ParamLayout

__all__ = [
    "CaptureSupport",
    "GradientCapture",
    "HVPOperator",
    "ParamLayout",
    "PerExampleLoss",
    "capture_support",
    "eval_mode",
    "finite_mask",
    "hvp",
    "loss_grad",
    "make_hvp",
    "module_loss_fn",
    "per_example_grads",
    "sketch_gradients",
    "sketched_hvp",
    "train_mode",
]
