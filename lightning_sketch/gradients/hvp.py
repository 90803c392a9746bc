"""Hessian-vector products of the mean per-example loss, exact and sketched.

arXiv 2402.03994, eq. 10, Listing 7.

``H`` is the Hessian, with respect to the layout's parameters, of L(θ) = mean_b ℓ(θ; x_b) over a
batch (or, in :func:`make_hvp` and :func:`loss_grad`, over every example of a fixed list of
batches, so batches weigh by their size). No weight decay term is added. Three methods
(Pearlmutter 1994; measured costs in docs/measurements.md):

- ``"fwd_rev"``: forward-over-reverse, ``jvp(grad(L))`` (default; paper Listing 7).
- ``"double_backward"``: reverse-over-reverse with ``torch.autograd.grad(create_graph=True)``;
  for ops without forward-mode AD.
- ``"finite_difference"``: central difference (∇L(θ + t v) − ∇L(θ − t v)) / 2t with
  t = ``eps`` / ‖v‖, so the parameters move by ``eps`` in norm; bias O(eps²), round-off
  O(ε_mach/eps). Default ``eps``: 1e-3 for float32 (1e-3 relative error measured, docs/measurements.md),
  1e-5 for float64, 1e-2 for half types. Works with anything that has a plain gradient.

Which exact method to use (docs/measurements.md, "Hessian-vector products"): both do the same matrix
multiplications, but forward-over-reverse pushes a tangent through every op of the forward *and*
of the backward, and PyTorch's forward-mode formulas for LayerNorm, softmax and the losses are
decomposed into several elementwise kernels (plus materialised zero tangents and functorch's
per-op checks). On CPU, transformers (the demo Transformer: 1.17-1.25x per HVP) and the small CNN
measured there run faster with ``"double_backward"``, which ``HessianSpectrum`` uses by default;
prefer it unless an op lacks a double backward. ``"fwd_rev"`` stays the default here for the
paper's recipe and is required by ``sketched_hvp(mode="implicit")``.

A Krylov iteration applies H to many vectors at the same parameters: ``make_hvp(...,
cache_graph=True)`` (the default of the spectrum functions) builds the graph of ∇L once and runs one
backward per HVP (``gradients/_hvp_graph.py``; 1.5-1.9x cheaper per HVP on the models measured).

Fused attention kernels (flash/efficient SDPA) have neither forward-mode nor double-backward
derivatives, so every HVP runs under ``sdpa_kernel(SDPBackend.MATH)`` (PyTorch issue #116350);
the math kernel computes the same function.

All functions use ``torch.func``/``torch.autograd.grad`` on detached copies of the parameter
values: ``.grad``, parameters, buffers and train/eval mode are never touched. Dropout in train
mode makes the loss random; call them in eval mode (the spectrum callback does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_sketch.exceptions import SketchConfigError, SketchInputError
from lightning_sketch.gradients import _functional as F
from lightning_sketch.gradients._hvp_graph import GraphHVP
from lightning_sketch.layout import ParamLayout
from lightning_sketch.linalg import LinearOperator
from lightning_sketch.sketches.base import Sketch

__all__ = ["HVPOperator", "hvp", "loss_grad", "make_hvp", "sketched_hvp"]

Method = Literal["fwd_rev", "double_backward", "finite_difference"]
_METHODS = ("fwd_rev", "double_backward", "finite_difference")
_DEFAULT_EPS = {torch.float64: 1e-5, torch.float32: 1e-3}


def _mean_loss(
    model: nn.Module, loss_fn: F.LossFn, batch: F.Batch, fixed: dict[str, Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    module = F._LossModule(model, loss_fn)
    size = F.batch_size(batch)

    def loss(selected: dict[str, Tensor]) -> Tensor:
        return F.check_losses(F.loss_call(module, selected, fixed, batch), size).mean()

    return loss


def _check_vec(v: Tensor, n: int, name: str, letter: str) -> None:
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim not in (1, 2) or v.shape[-1] != n:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise SketchInputError(
            f"`{name}` must be a real floating tensor [{letter}] or [K, {letter}] with {letter} = {n}, got "
            f"{shape}."
        )


def _hvp_dict(
    loss: Callable[[dict[str, Tensor]], Tensor],
    theta: dict[str, Tensor],
    v: dict[str, Tensor],
    method: str,
    eps: float | None,
) -> dict[str, Tensor]:
    if method == "fwd_rev":
        return jvp(grad(loss), (theta,), (v,))[1]
    if method == "double_backward":
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        g = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True, allow_unused=True)
        # A parameter the loss does not use has no gradient, and one it uses linearly has a constant
        # gradient: neither contributes to H v (its rows of H are zero), and autograd refuses both.
        pairs = [(gi, v[n]) for n, gi in zip(leaves, g) if gi is not None and gi.requires_grad]
        hv: list[Tensor | None] = [None] * len(leaves)
        if pairs:
            hv = list(
                torch.autograd.grad(
                    [gi for gi, _ in pairs],
                    list(leaves.values()),
                    grad_outputs=[w for _, w in pairs],
                    allow_unused=True,
                )
            )
        return {n: torch.zeros_like(theta[n]) if h is None else h.detach() for n, h in zip(leaves, hv)}
    p0 = next(iter(theta.values()))
    step = _DEFAULT_EPS.get(p0.dtype, 1e-2) if eps is None else float(eps)
    squares = [(t.double() ** 2).sum() for t in v.values()]
    norm = torch.sqrt(sum(squares[1:], squares[0]))
    if norm == 0:
        return {n: torch.zeros_like(t) for n, t in theta.items()}
    t = step / float(norm)
    plus = grad(loss)({n: theta[n] + t * v[n] for n in theta})
    minus = grad(loss)({n: theta[n] - t * v[n] for n in theta})
    return {n: (plus[n] - minus[n]) / (2 * t) for n in theta}


def _prepare(model: nn.Module, layout: ParamLayout | None, method: str) -> ParamLayout:
    if method not in _METHODS:
        raise SketchConfigError(f"`method` must be one of {list(_METHODS)}, got {method!r}.")
    F.check_model(model)
    return F.resolve_layout(model, layout)


def _rows(v: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return fn(v) if v.ndim == 1 else torch.stack([fn(row) for row in v])


def hvp(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    v: Tensor,
    layout: ParamLayout | None = None,
    method: Method = "fwd_rev",
    eps: float | None = None,
) -> Tensor:
    """H v, the Hessian of the batch-mean loss times ``v`` (``[N]`` or ``[K, N]`` -> same shape).

    Args:
        model: the module (not modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; H is the Hessian of its mean.
        batch: a Tensor, a dict or a tuple/list of tensors.
        v: ``[N]`` or ``[K, N]`` in the layout's order.
        layout: which parameters (default: all trainable ones).
        method: ``"fwd_rev"``, ``"double_backward"`` or ``"finite_difference"`` (module docstring).
        eps: finite-difference step (parameter-space norm); default by dtype.

    Raises:
        SketchConfigError: for an unknown ``method``.
        SketchInputError: if ``v`` is not ``[N]``/``[K, N]``.

    Example:
        >>> import torch
        >>> X = torch.randn(8, 3, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> loss_fn = lambda m, x: m(x).squeeze(-1) ** 2   # least squares, target 0
        >>> v = torch.randn(3, dtype=torch.float64)
        >>> torch.allclose(hvp(model, loss_fn, X, v), 2 * X.T @ X @ v / 8)
        True
    """
    layout = _prepare(model, layout, method)
    _check_vec(v, layout.dim, "v", "N")
    selected, fixed = F.split_state(model, layout)
    loss = _mean_loss(model, loss_fn, batch, fixed)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        return _rows(
            v, lambda row: layout.flatten(_hvp_dict(loss, selected, layout.unflatten(row), method, eps))
        )


class HVPOperator(LinearOperator):
    """H, the Hessian of the mean per-example loss over every example of ``batches``, as a symmetric
    :class:`~lightning_sketch.linalg.LinearOperator` of shape ``(N, N)``.

    Each application averages the per-batch HVPs (:func:`hvp`) weighted by batch size, so the
    operator is the Hessian of the mean per-example loss over all examples; the model's *current*
    parameter values are read at each call. Compose it with a sketch's operator for eq. 10 of
    arXiv 2402.03994: ``sketch.op @ H @ sketch.op.T``.

    Args:
        model, loss_fn, layout, method, eps: as in :func:`hvp`.
        batches: a list (or iterable) of batches; a single batch must be wrapped as ``[batch]``.
        cache_graph: with ``method="double_backward"``, build the graph of ∇L over all batches once
            and run only its backward per HVP (``retain_graph=True``): 1.7-1.9x fewer operations per
            HVP, at the memory of that graph, held until :meth:`clear` or until a parameter, buffer
            or train/eval flag changes (then rebuilt). Ignored by the other methods.

    Raises:
        SketchInputError: for an empty or non-list ``batches``.
        SketchConfigError: for an unknown ``method``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: F.LossFn,
        batches: Iterable[F.Batch],
        layout: ParamLayout | None = None,
        method: Method = "fwd_rev",
        eps: float | None = None,
        cache_graph: bool = False,
    ) -> None:
        self.layout = _prepare(model, layout, method)
        super().__init__((self.layout.dim, self.layout.dim), symmetric=True)
        self.model, self.loss_fn, self.method, self.eps = model, loss_fn, method, eps
        self.batches = F.as_batch_list(batches)
        self.sizes = [F.batch_size(b) for b in self.batches]
        use_graph = bool(cache_graph) and method == "double_backward"
        self.graph = GraphHVP(model, loss_fn, self.batches, self.layout) if use_graph else None

    def clear(self) -> None:
        """Free the cached graph of ∇L, if any (the next call rebuilds it)."""
        if self.graph is not None:
            self.graph.clear()

    def _rows(self, v: Tensor) -> Tensor:
        return self._apply(v)

    def _apply(self, v: Tensor) -> Tensor:
        if self.graph is not None:
            F.check_model(self.model)
            _check_vec(v, self.layout.dim, "v", "N")
            try:
                return self.graph(v)
            except torch.OutOfMemoryError:  # an accelerator's allocator says so; CPU has no such signal
                self.graph.clear()
                self.graph = None
                warnings.warn(
                    "HVPOperator: the graph of ∇L over all probe batches does not fit in device memory; "
                    "recomputing it for every HVP from now on (as cache_graph=False). Use fewer or smaller "
                    "probe batches to keep it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        total = sum(self.sizes)
        terms = (
            hvp(self.model, self.loss_fn, b, v, layout=self.layout, method=self.method, eps=self.eps)
            * (size / total)
            for b, size in zip(self.batches, self.sizes)
        )
        out = next(terms)  # as_batch_list refused an empty list
        for h in terms:
            out = out + h
        return out

    def __call__(self, v: Tensor) -> Tensor:
        """H v for ``[N]`` or ``[K, N]`` rows (checked by :func:`hvp`)."""
        return self._apply(v)


def make_hvp(
    model: nn.Module,
    loss_fn: F.LossFn,
    batches: Iterable[F.Batch],
    layout: ParamLayout | None = None,
    method: Method = "fwd_rev",
    eps: float | None = None,
    cache_graph: bool = False,
) -> HVPOperator:
    """The deterministic operator v ↦ H v for the mean loss over every example of ``batches``.

    The batches are materialised into a list once; each call averages the per-batch HVPs weighted
    by batch size, so the operator is the Hessian of the mean per-example loss over all examples.
    The model's *current* parameter values are read at each call.

    Args:
        model, loss_fn, layout, method, eps: as in :func:`hvp`.
        batches: a list (or iterable) of batches; a single batch must be wrapped as ``[batch]``.
        cache_graph: keep the graph of ∇L between calls (``method="double_backward"`` only); see
            :class:`HVPOperator`.

    Returns:
        An :class:`HVPOperator`: callable ``[N]`` or ``[K, N]`` -> same shape, and a
        :class:`~lightning_sketch.linalg.LinearOperator` (``matmat``, ``@``, ``.T``).

    Raises:
        SketchInputError: for an empty or non-list ``batches``.
        SketchConfigError: for an unknown ``method``.

    Example:
        >>> import torch
        >>> X = torch.randn(6, 2, dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> op = make_hvp(model, lambda m, x: m(x).squeeze(-1) ** 2, [X[:2], X[2:]])
        >>> torch.allclose(op(torch.eye(2, dtype=torch.float64)), 2 * X.T @ X / 6)
        True
    """
    return HVPOperator(
        model, loss_fn, batches, layout=layout, method=method, eps=eps, cache_graph=cache_graph
    )


def loss_grad(
    model: nn.Module,
    loss_fn: F.LossFn,
    batches: Iterable[F.Batch],
    layout: ParamLayout | None = None,
) -> Tensor:
    """∇_θ of the mean per-example loss over every example of ``batches``, ``[N]``.

    Raises:
        SketchInputError: for an empty or non-list ``batches``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.ones(4, 2)
        >>> loss_grad(model, lambda m, b: m(b).squeeze(-1), [x]).tolist()
        [1.0, 1.0]
    """
    F.check_model(model)
    layout = F.resolve_layout(model, layout)
    batch_list = F.as_batch_list(batches)
    sizes = [F.batch_size(b) for b in batch_list]
    total = sum(sizes)
    selected, fixed = F.split_state(model, layout)
    with torch.enable_grad():
        terms = (
            layout.flatten(grad(_mean_loss(model, loss_fn, b, fixed))(selected)) * (size / total)
            for b, size in zip(batch_list, sizes)
        )
        out = next(terms)  # as_batch_list refused an empty list
        for g in terms:
            out = out + g
    return out


def sketched_hvp(
    model: nn.Module,
    loss_fn: F.LossFn,
    batch: F.Batch,
    sketch: Sketch,
    v: Tensor,
    mode: Literal["explicit", "implicit"] = "explicit",
    layout: ParamLayout | None = None,
    method: Method = "fwd_rev",
) -> Tensor:
    """Φ H Φᵀ v, the sketched HVP (arXiv 2402.03994, eq. 10), ``[D]`` or ``[K, D]`` -> same shape.

    ``method`` (explicit mode only) picks the exact HVP of the lifted direction, as in :func:`hvp`;
    ``"double_backward"`` is the faster one on the CPU models of benchmarks/real_models.py (see
    the module docstring for why).

    ``"explicit"``: lift t = Φᵀ v, forward-over-reverse HVP at θ0, apply Φ. ``"implicit"``: the
    forward-over-reverse HVP of ω ↦ L(θ0 + Φᵀω) at ω = 0 in direction v (paper Listing 7).

    Raises:
        SketchConfigError: if ``sketch.dim`` differs from N or for an unknown ``mode``.
        SketchInputError: if ``v`` is not ``[D]``/``[K, D]``.

    Example:
        >>> import torch
        >>> from lightning_sketch.sketches import make
        >>> X = torch.randn(8, 3, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> loss_fn = lambda m, x: m(x).squeeze(-1) ** 2
        >>> s = make("dense", dim=3, sketch_dim=2, seed=0)
        >>> v = torch.randn(2, dtype=torch.float64)
        >>> P = s.to_dense()
        >>> e = sketched_hvp(model, loss_fn, X, s, v)
        >>> i = sketched_hvp(model, loss_fn, X, s, v, mode="implicit")
        >>> torch.allclose(e, P @ (2 * X.T @ X / 8) @ P.T @ v), torch.allclose(e, i)
        (True, True)
    """
    if mode not in ("explicit", "implicit"):
        raise SketchConfigError(f"`mode` must be 'explicit' or 'implicit', got {mode!r}.")
    if mode == "implicit" and method != "fwd_rev":
        raise SketchConfigError(f"mode='implicit' is forward-over-reverse only; got method={method!r}.")
    layout = _prepare(model, layout, method)
    F.check_sketch(sketch, layout)
    _check_vec(v, sketch.sketch_dim, "v", "D")
    phi = sketch.op
    if mode == "explicit":
        return (phi @ HVPOperator(model, loss_fn, [batch], layout=layout, method=method) @ phi.T)(v)
    selected, fixed = F.split_state(model, layout)
    loss = _mean_loss(model, loss_fn, batch, fixed)

    def lifted(omega: Tensor) -> Tensor:
        return loss(F.lift(selected, layout, phi.T, omega))

    omega0 = torch.zeros(sketch.sketch_dim, dtype=v.dtype, device=v.device)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        return _rows(v, lambda row: jvp(grad(lifted), (omega0,), (row,))[1])
