"""What attribution differentiates: the task protocol, and the recognition of the common cases.

Every attribution method needs three per-example functions of a batch (in the spirit of the ``Task``
of Kronfluence, Grosse et al. 2023, where the user states them once):

- the **training loss** ℓ(x) ``[B]``, unreduced: the stored rows are g = Φ∇ℓ;
- the **query measurement** f(z) ``[B]`` whose change is attributed: scores are
  q(z)ᵀ M g(x) with q = Φ∇(−f), so a positive score means that training on x *raised* f(z);
- the **kernel** K = E Σ_t φ_t φ_tᵀ of the curvature-weighted inverse M = (K + λI)⁻¹ of ``trak``:
  φ_t = Φ∇k_t for one or several per-example functions k (the Gauss–Newton / TRAK kernel of the
  model's output; Park et al. 2023, §3; Martens 2020, §9).

:class:`AttributionTask` holds the three and a sentence saying why they were chosen. Users with an
unusual model subclass it (or pass ``loss_fn``/``per_example_margin``/``sample_labels``);
:func:`resolve_task` recognises, with no user code, from the module's own ``per_example_loss`` on one
batch:

- ``classification``: an output ``[B, C]`` (C ≥ 2) whose cross-entropy against integer targets
  ``[B]`` is the loss. Measurement: TRAK's margin m = log p_y − log(1 − p_y); kernel: of ∇m.
- ``binary``: an output ``[B]`` or ``[B, 1]`` whose BCE-with-logits against 0/1 targets is the loss.
  Measurement: the signed logit (2y − 1)·z, which is m again; kernel: of ∇z.
- ``regression``: a float output of the targets' shape whose squared error (times a constant) is the
  loss. Measurement: −ℓ (the query's negative error); kernel: the Gauss–Newton Σ_o ∇f_o∇f_oᵀ.
- ``language_model``: logits ``[B, L, V]`` whose token cross-entropy against ``labels`` ``[B, L]``
  (−100 ignored; shifted by one as in Hugging Face, or not; summed or averaged over tokens) is the
  loss. Measurement: the log-probability of the completion (−ℓ); kernel: the softmax Gauss–Newton,
  from S completions drawn from the model per example (E_ŷ[ĝĝᵀ] = Σ_positions Jᵀ(diag p − ppᵀ)J).

Losses with options or weights are recognised by moving the candidate output z by three fixed
δ (a forward hook replaces it) and fitting the loss per example, at z and each z + δ, as a
non-negative multiple of the plain loss; one equation more than unknowns per example checks the fit,
so a one-example query batch is recognised too:

- ``classification``: a·CE + b·U with U = −mean_c log p_c (``weight=``, sample weights,
  ``label_smoothing=``); ``binary``: a·BCE-with-logits (``pos_weight=``, sample weights).
- ``multilabel``: a·Σ_k BCE-with-logits(z_k, y_k) for an output ``[B, K]`` (K ≥ 2) and float 0/1
  targets of its shape (summed or averaged over labels). Measurement: −ℓ; kernel: Σ_k ∇z_k∇z_kᵀ,
  the binary margin kernel of every label (exact for K ≤ 8, else Rademacher combinations).
- ``regression``: a·Σ_o ρ(f_o, y_o) for ρ the squared error, the L1 error, the Huber loss with δ = 1
  (the smooth-L1 with β = 1) or the Poisson NLL of a log-rate. Kernel: Σ_o ∇f_o∇f_oᵀ, as above.

Losses of another kind (a focal loss, a Gaussian likelihood with a predicted variance, Huber with
δ ≠ 1, logits divided by a temperature inside the loss) fall back to the empirical Fisher.

The output is found wherever the loss computes it: every submodule's output during one call of
``per_example_loss`` is a candidate (the model needs no ``forward`` of its own), and the last one
that passes a check wins. The targets are ``batch["y"]`` (or ``"labels"``, ``"label"``, ``"target"``,
``"targets"``) or a tuple's second item, then every other tensor of the batch but ``"index"`` (a
tuple ``(x, mask, y)``, a key of another name, an autoencoder's input); the task reads the entry
that passed. Module methods take precedence: ``per_example_margin(batch)`` (a custom
margin; kernel of its gradients), then ``sample_labels(batch, generator) -> batch`` (a custom
likelihood; sampled Fisher). When nothing applies the kernel is the empirical Fisher of the
stored loss gradients, and :attr:`AttributionTask.reason` says what to add.

Why the Gauss–Newton of the *output* (not the empirical Fisher GᵀG of the stored rows): the loss
gradient is g = ℓ'(f)∇f, so GᵀG weights each example by its squared residual ℓ'(f)² and late in
training is dominated by the few unfitted examples (Kunstner et al. 2019); the kernel of ∇f (or of
∇m for classifiers, whose g = −(1 − p)∇m) weights every example alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sketch._checks import positive_int
from lightning_sketch.attribution.scores import classification_margin
from lightning_sketch.exceptions import SketchConfigError, SketchInputError

__all__ = [
    "TASK_KINDS",
    "AttributionTask",
    "LossFn",
    "resolve_task",
]

LossFn = Callable[[nn.Module, Any], Tensor]
#: a per-example function, the batch it is evaluated on and its weight w: K += w·Σ_t φ_tφ_tᵀ with
#: φ_t = Φ∇ fn(module, batch)_t.
KernelTerm = tuple[LossFn, Any, float]

#: the kinds :func:`resolve_task` recognises (``"custom"``: module methods; ``"empirical"``: none).
TASK_KINDS = ("classification", "binary", "multilabel", "regression", "language_model", "custom", "empirical")
#: sampled kernel terms per example for sampled Gauss–Newton kernels (language models,
#: ``sample_labels``): the relative error of the sampled kernel falls as 1/√S (benchmarks/RESULTS.md,
#: "Language-model kernel: sampled completions").
DEFAULT_KERNEL_SAMPLES = 4
#: at most this many outputs get one exact Gauss–Newton term each (multi-output regression);
#: more are estimated with ``DEFAULT_KERNEL_SAMPLES`` Rademacher combinations.
_MAX_EXACT_OUTPUTS = 8
_TARGET_KEYS = ("y", "labels", "label", "target", "targets")
_RTOL, _ATOL = 1e-4, 1e-5


@dataclass
class AttributionTask:
    """The per-example functions attribution differentiates (see the module docstring).

    Args:
        kind: one of :data:`TASK_KINDS` (informational; the functions decide the maths).
        loss: ``loss(module, batch) -> [B]``, the training loss whose sketched gradients are stored.
        query_loss: ``(module, batch) -> [B]``, minus the query measurement (q = Φ∇ query_loss).
        kernel_terms: ``(module, batch, generator) -> [(fn, batch', w), ...]``: K gathers
            w·Σ_t φ_tφ_tᵀ with φ = Φ∇fn on batch' for each term (w = 1/S for S samples of an
            expectation, 1 for exact terms); ``None``: the empirical Fisher (the stored rows).
        kernel: the estimator name recorded with each slice's kernel (``"margin-logits"``,
            ``"margin"``, ``"gauss-newton"``, ``"sampled"``, ``"empirical"``).
        reason: one sentence saying what was recognised, or what to add for a better kernel.

    Example:
        >>> class Reg(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.net = nn.Linear(3, 1)
        ...     def per_example_loss(self, b): return (self.net(b["x"]).squeeze(-1) - b["y"]) ** 2
        >>> m, b = Reg(), {"x": torch.randn(4, 3), "y": torch.randn(4)}
        >>> task = resolve_task(m, b)
        >>> task.kind, task.kernel
        ('regression', 'gauss-newton')
        >>> [(fn(m, bb).shape, w) for fn, bb, w in task.kernel_terms(m, b, torch.Generator())]
        [(torch.Size([4]), 1.0)]
    """

    kind: str
    loss: LossFn
    query_loss: LossFn
    kernel_terms: Callable[[nn.Module, Any, torch.Generator], list[KernelTerm]] | None
    kernel: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    #: the sampled-label Fisher's kernel terms, where the task can draw labels (``as_fisher``).
    fisher_terms: Callable[[nn.Module, Any, torch.Generator], list[KernelTerm]] | None = None

    def describe(self) -> str:
        """One line for logs and reports: the task, its kernel and why."""
        return f"task {self.kind!r}, kernel {self.kernel!r}: {self.reason}"

    def as_fisher(self) -> AttributionTask:
        """The same task with the Fisher of labels sampled from the model as its kernel (queries then
        measure −loss); unchanged where the kernel already is a Fisher or no labels can be drawn."""
        if self.fisher_terms is None:
            return self
        return replace(self, kernel_terms=self.fisher_terms, fisher_terms=None, kernel="sampled",
                       query_loss=self.loss, reason=self.reason + "; the kernel is the sampled-label Fisher")


# ---------------------------------------------------------------------------- batch access
def _target(batch: Any) -> tuple[Any, Tensor] | None:
    """``(key, targets)`` of a mapping (first of :data:`_TARGET_KEYS`) or ``(1, batch[1])`` of a tuple."""
    if isinstance(batch, Mapping):
        for k in _TARGET_KEYS:
            if isinstance(batch.get(k), Tensor):
                return k, batch[k]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return 1, batch[1]
    return None


def _at(batch: Any, key: Any) -> Tensor:
    """``batch[key]``: the targets a recognised task reads (a dict key or a tuple index)."""
    value = batch[key]
    if not isinstance(value, Tensor):
        raise SketchInputError(
            f"The batch's targets batch[{key!r}] must be a Tensor, got {type(value).__name__}."
        )
    return value


def _class_targets(y: Tensor) -> Tensor:
    """Integer targets stored as a column ``[B, 1]`` (squeezed by the loss) as ``[B]``; others unchanged."""
    if y.ndim == 2 and y.shape[1] == 1 and not y.is_floating_point():
        return y.reshape(y.shape[0])
    return y


def _with_target(batch: Any, key: Any, value: Tensor) -> Any:
    if isinstance(batch, Mapping):
        return {**batch, key: value}
    items = list(batch)
    items[key] = value
    return type(batch)(items) if isinstance(batch, tuple) else items


def _as_output(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    logits = getattr(obj, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(obj, Mapping) and isinstance(obj.get("logits"), Tensor):
        return obj["logits"]
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


@dataclass(frozen=True)
class _Tap:
    """The ``call``-th output of submodule ``name`` ('' = the module itself) during one loss call."""

    name: str
    call: int

    def __call__(self, loss_fn: LossFn, module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """``(output, loss)``: runs ``loss_fn`` once, capturing the output through a forward hook."""
        box: list[Any] = []
        sub = module.get_submodule(self.name) if self.name else module
        handle = sub.register_forward_hook(lambda m, i, o: box.append(o))
        try:
            loss = loss_fn(module, batch)
        finally:
            handle.remove()
        if len(box) <= self.call or _as_output(box[self.call]) is None:
            raise SketchConfigError(
                f"The output of {self.name or 'the model'!r} recognised at setup was not computed by "
                "this batch's loss; pass an explicit `task=` (lightning_sketch.attribution.AttributionTask)."
            )
        out = _as_output(box[self.call])
        assert out is not None
        return out, loss


@dataclass(frozen=True)
class _LogitsTap:
    """The module's own ``per_example_logits(batch) -> [B, C]`` as the classifier's output."""

    name: str = "per_example_logits"
    call: int = 0

    def __call__(self, loss_fn: LossFn, module: nn.Module, batch: Any) -> tuple[Tensor, None]:
        out = module.per_example_logits(batch)  # type: ignore[operator]
        if not isinstance(out, Tensor):
            raise SketchConfigError(
                "per_example_logits(batch) must return the logits [B, C] as a Tensor, got "
                f"{type(out).__name__}."
            )
        return out, None


def _candidates(module: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[list[tuple[_Tap, Tensor]], Tensor]:
    """Every submodule output computed by one ``loss_fn`` call, latest first, and the losses ``[B]``."""
    seen: list[tuple[str, Any]] = []
    handles = []
    for name, sub in module.named_modules():
        handles.append(sub.register_forward_hook(lambda m, i, o, _n=name: seen.append((_n, o))))
    try:
        with torch.no_grad():
            loss = loss_fn(module, batch)
    finally:
        for h in handles:
            h.remove()
    calls: dict[str, int] = {}
    out: list[tuple[_Tap, Tensor]] = []
    for name, obj in seen:
        idx = calls.get(name, 0)
        calls[name] = idx + 1
        t = _as_output(obj)
        if t is not None and t.is_floating_point() and t.ndim >= 1:  # not a loss module's scalar
            out.append((_Tap(name, idx), t.detach()))
    return out[::-1], loss.detach()


def _shifted(obj: Any, delta: Tensor) -> Any:
    """``obj`` with its output tensor (as :func:`_as_output` reads it) moved by ``delta``; None if unknown."""
    if isinstance(obj, Tensor):
        return obj + delta.to(obj.dtype)
    if isinstance(obj, Mapping) and isinstance(obj.get("logits"), Tensor):
        return {**obj, "logits": obj["logits"] + delta.to(obj["logits"].dtype)}
    if isinstance(obj, tuple) and obj and isinstance(obj[0], Tensor) and type(obj) is tuple:
        return (obj[0] + delta.to(obj[0].dtype), *obj[1:])
    return None


def _loss_at(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, delta: Tensor) -> Tensor | None:
    """The losses ``[B]`` with the tapped output moved by ``delta`` (a forward hook replaces it), or
    None when the output's container cannot be rebuilt or the loss fails on the moved output."""
    sub = module.get_submodule(tap.name) if tap.name else module
    seen = [0]
    failed = [False]

    def hook(m: nn.Module, i: Any, o: Any) -> Any:
        seen[0] += 1
        if seen[0] - 1 != tap.call:
            return None
        moved = _shifted(o, delta)
        if moved is None:
            failed[0] = True
            return None
        return moved

    handle = sub.register_forward_hook(hook)
    try:
        with torch.no_grad():
            loss = loss_fn(module, batch)
    except Exception:  # a loss that cannot take the moved output: not this convention
        return None
    finally:
        handle.remove()
    if failed[0] or seen[0] <= tap.call or not isinstance(loss, Tensor):
        return None
    return loss.detach().reshape(-1)


def _probe_deltas(out: Tensor) -> list[Tensor]:
    """Two fixed, generic moves of the output (deterministic: no RNG stream is touched)."""
    n = out.numel()
    base = torch.arange(n, dtype=torch.float64).reshape(out.shape)
    moves = [0.3 * torch.sin(1.7 * base + 0.4), 0.25 * torch.cos(2.3 * base + 1.1)]
    return [m.to(out.device) for m in moves]


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=_RTOL, atol=_ATOL))


