"""The per-example loss protocol and its one resolver; the one train/eval-mode guard.

Everything that differentiates a loss (the callbacks, the :class:`~lightning_sketch.attribution.Attributor`
and through it the CLI) needs per-example losses ``[B]``, unreduced. They come from one of two
places, in this order (like the ``Task`` of kronfluence, Grosse et al. 2023, which asks the user
for the loss once, explicitly):

1. an explicit ``loss_fn(module, batch) -> Tensor[B]`` passed by the caller;
2. the module's own method ``per_example_loss(batch) -> Tensor[B]`` (:class:`PerExampleLoss`);
3. the module's ``training_step(batch, batch_idx)`` (a Lightning module written the ordinary way),
   replayed with the reduction of each torch loss it calls taken apart (``_step_loss``).

:func:`module_loss_fn` is the one place that chooses between them and words the error when
neither exists. TRAK-style queries use the same resolver with ``method="per_example_margin"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast, runtime_checkable

from torch import Tensor, nn

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients._step_loss import StepLoss, has_training_step

__all__ = ["LossFn", "PerExampleLoss", "eval_mode", "module_loss_fn", "train_mode"]

LossFn = Callable[[nn.Module, Any], Tensor]


@runtime_checkable
class PerExampleLoss(Protocol):
    """A module that computes its own per-example losses.

    ``per_example_loss(batch)`` takes a batch exactly as the dataloader yields it and returns the
    unreduced losses ``[B]`` (e.g. ``F.cross_entropy(logits, y, reduction="none")``); the training
    loss should be their mean. :class:`~lightning_sketch.demo.DigitsClassifier` is an example.
    """

    def per_example_loss(self, batch: Any) -> Tensor: ...


def module_loss_fn(
    module: nn.Module,
    loss_fn: LossFn | None = None,
    *,
    method: str = "per_example_loss",
    who: str = "",
    error: type[Exception] = SketchConfigError,
) -> LossFn:
    """``loss_fn`` if given, else ``lambda m, batch: m.<method>(batch)``: per-example losses through
    the module's own convention and batch structure. Without ``per_example_loss``, a module with a
    ``training_step`` gets its replay (:class:`~lightning_sketch.gradients._step_loss.StepLoss`).

    Args:
        module: the module whose method is looked up (the returned function calls it on the module
            it is given, so it also works on a copy with swapped weights).
        loss_fn: an explicit ``loss_fn(module, batch) -> Tensor[B]``; wins when given.
        method: the method name (``"per_example_loss"``, or ``"per_example_margin"`` for TRAK).
        who: a prefix naming the caller in the error (e.g. ``"HessianSpectrum "``).
        error: the class raised when neither is available (default :class:`SketchConfigError`).

    Raises:
        SketchConfigError: (or ``error``) if ``loss_fn`` is not callable, or it is None and
            ``module`` has no callable ``method``.

    Example:
        >>> import torch
        >>> class M(torch.nn.Module):
        ...     def per_example_loss(self, batch): return batch.sum(-1)
        >>> module_loss_fn(M())(M(), torch.ones(2, 3)).tolist()
        [3.0, 3.0]
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise SketchConfigError(
                f"`loss_fn` must be callable(module, batch) -> Tensor[B], got {loss_fn!r}."
            )
        return loss_fn
    own = callable(getattr(module, method, None))
    if method == "per_example_loss" and not own and has_training_step(module):
        return StepLoss(who, error)
    if not own:
        raise error(
            f"{who}needs per-example losses: {type(module).__name__} has no `{method}(batch) -> Tensor[B]` "
            "method; add one (unreduced, e.g. F.cross_entropy(..., reduction='none')) or pass "
            "`loss_fn(module, batch)`."
        )
    if method == "per_example_loss":
        return _per_example_loss
    return lambda m, batch: getattr(m, method)(batch)


def _per_example_loss(module: nn.Module, batch: Any) -> Tensor:
    # module_loss_fn returns this only for a module with a callable `per_example_loss`.
    return cast(PerExampleLoss, module).per_example_loss(batch)


@contextmanager
def train_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Set ``module.train(training)`` inside the block, then restore every submodule's own mode.

    Restoring per submodule (not ``module.train(was_training)``) keeps, e.g., a frozen BatchNorm in
    eval mode inside a model that trains: the callbacks never change a module's mode.
    """
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def eval_mode(module: nn.Module) -> Any:
    """:func:`train_mode` with ``training=False`` (dropout off), restoring every submodule's mode."""
    return train_mode(module, False)
