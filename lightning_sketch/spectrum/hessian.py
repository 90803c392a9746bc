"""Hessian operators over a fixed probe set, and the ``hessian_eigs`` entry point.

The loss is L(θ) = the mean of the per-example losses ``loss_fn(model, batch)`` over every example
of the fixed list of probe batches (as :func:`lightning_sketch.gradients.make_hvp` defines it). Two
operators (arXiv 2402.03994, eq. 10):

- exact: v ↦ H v on R^N;
- sketched: v ↦ Φ H Φᵀ v on R^D (``sketch.op @ H @ sketch.op.T``, composed
  :class:`~lightning_sketch.linalg.LinearOperator`), so the Krylov
  iteration stores D-dimensional vectors only; its top eigenvalues estimate H's (Table 7).

HVPs come from :mod:`lightning_sketch.gradients`; nothing here writes ``.grad`` or changes the
module's mode. ``reduce`` (e.g. a DDP all-reduce mean) is applied to every matvec output, so each
rank runs the same Krylov iteration on the averaged operator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sketch.exceptions import SketchConfigError, SpectrumError
from lightning_sketch.gradients.hvp import HVPOperator, loss_grad, make_hvp
from lightning_sketch.layout import ParamLayout
from lightning_sketch.linalg import LinearOperator, Which, lanczos
from lightning_sketch.sketches import Sketch, derive_seed, make

__all__ = [
    "HessianEigs",
    "HessianOperator",
    "hessian_eigs",
    "hessian_operator",
    "probe_gradient",
    "resolve_sketch",
]

HvpMethod = Literal["fwd_rev", "double_backward", "finite_difference"]
Reduce = Callable[[Tensor], Tensor]


def resolve_sketch(sketch: Sketch | Mapping[str, Any] | None, dim: int) -> Sketch | None:
    """A :class:`Sketch` from a Sketch, a spec dict (``make(**spec)``) or None; checks ``dim == N``.

    Raises:
        SketchConfigError: on another type, or a sketch whose ``dim`` is not the model's N.
    """
    if sketch is None:
        return None
    if isinstance(sketch, Mapping):
        sketch = make(**dict(sketch))
    if not isinstance(sketch, Sketch):
        raise SketchConfigError(
            f"`sketch` must be None, a Sketch or a spec dict for make(**spec), got {type(sketch).__name__}."
        )
    if sketch.dim != dim:
        raise SketchConfigError(
            f"`sketch.dim` must equal the model's parameter count N = {dim}, got {sketch.dim}; "
            f"build it with make(kind, dim={dim}, sketch_dim=...)."
        )
    return sketch


def _check_batches(batches: Any) -> list[Any]:
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise SpectrumError(
            "`batches` must be a non-empty list of batches (the fixed probe set), got "
            f"{type(batches).__name__}; wrap a single batch as [batch]."
        )
    return list(batches)


class HessianOperator(LinearOperator):
    """The probe-set Hessian as a symmetric :class:`~lightning_sketch.linalg.LinearOperator`.

    Exact (``shape == (N, N)``: v ↦ H v) or sketched (``shape == (D, D)``: v ↦ Φ H Φᵀ v,
    arXiv 2402.03994, eq. 10); built by :func:`hessian_operator`. It computes in the parameters'
    dtype and device and returns rows in the input's dtype and device, applying ``reduce`` (e.g. a
    DDP all-reduce mean) to every output, so the Krylov solvers of :mod:`lightning_sketch.linalg`
    run on it directly.

    Attributes:
        operator: the underlying operator (H or Φ H Φᵀ, in the parameters' dtype, without ``reduce``).
        dim: N (exact) or D (sketched).
        sketch: the sketch Φ, or None for the exact operator.
        num_matvecs: HVPs evaluated so far (one per row applied).
        hvp: the exact HVP operator H inside ``operator`` (its cached graph is freed by :meth:`release`).
    """

    def __init__(
        self,
        operator: LinearOperator,
        sketch: Sketch | None,
        hvp: HVPOperator | None,
        *,
        param_dtype: torch.dtype,
        device: torch.device,
        reduce: Reduce | None = None,
    ) -> None:
        super().__init__(operator.shape, None, symmetric=True)
        self.operator, self.sketch, self.hvp = operator, sketch, hvp
        self.num_matvecs = 0
        self._param_dtype, self._device, self._reduce = param_dtype, device, reduce

    @property
    def dim(self) -> int:
        """N (exact) or D (sketched)."""
        return self.shape[0]

    def _rows(self, v: Tensor) -> Tensor:
        self.num_matvecs += v.shape[0]
        out = self.operator(v.to(dtype=self._param_dtype, device=self._device))
        if self._reduce is not None:
            out = self._reduce(out)
        return out.to(dtype=v.dtype, device=v.device)

    def release(self) -> None:
        """Free the cached graph of ∇L (``cache_graph=True``); later matvecs rebuild it."""
        if self.hvp is not None:
            self.hvp.clear()


def _layout(model: nn.Module, layout: Any) -> Any:
    return ParamLayout.from_module(model) if layout is None else layout


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def hessian_operator(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    sketch: Sketch | Mapping[str, Any] | None = None,
    *,
    layout: Any = None,
    method: HvpMethod = "double_backward",
    reduce: Reduce | None = None,
    cache_graph: bool = True,
) -> HessianOperator:
    """The exact (v ↦ H v) or sketched (v ↦ Φ H Φᵀ v) Hessian operator of the probe-set loss.

    Args:
        model: the module; its parameters are read, never written.
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses.
        batches: the fixed probe set (a list of batches; all matvecs see the same data).
        sketch: Φ (a Sketch or a spec dict) for the sketched operator; None for the exact one.
        layout: a :class:`~lightning_sketch.gradients.ParamLayout` (default: all trainable params).
        method: HVP method of :func:`lightning_sketch.gradients.make_hvp`.
        reduce: applied to every matvec output (e.g. a DDP all-reduce mean).
        cache_graph: with ``"double_backward"``, keep the graph of ∇L over the probe set between
            matvecs (each HVP is then one backward pass; the graph's memory is held until
            :meth:`HessianOperator.release` or a parameter change); see
            :class:`~lightning_sketch.gradients.HVPOperator`.

    Returns:
        A :class:`HessianOperator` counting its matvecs.

    Raises:
        SpectrumError: on an empty or non-list ``batches``.
        SketchConfigError: on a bad ``sketch``.
    """

    batches = _check_batches(batches)
    layout = _layout(model, layout)
    sk = resolve_sketch(sketch, layout.dim)
    hess = make_hvp(model, loss_fn, batches, layout=layout, method=method, cache_graph=cache_graph)
    op = hess if sk is None else sk.op @ hess @ sk.op.T  # eq. 10: Φ H Φᵀ
    device = next(iter(model.parameters())).device
    return HessianOperator(op, sk, hess, param_dtype=_param_dtype(model), device=device, reduce=reduce)


def probe_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    sketch: Sketch | Mapping[str, Any] | None = None,
    *,
    layout: Any = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """∇L over the probe set (``[N]``), or Φ∇L (``[D]``) when ``sketch`` is given (for alignment)."""

    batches = _check_batches(batches)
    layout = _layout(model, layout)
    sk = resolve_sketch(sketch, layout.dim)
    g = loss_grad(model, loss_fn, batches, layout=layout)
    if sk is not None:
        g = sk.apply(g)
    if reduce is not None:
        g = reduce(g)
    return g


@dataclass
class HessianEigs:
    """Top-k eigenpairs of the (sketched) probe-set Hessian.

    Attributes:
        eigenvalues: ``[k]`` float64, ordered by ``which``.
        eigenvectors: ``[k, N]`` (exact) or ``[k, D]`` (sketched: eigenvectors of Φ H Φᵀ) rows.
        residuals: ``[k]`` Ritz residual norms.
        converged: ``[k]`` bool flags (residual ≤ tol·|λ|).
        num_matvecs: HVPs spent.
        seconds: wall time.
        which: the selection rule used.
        sketch_spec: the sketch's spec, or None for the exact operator.
        ritz_values: ``[m]`` all Ritz values (ascending), e.g. the most negative for RNEG.
        ritz_residuals: ``[m]`` their residual norms.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    seconds: float
    which: str
    sketch_spec: dict[str, Any] | None
    ritz_values: Tensor = field(repr=False)
    ritz_residuals: Tensor = field(repr=False)


def hessian_eigs(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    k: int = 10,
    sketch: Sketch | Mapping[str, Any] | None = None,
    which: Which = "LA",
    num_iter: int | None = None,
    *,
    method: HvpMethod = "double_backward",
    layout: Any = None,
    seed: int = 0,
    v0: Tensor | None = None,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    reduce: Reduce | None = None,
    cache_graph: bool = True,
) -> HessianEigs:
    """Top-k eigenpairs of the Hessian of the probe-set loss, exact or sketched.

    arXiv 2402.03994, eq. 10; Sec. 5.5.

    Runs :func:`~lightning_sketch.linalg.lanczos` with full re-orthogonalisation on v ↦ H v
    (``sketch=None``) or on v ↦ Φ H Φᵀ v, storing only D-dimensional Krylov vectors.

    Args:
        model: the module (read only: parameters, ``.grad`` and mode are left as they are).
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-example losses; their mean over the probe
            batches is the loss whose Hessian is taken.
        batches: list of probe batches (fixed; every matvec sees all of them).
        k: number of eigenpairs.
        sketch: None (exact), a :class:`Sketch`, or a spec dict ``make(**spec)``.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        num_iter: Krylov steps (matvecs); default ``min(dim, max(4k, 40))``.
        method: HVP method (``"fwd_rev"``, ``"double_backward"``, ``"finite_difference"``).
        layout: a ParamLayout restricting the parameters (default: all trainable).
        seed: seed of the dedicated generator for the start vector (the global RNG is not used); the
            generator is seeded with ``derive_seed(seed, "hessian_eigs", "start")``, a stream of its own.
        v0: optional start vector (warm start), ``[N]`` or ``[D]``.
        tol: relative residual tolerance for ``converged``.
        dtype: Krylov-vector dtype (HVPs run in the parameters' dtype).
        reduce: applied to every matvec output (DDP all-reduce mean).
        cache_graph: keep the graph of ∇L between the HVPs of this call (``"double_backward"``
            only; freed before returning); see :func:`hessian_operator`.

    Returns:
        A :class:`HessianEigs`.

    Raises:
        SpectrumError: on ``k > dim``, a bad ``which`` or ``num_iter``, or empty ``batches``.
        SketchConfigError: on a sketch that does not match the model.
    """
    op = hessian_operator(
        model, loss_fn, batches, sketch, layout=layout, method=method, reduce=reduce, cache_graph=cache_graph
    )
    # A stream of its own (as the callbacks do): seeding with the raw user seed would make the start
    # vector equal torch.manual_seed(seed); torch.randn(N), correlated with the user's own draws.
    gen = torch.Generator().manual_seed(derive_seed(int(seed), "hessian_eigs", "start"))
    start = time.perf_counter()
    try:
        res = lanczos(op, k=k, num_iter=num_iter, which=which, generator=gen, dtype=dtype, v0=v0, tol=tol)
    finally:
        op.release()
    seconds = time.perf_counter() - start
    spec = op.sketch.spec if op.sketch is not None else None
    return HessianEigs(
        res.eigenvalues, res.eigenvectors, res.residuals, res.converged, op.num_matvecs, seconds, which, spec,
        res.ritz_values, res.ritz_residuals,
    )