# ---------------------------------------------------------------------------- the checks
def _is_classification(out: Tensor, y: Tensor, loss: Tensor) -> bool:
    B = y.shape[0]
    if y.ndim != 1 or y.is_floating_point() or out.ndim != 2 or out.shape[0] != B or out.shape[1] < 2:
        return False
    if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
        return False
    return _close(loss, F.cross_entropy(out.double(), y.to(out.device), reduction="none"))


def _binary_targets(y: Tensor) -> Tensor | None:
    yy = y.reshape(y.shape[0], -1)
    if yy.shape[1] != 1 or not bool(((yy == 0) | (yy == 1)).all()):
        return None
    return yy[:, 0].double()


def _is_binary(out: Tensor, y: Tensor, loss: Tensor) -> bool:
    B = y.shape[0]
    t = _binary_targets(y)
    if t is None or out.shape[0] != B or out.numel() != B:
        return False
    bce = F.binary_cross_entropy_with_logits(out.reshape(B).double(), t.to(out.device), reduction="none")
    return _close(loss, bce)


def _regression_scale(out: Tensor, y: Tensor, loss: Tensor) -> float | None:
    """c > 0 with loss = c·Σ_o (f_o − y_o)² on every example (at least two with an error), else None."""
    B = y.shape[0]
    if not y.is_floating_point() or out.shape[0] != B or out.numel() != y.numel():
        return None
    se = ((out.reshape(B, -1).double() - y.reshape(B, -1).double().to(out.device)) ** 2).sum(1)
    keep = se > 1e-12
    if int(keep.sum()) < 2 or loss.shape != se.shape:  # one example fits any c: not a check
        return None
    c = loss.double()[keep] / se[keep]
    c0 = float(c.mean())
    if c0 <= 0 or not _close(loss.double(), c0 * se):
        return None
    return c0


