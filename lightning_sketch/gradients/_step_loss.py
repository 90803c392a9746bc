"""Per-example losses of a module that has no ``per_example_loss``: its own ``training_step``
replayed with the reduction of every torch loss it calls taken apart.

A Lightning module written the ordinary way computes ``F.cross_entropy(self(x), y)`` (or calls an
``nn.*Loss`` module, which calls the same function) inside ``training_step`` and returns the batch
mean. Replaying that ``training_step`` under a ``TorchFunctionMode`` that sees each call of a torch
loss function gives, for each call j, the unreduced losses L_j (the same function with
``reduction="none"``) and the value s_j torch would have returned. The per-example loss is defined
so that its batch mean is the training loss, with the training loss's gradient:

    ℓ_b = Σ_j c_j · B · κ_j · Σ_{i ∈ b} L_{j,i},      κ_j = s_j / Σ_i L_{j,i}  (held constant),

where i runs over the elements of example b (L_j is ``[B, ...]``, or ``[B·k, ...]`` flattened
batch-major, as ``logits.view(-1, V)`` is), κ_j is the reduction's normaliser (1/B for a mean over
examples, 1/#tokens not ignored for a token mean, 1 for a sum; constant in the parameters) and
c_j = ∂S/∂s_j is the weight of that loss in the returned loss S (1 for ``return loss``; the
coefficients of ``ce + 0.5 * aux``). Summed or averaged over tokens, weighted, label-smoothed:
whatever the call computes, mean_b ℓ_b = Σ_j c_j s_j and their gradients agree.

Nothing of the replay reaches training: ``self.log``/``self.log_dict`` and every metric's
``update``/``forward`` (torchmetrics: objects with ``_defaults`` and ``update``) are no-ops during
it, and the callers run it in eval mode with the RNG forked. Manual optimisation (the step would
call ``optimizer.step()``) is refused, and so is a ``training_step`` that calls no torch loss: both
need ``per_example_loss``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_sketch.exceptions import SketchConfigError, SketchInputError
from lightning_sketch.gradients._batch import batch_size

__all__ = ["LOSS_FUNCTIONS", "StepLoss", "has_training_step"]

#: The torch losses whose reduction is taken apart (``nn.*Loss`` modules call these).
LOSS_FUNCTIONS: tuple[Callable[..., Tensor], ...] = (
    F.cross_entropy, F.nll_loss, F.binary_cross_entropy_with_logits, F.binary_cross_entropy,
    F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.poisson_nll_loss, F.gaussian_nll_loss,
    F.kl_div, F.soft_margin_loss, F.multilabel_soft_margin_loss, F.multi_margin_loss,
)
_SIGNATURES = {f: inspect.signature(f) for f in LOSS_FUNCTIONS}
_REDUCERS = (torch.mean, torch.sum, Tensor.mean, Tensor.sum)


def has_training_step(module: nn.Module) -> bool:
    """Whether ``module`` has a callable ``training_step`` (a Lightning module, by duck typing)."""
    return callable(getattr(module, "training_step", None))


class _Call:
    """One loss call: per-example values v ``[B]`` (Σ over the example's elements, times B·κ) and
    the scalar s handed back to the ``training_step`` (mean of v, so S's graph runs through v)."""

    def __init__(self, name: str, per: Tensor) -> None:
        self.name, self.per = name, per
        self.scalar = per.mean()


class _Intercept(TorchFunctionMode):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.calls: list[_Call] = []
        self.problems: list[str] = []
        self._unreduced: dict[int, tuple[str, Tensor]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        sig = _SIGNATURES.get(func)
        if sig is not None:
            return self._loss(func, sig, args, kwargs)
        if func in _REDUCERS and args and id(args[0]) in self._unreduced and len(args) == 1 and not kwargs:
            name, full = self._unreduced.pop(id(args[0]))  # `F.*(..., reduction="none").mean()`
            if full is args[0]:
                scale = 1.0 if func in (torch.sum, Tensor.sum) else 1.0 / max(full.numel(), 1)
                return self._record(name, full, full.sum() * scale)
        return func(*args, **kwargs)

    def _loss(self, func: Any, sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        reduction = bound.arguments.get("reduction", "mean")
        if bound.arguments.get("size_average") is not None or bound.arguments.get("reduce") is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(bound.arguments.get("size_average"),
                                                     bound.arguments.get("reduce"))
            bound.arguments["size_average"] = bound.arguments["reduce"] = None
        full = func(*args, **kwargs)
        if reduction == "none":
            self._unreduced[id(full)] = (func.__name__, full)
            return full
        bound.arguments["reduction"] = "none"
        elements = func(*bound.args, **bound.kwargs)
        return self._record(func.__name__, elements, full)

    def _record(self, name: str, elements: Tensor, reduced: Tensor) -> Tensor:
        B = self.size
        if elements.ndim == 0 or elements.shape[0] % B:
            self.problems.append(f"{name} over {tuple(elements.shape)} elements for a batch of {B}")
            return reduced
        total = elements.sum()
        kappa = torch.where(total != 0, reduced / torch.where(total != 0, total, 1), 0).detach()
        per = elements.reshape(B, -1).sum(1) * (kappa * B)
        call = _Call(name, per)
        self.calls.append(call)
        return call.scalar


@contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """``log``/``log_dict`` of the module and ``update``/``forward`` of its metrics as no-ops."""
    missing = object()
    shadowed: list[tuple[Any, str, Any]] = []

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    targets: list[tuple[Any, tuple[str, ...]]] = [(module, ("log", "log_dict"))]
    # torchmetrics keeps a wrapped `update` on the instance: shadowed and put back like the rest
    targets += [(m, ("update", "forward")) for m in module.modules()
                if hasattr(m, "_defaults") and callable(getattr(m, "update", None))]
    try:
        for obj, names in targets:
            for name in names:
                shadowed.append((obj, name, vars(obj).get(name, missing)))
                object.__setattr__(obj, name, noop)
        yield
    finally:
        for obj, name, old in reversed(shadowed):
            if old is missing:
                object.__delattr__(obj, name)
            else:
                object.__setattr__(obj, name, old)


def _batch_idx(step: Callable[..., Any]) -> tuple[int, ...]:
    """``(0,)`` when ``training_step`` takes a ``batch_idx`` (as Lightning passes it only then)."""
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return (0,)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return (0,)
    return ()


class StepLoss:
    """``loss_fn(module, batch) -> Tensor[B]`` replaying ``module.training_step(batch, 0)``.

    See the module docstring for the definition of ℓ_b. The weights c_j of several loss calls are
    read by autograd from the returned loss; under a ``torch.func`` transform (where that cannot
    run) the weights of the last plain call are reused.

    Raises:
        SketchConfigError: (or ``error``) if the module uses manual optimisation, its
            ``training_step`` fails on the batch, calls no torch loss, returns no loss, or a loss's
            elements do not split into the batch's examples.
    """

    def __init__(self, who: str = "", error: type[Exception] = SketchConfigError) -> None:
        self.who, self.error = who, error
        self._weights: list[float] | None = None

    def _refuse(self, name: str, why: str) -> Exception:
        return self.error(
            f"{self.who}needs per-example losses: {name} has no `per_example_loss(batch) -> Tensor[B]` "
            f"and {why}. Add `per_example_loss` (unreduced, e.g. F.cross_entropy(..., reduction='none')) "
            "or pass `loss_fn(module, batch)`."
        )

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        name = type(module).__name__
        if not bool(getattr(module, "automatic_optimization", True)):
            raise self._refuse(name, "it uses manual optimisation, so its training_step cannot be replayed "
                                     "(it would step the optimiser)")
        size = batch_size(batch)
        mode = _Intercept(size)
        grad = torch.is_grad_enabled()
        try:
            with _quiet(module), torch.enable_grad(), mode:
                step = cast(Callable[..., Any], module.training_step)  # has_training_step checked it
                out = step(batch, *_batch_idx(step))
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RuntimeError) as err:
            if isinstance(err, self.error) or type(err).__module__.startswith("lightning_sketch"):
                raise
            raise self._refuse(name, f"its training_step failed when replayed on the batch "
                                     f"({type(err).__name__}: {str(err)[:200]})") from err
        loss = out.get("loss") if isinstance(out, dict) else out
        calls = mode.calls
        if mode.problems or not calls or not isinstance(loss, Tensor):
            unreduced = sorted({name for name, _ in mode._unreduced.values()})
            why = (f"the elements of {mode.problems[0]} do not split into examples" if mode.problems
                   else "its training_step returned no loss tensor" if calls
                   else f"its training_step reduces {unreduced} (reduction='none') itself, other than by a "
                        "plain .mean() or .sum() (e.g. with a mask or weights)" if unreduced
                   else "its training_step calls none of torch's loss functions (F.cross_entropy, "
                        "F.mse_loss, nn.*Loss, ...)")
            raise self._refuse(name, why)
        if len(calls) == 1 and loss is calls[0].scalar:
            per = calls[0].per
        else:
            per = sum((w * c.per for w, c in zip(self._call_weights(loss, calls), calls)),
                      torch.zeros_like(calls[0].per))
        if per.shape != (size,):
            raise SketchInputError(
                f"{self.who}replayed per-example losses have shape {tuple(per.shape)}, not [{size}]."
            )
        return per if grad else per.detach()

    def _call_weights(self, loss: Tensor, calls: list[_Call]) -> list[float]:
        """c_j = ∂S/∂s_j (0 for a loss S does not use)."""
        try:
            grads = torch.autograd.grad(loss, [c.scalar for c in calls], retain_graph=True,
                                        allow_unused=True)
        except RuntimeError:
            if self._weights is None or len(self._weights) != len(calls):
                raise
            return self._weights
        self._weights = [0.0 if g is None else float(g) for g in grads]
        return self._weights
