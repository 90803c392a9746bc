"""Which module takes which :class:`~lightning_sketch.gradients.capture.GradientCapture` path.

The per-module-type rules of the hook-based capture: a module owning selected parameters goes to a
fast-path handler (``"linear"``, ``"embedding"``, ``"conv"``, ``"hf_conv1d"``, ``"norm"``,
``"mha"``), to the recurrent-layer path (``"rnn"``: one batched recomputation, or a per-example
loop where it does not apply), to the per-module
``torch.func`` fallback, or is refused; :func:`capture_support`
reports the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_sketch.gradients import _functional as F
from lightning_sketch.layout import ParamLayout

__all__ = ["CaptureSupport", "PlanEntry", "capture_support"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

#: (module name, module, handler, {local parameter name: layout index}) of one hooked module.
PlanEntry = tuple[str, nn.Module, str, dict[str, int]]


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, int] | None:
    """Zero padding as (pad_h, pad_w) of the 2-D view, or None if unfold cannot reproduce the conv."""
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    kernel = tuple(module.kernel_size)
    dilation = tuple(module.dilation)
    padding = module.padding
    pad: tuple[int, ...]
    if isinstance(padding, str):  # "valid" or "same": the only strings the conv constructor accepts
        if padding == "valid":
            pad = (0,) * len(kernel)
        else:
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            if any(t % 2 for t in totals):
                return None
            pad = tuple(t // 2 for t in totals)
    else:
        pad = tuple(padding)
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
            through ``torch.func`` per module, or (recurrent layers) a batched recomputation of the
            module (slower; exact for modules that treat examples independently and are not random).
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
            lines.append(
                "unsupported: " + "; ".join(f"{n or '<root>'}: {r}" for n, r in self.unsupported.items())
            )
        return "\n".join(lines)

    def fallback_params(self) -> list[str]:
        """The selected parameter names that go through the per-module fallback."""
        return [p for n in self.fallback for p in self.params.get(n, [])]


def _functional_owner(module: nn.Module) -> bool:
    """A module whose parameters are consumed outside its own forward (torch parametrisations,
    :class:`~lightning_sketch.intrinsic.Subspace`)."""
    from torch.nn.utils import parametrize

    return isinstance(module, parametrize.ParametrizationList) or type(module).__name__ == "Subspace"


def _plan(model: nn.Module, layout: ParamLayout) -> tuple[CaptureSupport, list[PlanEntry]]:
    """(support, [(module name, module, handler, {local param name: layout index})])."""
    own = dict(model.named_parameters())
    index = {id(own[n]): i for i, n in enumerate(layout.names)}
    support = CaptureSupport()
    plan: list[PlanEntry] = []
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
        elif isinstance(module, nn.RNNBase):
            kind = "rnn"  # recomputed unrolled (vmap cannot batch its fused kernels): _capture_rnn
            support.fallback[name] = type(module).__name__
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
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