def _token_ce(out: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    """Per-example summed token cross-entropy ``[B]`` and valid-token counts ``[B]`` (−100 ignored)."""
    if shift:
        out, labels = out[:, :-1], labels[:, 1:]
    B, L, V = out.shape
    ce = F.cross_entropy(out.reshape(-1, V).double(), labels.reshape(-1).to(out.device), ignore_index=-100,
                         reduction="none").view(B, L)
    return ce.sum(1), (labels != -100).sum(1).to(ce.dtype)


def _lm_convention(out: Tensor, y: Tensor, loss: Tensor) -> dict[str, Any] | None:
    if out.ndim != 3 or y.ndim != 2 or y.is_floating_point() or out.shape[:2] != y.shape:
        return None
    valid = y[y != -100]
    if valid.numel() == 0 or int(valid.min()) < 0 or int(valid.max()) >= out.shape[2]:
        return None
    for shift in (True, False):
        total, n = _token_ce(out, y, shift)
        if _close(loss, total):
            return {"shift": shift, "reduction": "sum"}
        if _close(loss, total / n.clamp_min(1)):
            return {"shift": shift, "reduction": "mean"}
    return None


# ---------------------------------------------------------------------------- weighted and elementwise losses
#: elementwise regression losses ρ(f, y) recognised with a positive per-example factor (Σ or mean over
#: outputs, sample weights): the squared error, L1, Huber with δ = 1 (= smooth-L1 with β = 1) and the Poisson
#: negative log-likelihood of a log-rate (``F.poisson_nll_loss`` defaults).
_ELEMENTWISE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "squared error": lambda f, y: (f - y) ** 2,
    "L1 error": lambda f, y: (f - y).abs(),
    "Huber loss (delta=1, the smooth-L1 loss with beta=1)": lambda f, y: F.huber_loss(f, y, reduction="none"),
    "Poisson NLL of a log-rate": lambda f, y: torch.exp(f) - y * f,
}


