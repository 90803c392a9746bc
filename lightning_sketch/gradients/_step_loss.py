"""Per-example losses of a module that has no ``per_example_loss``: its own ``training_step``
replayed with the reduction of every torch loss it calls taken apart.

A Lightning module written the ordinary way computes ``F.cross_entropy(self(x), y)`` (or calls an
``nn.*Loss`` module, which calls the same function) inside ``training_step`` and returns the batch
mean. Replaying that ``training_step`` under a ``TorchFunctionMode`` that sees each call of a torch
loss function gives, for each call j, the unreduced losses L_j (the same function with
``reduction="none"``) and the value s_j torch would have returned. The per-example loss is

    ℓ_b = Σ_j c_j · ν_j · Σ_{i ∈ b} L_{j,i},

where i runs over the elements of example b (L_j is ``[B, ...]``, or ``[B·k, ...]`` flattened
batch-major, as ``logits.view(-1, V)`` is), c_j = ∂S/∂s_j is the weight of that loss in the returned
loss S (1 for ``return loss``; the coefficients of ``ce + 0.5 * aux``), and ν_j is a normaliser that
depends on the call's kind and shapes only, never on which examples share the batch:

- ``cross_entropy`` / ``nll_loss`` with a mean: ν = 1/w̄ (w̄ the mean class weight, 1 without
  ``weight``), so a token-level loss gives each sequence the sum of its token losses, −log p of its
  labels (positions at ``ignore_index`` add 0);
- any other mean: ν = 1/k, the mean over the example's own k elements;
- a sum (and ``kl_div``'s ``batchmean``): ν = 1.

Unreduced losses (``reduction="none"``) multiplied or divided by constants of the batch (sample
weights, a padding mask) and then reduced by a plain ``.mean()``/``.sum()`` count as one call whose
elements are the products: ``(F.cross_entropy(z, y, reduction="none") * w).mean()`` gives
ℓ_b = w_b · CE_b, ``(tokens * mask).sum() / mask.sum()`` the sum of the sequence's unmasked tokens.
A factor common to every call (``loss / n``, ``/ mask.sum()``) is a factor of the batch: only the
calls' relative weights c_j / max_j |c_j| are kept.

So an example's ℓ_b, and hence its stored row, is the same whatever batch it is in. Torch's own
reduction divides by a quantity of the whole batch when classes are weighted (Σ of the targets'
weights) or targets are ignored (the count of the others), and multiplies by B for a sum; the training
loss is then mean_b ℓ_b times a positive factor of the batch, which no per-example definition can
reproduce without making one example's row depend on the others. For a plain mean over one element
per example (``F.cross_entropy(logits, y)``, ``F.mse_loss(pred, y)``), mean_b ℓ_b is the training
loss exactly, with its gradient.

Nothing of the replay reaches training: ``self.log``/``self.log_dict`` and every metric's
``update``/``forward`` (torchmetrics: objects with ``_defaults`` and ``update``) are no-ops during
it, and the callers run it in eval mode with the RNG forked. Manual optimisation (the step would
call ``optimizer.step()``) is refused, and so is a ``training_step`` that calls no torch loss: both
need ``per_example_loss``.
"""

from __future__ import annotations

import inspect
import math
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
_SCALERS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.div, Tensor.div, Tensor.__truediv__)
#: losses over class targets: their mean divides by the targets' weights (or the count of targets not
#: ignored), so their per-example loss is the example's sum over its positions (divided by w̄).
_CLASS_LOSSES = ("cross_entropy", "nll_loss")


def has_training_step(module: nn.Module) -> bool:
    """Whether ``module`` has a callable ``training_step`` (a Lightning module, by duck typing)."""
    return callable(getattr(module, "training_step", None))