def _fitted_factors(parts: list[Tensor], losses: list[Tensor]) -> Tensor | None:
    """``[B, P]`` factors a with loss_e = Σ_p a_p·parts_e[:, p] at every evaluation e, else None.

    ``parts``: per evaluation ``[B, P]`` (float64); ``losses``: per evaluation ``[B]``. Fitted per
    example by least squares over the E > P evaluations and accepted only where every evaluation
    matches (E − P checks per example).
    """
    A = torch.stack(parts, dim=1)  # [B, E, P]
    rhs = torch.stack([v.double().to(A.device) for v in losses], dim=1)  # [B, E]
    if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(rhs).all()):
        return None
    coef = torch.linalg.lstsq(A, rhs.unsqueeze(-1)).solution[..., 0]  # [B, P]
    fit = (A @ coef.unsqueeze(-1))[..., 0]
    if not _close(fit, rhs):
        return None
    return coef


def _moved_losses(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, out: Tensor,
                  loss: Tensor) -> tuple[list[Tensor], list[Tensor]] | None:
    """The outputs and losses at the tapped output and at three fixed moves of it (None: cannot move)."""
    outs, losses = [out.double()], [loss.reshape(-1)]
    for delta in _probe_deltas(out) + [-0.2 * _probe_deltas(out)[0].flip(-1)]:
        moved = _loss_at(module, loss_fn, batch, tap, delta)
        if moved is None or moved.shape != losses[0].shape:
            return None
        outs.append(out.double() + delta)
        losses.append(moved)
    return outs, losses


def _weighted_classification(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, out: Tensor,
                             y: Tensor, loss: Tensor) -> str | None:
    """Which weighted cross-entropy the loss is, or None: loss = a·CE + b·U per example, a > 0,
    b ≥ 0, U = −mean_c log p_c, at the output and at three moves of it (class or sample weights:
    b = 0; label smoothing ε: a = 1 − ε, b = ε)."""
    B = y.shape[0]
    if y.ndim != 1 or y.is_floating_point() or out.ndim != 2 or out.shape[0] != B or out.shape[1] < 2:
        return None
    if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
        return None
    moved = _moved_losses(module, loss_fn, batch, tap, out, loss)
    if moved is None:
        return None
    yy = y.to(out.device).unsqueeze(1)
    parts = []
    for z in moved[0]:
        lp = torch.log_softmax(z, dim=-1)
        parts.append(torch.stack([-lp.gather(1, yy)[:, 0], -lp.mean(1)], dim=1))
    coef = _fitted_factors(parts, moved[1])
    if coef is None:
        if not _class_weighted_smoothing(module, loss_fn, batch, tap, moved, yy):
            return None
        return "class-weighted label-smoothed cross-entropy"
    a, b = coef[:, 0], coef[:, 1]
    tol = _RTOL * float(coef.abs().max().clamp_min(1e-12))  # float32 losses fit to ~1e-6
    if bool((a < -tol).any()) or bool((b < -tol).any()) or float(a.max()) <= tol:
        return None
    smoothed = bool((b > 10 * tol).any())
    weighted = bool(((a + b) - (a + b).mean()).abs().max() > 10 * tol)
    what = " and ".join([w for w, on in (("weighted", weighted), ("label-smoothed", smoothed)) if on])
    return f"{what or 'scaled'} cross-entropy"


#: evaluations of the loss at moved outputs that the class-weighted label-smoothing fit may spend.
_MAX_MOVES = 16


def _class_weighted_smoothing(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap,
                              moved: tuple[list[Tensor], list[Tensor]], yy: Tensor) -> bool:
    """loss_b = a_b·(−log p_{y_b}) + Σ_c β_c·(−log p_c), a_b > 0, β_c ≥ 0 shared by the batch: label
    smoothing with class weights (torch weights the smoothing term by class). Fitted jointly over the
    examples and E evaluations (B + C unknowns, E·B equations): the output is moved further until
    E·B ≥ B + C + 2B (two checks per example), for at most :data:`_MAX_MOVES` evaluations."""
    outs, losses = list(moved[0]), list(moved[1])
    B, C = outs[0].shape
    need = -(-(B + C) // B) + 2
    if need > _MAX_MOVES:
        return False
    base = torch.arange(outs[0].numel(), dtype=torch.float64).reshape(outs[0].shape).to(outs[0].device)
    k = 0
    while len(outs) < need:
        k += 1
        delta = 0.3 * torch.sin((1.3 + 0.37 * k) * base + 0.7 * k)
        loss = _loss_at(module, loss_fn, batch, tap, delta)
        if loss is None or loss.shape != losses[0].shape:
            return False
        outs.append(outs[0] + delta)
        losses.append(loss)
    rows = []
    for z in outs:
        lp = torch.log_softmax(z, dim=-1)
        own = torch.diag_embed(-lp.gather(1, yy)[:, 0])  # [B, B]: a_b's column
        rows.append(torch.cat([own, -lp], dim=1))  # [B, B + C]
    A = torch.cat(rows, dim=0)
    rhs = torch.cat([v.double().to(A.device) for v in losses])
    if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(rhs).all()):
        return False
    # a_b and β_{y_b} multiply the same column in example b's rows: only their sum is identified
    # (alone, when no other example shares the class); the SVD driver gives the minimum-norm split
    coef = torch.linalg.lstsq(A.cpu(), rhs.cpu().unsqueeze(-1), driver="gelsd").solution[:, 0]
    if not _close(A.cpu() @ coef, rhs.cpu()):
        return False
    a, beta = coef[:B], coef[B:]
    tol = _RTOL * float(coef.abs().max().clamp_min(1e-12))
    own = a + beta[yy[:, 0].cpu()]
    return bool((own > tol).all()) and bool((a > -tol).all()) and bool((beta > -tol).all())


def _weighted_binary(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, out: Tensor, y: Tensor,
                     loss: Tensor) -> bool:
    """loss = a·BCE-with-logits per example, a ≥ 0 (``pos_weight``, sample weights), at three moves."""
    B = y.shape[0]
    t = _binary_targets(y)
    if t is None or out.shape[0] != B or out.numel() != B:
        return False
    moved = _moved_losses(module, loss_fn, batch, tap, out, loss)
    if moved is None:
        return False
    tt = t.to(out.device)
    parts = [F.binary_cross_entropy_with_logits(z.reshape(B), tt, reduction="none").unsqueeze(1)
             for z in moved[0]]
    coef = _fitted_factors(parts, moved[1])
    return coef is not None and bool((coef >= 0).all()) and float(coef.max()) > 0


def _multilabel(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, out: Tensor, y: Tensor,
                loss: Tensor) -> bool:
    """loss = a·Σ_k BCE-with-logits(z_k, y_k) per example (a > 0: summed or averaged over the K ≥ 2
    labels, sample weights) for an output ``[B, K]`` and float 0/1 targets of its shape."""
    B = y.shape[0]
    if not y.is_floating_point() or out.shape != y.shape or out.ndim != 2 or out.shape[1] < 2:
        return False
    if not bool(((y == 0) | (y == 1)).all()):
        return False
    moved = _moved_losses(module, loss_fn, batch, tap, out, loss)
    if moved is None:
        return False
    tt = y.double().to(out.device)
    parts = [F.binary_cross_entropy_with_logits(z, tt, reduction="none").sum(1, keepdim=True)
             for z in moved[0]]
    coef = _fitted_factors(parts, moved[1])
    return coef is not None and bool((coef >= 0).all()) and float(coef.max()) > 0 and B > 0


def _elementwise_regression(module: nn.Module, loss_fn: LossFn, batch: Any, tap: _Tap, out: Tensor,
                            y: Tensor, loss: Tensor) -> str | None:
    """The name of the :data:`_ELEMENTWISE` loss ρ with loss = a·Σ_o ρ(f_o, y_o) per example (a ≥ 0)
    at the output and at three moves of it, for a float output of the targets' size; else None."""
    B = y.shape[0]
    if not y.is_floating_point() or out.shape[0] != B or out.numel() != y.numel() or out.ndim > 3:
        return None
    moved = _moved_losses(module, loss_fn, batch, tap, out, loss)
    if moved is None:
        return None
    yy = y.reshape(B, -1).double().to(out.device)
    for name, rho in _ELEMENTWISE.items():
        parts = [rho(z.reshape(B, -1), yy).sum(1, keepdim=True) for z in moved[0]]
        coef = _fitted_factors(parts, moved[1])
        if coef is not None and bool((coef >= 0).all()) and float(coef.max()) > 0:
            return name
    return None