class _Call:
    """One loss call: per-example values v ``[B]`` (ν · Σ over the example's elements) and the scalar
    s handed back to the ``training_step``: torch's own reduced value, as a node of v's graph
    (``mean(v)`` times a constant), so that S = f(s) is what the step computes and ∂S/∂s is c_j."""

    def __init__(self, name: str, per: Tensor, reduced: Tensor) -> None:
        self.name, self.per = name, per
        mean = per.mean()
        ratio = torch.where(mean != 0, reduced / torch.where(mean != 0, mean, 1), 1).detach()
        self.scalar = mean * ratio


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
        if func in _SCALERS and len(args) == 2 and not kwargs:
            return self._scaled(func, args)
        if func in _REDUCERS and args and id(args[0]) in self._unreduced and len(args) == 1 and not kwargs:
            name, full = self._unreduced.pop(id(args[0]))  # `F.*(..., reduction="none").mean()`
            if full is args[0]:
                total = full.sum()
                if func in (torch.sum, Tensor.sum):
                    return self._record(name, full, total, per_element=False)
                return self._record(name, full, total / max(full.numel(), 1),
                                    per_element=name not in _CLASS_LOSSES)
        return func(*args, **kwargs)

    def _scaled(self, func: Any, args: tuple[Any, ...]) -> Any:
        """``L * w`` or ``L / w`` of unreduced losses L by constants (sample weights, a mask): still
        unreduced losses, reduced later by a plain ``.mean()``/``.sum()``."""
        out = func(*args)
        a, b = args
        for i, (loss, other) in enumerate(((a, b), (b, a))):
            if i == 1 and func in (torch.div, Tensor.div, Tensor.__truediv__):
                break  # w / L is no weighting of L
            entry = self._unreduced.get(id(loss))
            if entry is None or entry[1] is not loss:
                continue
            if not isinstance(out, Tensor) or out.shape != loss.shape:
                continue
            if isinstance(other, Tensor) and other.requires_grad:
                continue  # learned weights: part of the model, not of the reduction
            self._unreduced[id(out)] = (entry[0], out)
            break
        return out

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
        if reduction != "mean":  # "sum", and kl_div's "batchmean" (the sum over examples / B)
            return self._record(func.__name__, elements, full, per_element=False)
        if func.__name__ in _CLASS_LOSSES:
            weight = bound.arguments.get("weight")
            w_bar = weight.detach().mean() if isinstance(weight, Tensor) and weight.numel() else None
            return self._record(func.__name__, elements, full, per_element=False, w_bar=w_bar)
        return self._record(func.__name__, elements, full, per_element=True)

    def _record(self, name: str, elements: Tensor, reduced: Tensor, *, per_element: bool,
                w_bar: Tensor | None = None) -> Tensor:
        """Record a call: ℓ_{j,b} = ν · Σ_{i ∈ b} L_{j,i} with ν = 1/k (``per_element``), 1/w̄ or 1."""
        B = self.size
        if elements.ndim == 0 or elements.shape[0] % B:
            self.problems.append(f"{name} over {tuple(elements.shape)} elements for a batch of {B}")
            return reduced
        per = elements.reshape(B, -1).sum(1)
        if per_element:
            per = per / max(elements.numel() // B, 1)
        elif w_bar is not None and bool(w_bar > 0):
            per = per / w_bar
        call = _Call(name, per, reduced)
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


def _relative(weights: list[float]) -> list[float]:
    """c_j / max_j |c_j|: a factor common to every call (``loss / n``, ``loss / mask.sum()``) is a factor
    of the batch, so only the calls' relative weights are kept and an example's loss is the same in any
    batch. A non-finite c_j (a batch whose whole weight is 0, ``0 / 0``) counts as ±1 times the largest."""
    finite = [abs(w) for w in weights if math.isfinite(w)]
    top = max(finite, default=0.0) or 1.0
    return [w / top if math.isfinite(w) else (0.0 if math.isnan(w) else math.copysign(1.0, w))
            for w in weights]


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
            per = sum((w * c.per for w, c in zip(_relative(self._call_weights(loss, calls)), calls)),
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