def check_query_targets(task: AttributionTask, batch: Any) -> None:
    """Refuse non-integer float targets in a query batch of a classification task.

    The margin and the cross-entropy index the logits by the label, so a float label such as 1.7
    would otherwise be truncated to class 1 without a word.

    Raises:
        SketchInputError: if ``task.kind`` is ``"classification"`` and the batch's targets are a
            floating tensor holding a non-integer value.
    """
    if task.kind != "classification":
        return
    key = task.details.get("target_key")
    try:
        found = _target(batch) if key is None else (key, _at(batch, key))
    except (KeyError, IndexError, TypeError):  # a batch of another structure: the query's loss says so
        return
    if found is None or not found[1].is_floating_point():
        return
    key, y = found
    frac = y != y.round()
    if bool(frac.any()):
        bad = y[frac].flatten()[:5].tolist()
        raise SketchInputError(
            f"The query batch's targets {key!r} ({y.dtype}) hold non-integer values {bad}, but the task "
            "is a classification whose targets are class indices; pass integer class labels (torch.long), "
            "as in the training batches, instead of scores or probabilities."
        )


# ---------------------------------------------------------------------------- the tasks
def _classification(loss_fn: LossFn, tap: _Tap | _LogitsTap, key: Any, binary: bool,
                    loss_name: str | None = None) -> AttributionTask:
    def margin(module: nn.Module, batch: Any) -> Tensor:
        out, _ = tap(loss_fn, module, batch)
        y = _at(batch, key)
        if binary:
            B = out.shape[0]
            sign = 2.0 * y.reshape(B).to(out.dtype) - 1.0
            return sign * out.reshape(B)
        return classification_margin(out, _class_targets(y))

    def neg_margin(module: nn.Module, batch: Any) -> Tensor:
        return -margin(module, batch)

    def fisher(module: nn.Module, batch: Any, gen: torch.Generator) -> list[KernelTerm]:
        key_, y = key, _at(batch, key)
        with torch.no_grad():
            out, _ = tap(loss_fn, module, batch)
            if binary:
                p1 = torch.sigmoid(out.reshape(out.shape[0]).detach().double()).cpu()
                drawn = torch.bernoulli(p1, generator=gen).reshape(y.shape)
            else:
                p = torch.softmax(out.detach().double(), dim=-1).cpu()
                drawn = torch.multinomial(p, 1, generator=gen)[:, 0].reshape(y.shape)
        return [(loss_fn, _with_target(batch, key_, drawn.to(y.device, y.dtype)), 1.0)]

    if isinstance(tap, _LogitsTap):
        where = "the module's per_example_logits(batch)"
    else:
        where = f"the output of {tap.name!r}" if tap.name else "the model's output"
    what = loss_name or ("BCE-with-logits" if binary else "cross-entropy")
    return AttributionTask(
        kind="binary" if binary else "classification",
        loss=loss_fn,
        query_loss=neg_margin,
        kernel_terms=lambda m, b, g: [(neg_margin, b, 1.0)],
        kernel="margin-logits",
        reason=(f"the loss is the {what} of {where}: TRAK's margin kernel, and queries measure the "
                "margin log p_y/(1 − p_y)"),
        details={"output": tap.name, "call": tap.call, "target": str(key), "target_key": key},
        fisher_terms=fisher,
    )


def _regression(loss_fn: LossFn, tap: _Tap, key: Any, outputs: int, scale: float | None,
                samples: int, loss_name: str | None = None, kind: str = "regression") -> AttributionTask:
    def output(module: nn.Module, batch: Any) -> Tensor:
        out, _ = tap(loss_fn, module, batch)
        return out.reshape(out.shape[0], -1)

    def combination(s: Tensor) -> LossFn:  # sᵀf: E_s[(sᵀ∇f)(sᵀ∇f)ᵀ] = Σ_o ∇f_o∇f_oᵀ for s = ±1
        def fn(m: nn.Module, b: Any) -> Tensor:
            f = output(m, b)
            return f @ s.to(f.dtype).to(f.device)

        return fn

    def terms(module: nn.Module, batch: Any, gen: torch.Generator) -> list[KernelTerm]:
        if outputs <= _MAX_EXACT_OUTPUTS:  # one exact term per output: s = e_o
            eye = torch.eye(outputs, dtype=torch.float64)
            return [(combination(eye[o]), batch, 1.0) for o in range(outputs)]
        signs = [(torch.randint(0, 2, (outputs,), generator=gen) * 2 - 1).double() for _ in range(samples)]
        return [(combination(s), batch, 1.0 / samples) for s in signs]

    if isinstance(tap, _LogitsTap):
        where = "the module's per_example_logits(batch)"
    else:
        where = f"the output of {tap.name!r}" if tap.name else "the model's output"
    how = loss_name or ("the squared error of" if scale is not None
                        else "a function (not the squared error) of")
    what = "logits" if kind == "multilabel" else "prediction"
    return AttributionTask(
        kind=kind,
        loss=loss_fn,
        query_loss=loss_fn,
        kernel_terms=terms,
        kernel="gauss-newton",
        reason=(f"the loss is {how} {where} against float targets: the Gauss–Newton kernel Σ∇f∇fᵀ of "
                f"the {what}, and queries measure −loss"),
        details={"output": tap.name, "call": tap.call, "target": str(key), "target_key": key,
                 "outputs": outputs},
    )


def _language_model(loss_fn: LossFn, tap: _Tap, key: Any, conv: dict[str, Any],
                    samples: int) -> AttributionTask:
    shift = bool(conv["shift"])

    def terms(module: nn.Module, batch: Any, gen: torch.Generator) -> list[KernelTerm]:
        labels = _at(batch, key)
        with torch.no_grad():
            out, _ = tap(loss_fn, module, batch)
            logits = out[:, :-1] if shift else out
            p = torch.softmax(logits.detach().double(), dim=-1).cpu()
            B, L, V = p.shape
        result = []
        for _ in range(samples):
            drawn = torch.multinomial(p.reshape(-1, V), 1, generator=gen).view(B, L)
            drawn = drawn.to(labels.device, labels.dtype)
            new = labels.clone()
            target = new[:, 1:] if shift else new
            keep = target != -100
            target[keep] = drawn[keep]
            result.append((loss_fn, _with_target(batch, key, new), 1.0 / samples))
        return result

    return AttributionTask(
        kind="language_model",
        loss=loss_fn,
        query_loss=loss_fn,
        kernel_terms=terms,
        kernel="gauss-newton-sampled",
        reason=(f"the loss is the token cross-entropy ({conv['reduction']} over tokens"
                f"{', shifted by one' if shift else ''}) of the logits against batch[{key!r}]: the softmax "
                f"Gauss–Newton kernel from {samples} sampled completions per example, and queries "
                "measure the log-probability of their completion (−loss)"),
        details={"output": tap.name, "call": tap.call, "target": str(key), "target_key": key, **conv,
                 "samples": samples},
    )


def _user_sampled(loss_fn: LossFn, samples: int) -> AttributionTask:
    def terms(module: nn.Module, batch: Any, gen: torch.Generator) -> list[KernelTerm]:
        with torch.no_grad():
            drawn = [module.sample_labels(batch, gen) for _ in range(samples)]  # type: ignore[operator]
        return [(loss_fn, b, 1.0 / samples) for b in drawn]

    return AttributionTask(
        kind="custom", loss=loss_fn, query_loss=loss_fn, kernel_terms=terms, kernel="sampled",
        fisher_terms=terms,
        reason=f"the module's sample_labels(batch, generator): the Fisher of {samples} sampled labels",
        details={"samples": samples},
    )


def _user_margin(loss_fn: LossFn) -> AttributionTask:
    def neg_margin(module: nn.Module, batch: Any) -> Tensor:
        return -module.per_example_margin(batch)  # type: ignore[operator]

    return AttributionTask(
        kind="custom", loss=loss_fn, query_loss=neg_margin,
        kernel_terms=lambda m, b, g: [(neg_margin, b, 1.0)], kernel="margin",
        reason="the module's per_example_margin(batch): the kernel of its gradients, and queries measure it",
    )


def _fix(key: Any, y: Tensor | None) -> str:
    """What to add, for the targets the batch carries: the change that restores the best kernel."""
    where = f"batch[{key!r}]"
    if y is not None and not y.is_floating_point() and y.ndim == 1:  # class indices: a classifier
        return (f"Define per_example_logits(batch) -> [B, C], the logits whose cross-entropy against {where} "
                "is the loss (for a forward that takes several inputs, e.g. forward(x, mask), or returns a "
                "dict): that restores TRAK's margin kernel. Or define per_example_margin(batch), or pass "
                "task=AttributionTask(...)")
    if y is not None and y.ndim >= 1 and y.shape[0] > 0 and _binary_targets(y) is not None:  # BCE or MSE
        return (f"Define per_example_logits(batch) -> [B] or [B, 1], the logits whose BCE-with-logits "
                f"against {where} is the loss (for a forward that takes several inputs or returns a dict): "
                "that restores the binary margin kernel. For a squared error on these targets, return the "
                "prediction from a submodule the loss calls (the Gauss–Newton kernel). Or define "
                "per_example_margin(batch), or pass task=AttributionTask(...)")
    if y is not None and y.is_floating_point():  # a regression, or a likelihood of its own
        return ("Return the prediction from a submodule the loss calls when the loss is a squared, L1, "
                "Huber (delta=1) or Poisson loss of it (the Gauss–Newton kernel), define "
                f"per_example_margin(batch), define sample_labels(batch, generator) -> batch with {where} "
                "drawn from the model when the loss is a likelihood of another kind (the sampled Fisher), "
                "or pass task=AttributionTask(...)")
    return ("Return the model's output from a submodule the loss calls (logits for a classifier or language "
            "model, the prediction for a regression), or define per_example_margin(batch) or "
            "sample_labels(batch, generator), or pass task=AttributionTask(...)")


def _empirical(loss_fn: LossFn, why: str, key: Any = None, y: Tensor | None = None) -> AttributionTask:
    return AttributionTask(
        kind="empirical", loss=loss_fn, query_loss=loss_fn, kernel_terms=None, kernel="empirical",
        reason=(f"{why}; the kernel falls back to the empirical Fisher of the stored loss gradients "
                f"(not TRAK's margin kernel), which over-weights unfitted examples. {_fix(key, y)}"),
    )


def resolve_task(
    module: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    kernel_samples: int = DEFAULT_KERNEL_SAMPLES,
) -> AttributionTask:
    """Recognise the attribution task of ``module`` from one ``batch`` (see the module docstring).

    Args:
        module: the model; its ``per_example_loss(batch)`` is used unless ``loss_fn`` is given.
        batch: one training batch, as the dataloader yields it (used under ``no_grad``).
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses.
        kernel_samples: sampled kernel terms per example for sampled kernels (language models,
            ``sample_labels``, regressions with more than 8 outputs).

    Returns:
        The :class:`AttributionTask`; never raises for an unrecognised model (the empirical task
        says why in :attr:`AttributionTask.reason`).

    Raises:
        SketchConfigError: without ``loss_fn`` and ``per_example_loss``, or for ``kernel_samples < 1``.
    """
    from lightning_sketch.gradients import module_loss_fn

    positive_int("kernel_samples", kernel_samples)
    loss = module_loss_fn(module, loss_fn)
    if callable(getattr(module, "sample_labels", None)):
        return _user_sampled(loss, kernel_samples)
    found_task = _recognise(module, batch, loss, kernel_samples)
    if callable(getattr(module, "per_example_margin", None)):
        return replace(_user_margin(loss), fisher_terms=found_task.fisher_terms)
    return found_task


def _recognise(module: nn.Module, batch: Any, loss: LossFn, kernel_samples: int) -> AttributionTask:
    targets = _targets(batch)
    if not targets:
        return _empirical(loss, "the batches carry no targets under 'y', 'labels', 'label', 'target' "
                                "or 'targets' (nor a tuple's second item)")
    key, y = targets[0]
    try:
        cands, values = _candidates(module, loss, batch)
    except Exception as err:  # a model outside every convention: fall back, say why
        why = f"the loss could not be evaluated on a probe batch ({type(err).__name__}: {err})"
        return _empirical(loss, why, key, y)
    values = values.reshape(-1)
    if values.shape[0] != y.shape[0]:
        why = f"per_example_loss returned {values.shape[0]} values for {y.shape[0]} targets"
        return _empirical(loss, why, key, y)
    notes = []
    for key_j, y_j in targets:  # the usual target first, then the batch's other tensors
        if y_j.shape[0] != values.shape[0]:
            continue
        task, note = _match(module, batch, loss, kernel_samples, cands, values, key_j, y_j)
        if task is not None:
            return task
        notes.append(note)
    if _target(batch) is None:
        return _empirical(loss, "the batches carry no targets under 'y', 'labels', 'label', 'target' or "
                                "'targets' (nor a tuple's second item), and no other tensor of the batch is "
                                "the target of a recognised loss", key, y)
    return _empirical(loss, "no output computed by the loss is the logits of a (weighted) cross-entropy, "
                            "the logit(s) of a BCE, the prediction of a squared, L1, Huber or Poisson "
                            "loss or the logits of a token "
                            f"cross-entropy against the batch's targets{notes[0] if notes else ''}", key, y)


def _targets(batch: Any) -> list[tuple[Any, Tensor]]:
    """Candidate ``(key, targets)``: :func:`_target`'s first, then every other tensor of the batch
    (``(x, mask, y)`` tuples, dict keys of other names, an autoencoder's input), ids excepted."""
    first = _target(batch)
    out = [] if first is None else [first]
    if isinstance(batch, Mapping):
        items = [(k, v) for k, v in batch.items() if k != "index"]
    elif isinstance(batch, (tuple, list)):
        items = list(enumerate(batch))
    else:
        return out
    out += [(k, v) for k, v in items
            if isinstance(v, Tensor) and v.ndim >= 1 and (first is None or k != first[0])]
    return out


def _match(module: nn.Module, batch: Any, loss: LossFn, kernel_samples: int, cands: list[tuple[_Tap, Tensor]],
           values: Tensor, key: Any, y: Tensor) -> tuple[AttributionTask | None, str]:
    """The task whose loss against ``batch[key]`` is ``values``, or ``(None, note)``."""
    note = ""
    y = _class_targets(y)  # a [B, 1] column of class indices is read as the [B] targets it holds
    if callable(getattr(module, "per_example_logits", None)):  # the module's own logits come first
        try:
            with torch.no_grad():
                logits, _ = _LogitsTap()(loss, module, batch)
        except Exception as err:
            note = f"; per_example_logits(batch) failed ({type(err).__name__}: {err})"
        else:
            if _is_classification(logits, y, values):
                return _classification(loss, _LogitsTap(), key, binary=False), ""
            if _is_binary(logits, y, values):
                return _classification(loss, _LogitsTap(), key, binary=True), ""
            note = (f"; the cross-entropy of per_example_logits(batch) {tuple(logits.shape)} against "
                    f"batch[{key!r}] is not the loss")
    for tap, out in cands:
        if _is_classification(out, y, values):
            return _classification(loss, tap, key, binary=False), ""
        if _is_binary(out, y, values):
            return _classification(loss, tap, key, binary=True), ""
        conv = _lm_convention(out, y, values)
        if conv is not None:
            return _language_model(loss, tap, key, conv, kernel_samples), ""
        if y.is_floating_point():
            scale = _regression_scale(out, y, values)
            if scale is not None:
                outputs = out.numel() // out.shape[0]
                return _regression(loss, tap, key, outputs, scale, kernel_samples), ""
    for tap, out in cands:  # weighted and elementwise losses: checked by moving the output
        if not isinstance(tap, _Tap):
            continue
        ce_name = _weighted_classification(module, loss, batch, tap, out, y, values)
        if ce_name is not None:
            return _classification(loss, tap, key, binary=False, loss_name=ce_name), ""
        if _weighted_binary(module, loss, batch, tap, out, y, values):
            return _classification(loss, tap, key, binary=True, loss_name="weighted BCE-with-logits"), ""
        if _multilabel(module, loss, batch, tap, out, y, values):
            k = out.numel() // out.shape[0]
            what = f"the multi-label BCE-with-logits ({k} labels) of"
            return _regression(loss, tap, key, k, None, kernel_samples, loss_name=what, kind="multilabel"), ""
        rho = _elementwise_regression(module, loss, batch, tap, out, y, values)
        if rho is not None:
            return _regression(loss, tap, key, out.numel() // out.shape[0], None, kernel_samples,
                               loss_name=f"the {rho} of"), ""
    return None, note
