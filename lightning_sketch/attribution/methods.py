"""Attribution methods as argument objects: each holds exactly the arguments its method uses.

``Attributor(runs, model, method=Trak(damping_ratio=0.1))`` (the style of Kronfluence's argument
dataclasses). A string names the method with its defaults (``"trak"`` is ``Trak()``). Every object
checks its arguments when built and raises :class:`~lightning_sketch.exceptions.SketchConfigError`
naming the argument to change.

- ``GradDot(index)``: q·g at the last slice (q: the query's sketched gradient, g: a stored row).
- ``TracIn()``: Σ_c η_c q_c·g_c over the slices (Pruthi et al. 2020); ``GradCos()``: its cosine.
- ``Trak(damping, damping_ratio, rank)``: Σ_c q_cᵀ (K_c + λ_c I)⁻¹ g_c / C, K_c TRAK's kernel.
- ``FisherIF(damping, damping_ratio, rank)``: the same with the sampled-label Fisher as K_c.
- ``ArnoldiIF(k, eigenpairs | snapshot | hessian_batches)``: Σ_i λ_i⁻¹ (u_iᵀq)(u_iᵀg) over the
  top eigenpairs of Φ H Φᵀ at the last slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Union

from torch import Tensor

from lightning_sketch._checks import finite_positive, one_of, positive_int
from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.store.index import INDEX_KINDS

__all__ = [
    "METHODS",
    "ArnoldiIF",
    "AttributionMethod",
    "FisherIF",
    "GradCos",
    "GradDot",
    "TracIn",
    "Trak",
    "method_from_name",
]

#: the method names, as ``Attributor.method`` reports them and ``method=`` accepts them.
METHODS = ("grad_dot", "tracin", "grad_cos", "trak", "fisher_if", "arnoldi_if")


def _positive_real(owner: str, name: str, val: Any) -> None:
    """Refuse anything but ``None`` (automatic) or a finite real > 0 (``bool`` is not a number here)."""
    finite_positive(name, val, allow_none=True, hint=f"None is automatic; e.g. {owner}({name}=0.1).")


def _int_at_least(owner: str, name: str, val: Any, low: int, none_ok: bool) -> None:
    """Refuse anything but an ``int`` >= ``low`` (or ``None`` where ``none_ok``); ``bool`` is not an int."""
    positive_int(name, val, minimum=low, allow_none=none_ok, hint=f"It is an argument of {owner}.")


@dataclass(frozen=True)
class GradDot:
    """``grad_dot``: the dot product of the sketched gradients at the last slice.

    Args:
        index: FAISS index kind for single-run searches through the store's own index (one of
            :data:`~lightning_sketch.store.INDEX_KINDS`: ``"flat"`` exact; ``"ivf"``, ``"ivfpq"``,
            ``"hnsw"`` approximate, re-ranked exactly by the store). Ensembles stream exactly.
    """

    index: str = "flat"
    name: ClassVar[str] = "grad_dot"

    def __post_init__(self) -> None:
        one_of("index", self.index, INDEX_KINDS)


@dataclass(frozen=True)
class TracIn:
    """``tracin``: Σ_c η_c ⟨Φg_c(z), Φg_c(x)⟩ over the slices, η_c each slice's learning rate."""

    name: ClassVar[str] = "tracin"


@dataclass(frozen=True)
class GradCos:
    """``grad_cos``: the cosine of ``tracin``'s features (``tracin`` over both feature norms)."""

    name: ClassVar[str] = "grad_cos"


@dataclass(frozen=True)
class _Damped:
    """The arguments of a damped per-slice inverse (K_c + λ_c I)⁻¹, shared by ``Trak`` and ``FisherIF``.

    Args:
        damping: an absolute λ > 0 for every slice; ``None`` (default): λ_c = ``damping_ratio`` × the
            slice's unit (``Attributor.damping_unit``). Give ``damping`` or ``damping_ratio``, not both.
        damping_ratio: ρ > 0 of the automatic damping; ``None``: the default
            :data:`~lightning_sketch.attribution.damping.DEFAULT_DAMPING_RATIO` (10^-0.5).
        rank: keep the top ``rank`` eigen-directions of each slice's kernel,
            M = U_r diag(1/(s_r + λ)) U_rᵀ (the complement is dropped); ``None`` (default) keeps all D.
    """

    damping: float | None = None
    damping_ratio: float | None = None
    rank: int | None = None
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _positive_real(owner, "damping", self.damping)
        _positive_real(owner, "damping_ratio", self.damping_ratio)
        if self.damping is not None and self.damping_ratio is not None:
            raise SketchConfigError(
                f"{owner} takes an absolute `damping` or a `damping_ratio` of the automatic damping, not "
                f"both (got {self.damping!r} and {self.damping_ratio!r}); drop one."
            )
        positive_int("rank", self.rank, allow_none=True,
                     hint=f"None keeps the full D-dimensional inverse; e.g. {owner}(rank=50).")


@dataclass(frozen=True)
class Trak(_Damped):
    """``trak`` (Park et al. 2023): Σ_c q_cᵀ (K_c + λ_c I)⁻¹ g_c / C, K_c the kernel of the sketched
    margin gradients gathered during fit (GᵀG of the stored rows where a run holds none).

    Args: ``damping``, ``damping_ratio``, ``rank`` as described on the shared base (all optional).
    """

    name: ClassVar[str] = "trak"


@dataclass(frozen=True)
class FisherIF(_Damped):
    """``fisher_if``: influence functions with the sketched sampled-label Fisher as K_c
    (``GradientSketch(curvature="fisher")``); the same arguments as :class:`Trak`."""

    name: ClassVar[str] = "fisher_if"


@dataclass(frozen=True, eq=False)
class ArnoldiIF:
    """``arnoldi_if`` (Schioppa et al. 2022): Σ_i λ_i⁻¹⟨u_i, q⟩⟨u_i, g⟩ over the top eigenpairs of
    the sketched Hessian Φ H Φᵀ at the last slice; one run only.

    Give at most one source of eigenpairs (the Attributor raises
    :class:`~lightning_sketch.exceptions.SpectrumError` when it gets none). Objects compare by
    identity (the eigenpairs are tensors).

    Args:
        k: eigenpairs computed from ``hessian_batches`` (int >= 1).
        eigenpairs: ``(eigenvalues [k], eigenvectors [D, k])`` (``[k, D]`` rows are accepted too).
        snapshot: a spectrum snapshot file (``HessianSpectrum``) to read them from.
        hessian_batches: probe batches to compute them on at the last slice's weights (kept as a tuple).
    """

    k: int = 20
    eigenpairs: tuple[Tensor, Tensor] | None = None
    snapshot: str | Path | None = None
    hessian_batches: Sequence[Any] | None = None
    name: ClassVar[str] = "arnoldi_if"

    def __post_init__(self) -> None:
        _int_at_least("ArnoldiIF", "k", self.k, 1, none_ok=False)
        if self.eigenpairs is not None and (
            not isinstance(self.eigenpairs, (tuple, list)) or len(self.eigenpairs) != 2
        ):
            raise SketchConfigError(
                "`eigenpairs` of ArnoldiIF must be a pair (eigenvalues [k], eigenvectors [D, k]), got "
                f"{type(self.eigenpairs).__name__}."
            )
        if self.snapshot is not None and not isinstance(self.snapshot, (str, Path)):
            raise SketchConfigError(
                f"`snapshot` of ArnoldiIF must be a path, got {type(self.snapshot).__name__}."
            )
        if self.hessian_batches is not None:
            if isinstance(self.hessian_batches, (str, bytes, Tensor, dict)):
                raise SketchConfigError(
                    "`hessian_batches` of ArnoldiIF must be a sequence of batches (e.g. [batch]), got a "
                    f"{type(self.hessian_batches).__name__}."
                )
            object.__setattr__(self, "hessian_batches", tuple(self.hessian_batches))
            if not self.hessian_batches:
                raise SketchConfigError("`hessian_batches` of ArnoldiIF is empty; pass at least one batch.")
        given = [n for n in ("eigenpairs", "snapshot", "hessian_batches") if getattr(self, n) is not None]
        if len(given) > 1:
            raise SketchConfigError(
                f"ArnoldiIF takes one source of eigenpairs, got {given}; keep one of them."
            )


AttributionMethod = Union[GradDot, TracIn, GradCos, Trak, FisherIF, ArnoldiIF]

_BY_NAME: dict[str, type[Any]] = {c.name: c for c in (GradDot, TracIn, GradCos, Trak, FisherIF, ArnoldiIF)}


def method_from_name(name: str, **kwargs: Any) -> AttributionMethod:
    """The method object of ``name`` (one of :data:`METHODS`) built from ``kwargs``.

    Raises:
        SketchConfigError: for an unknown name, or an argument the method does not take (the
            message lists the ones it does).
    """
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise SketchConfigError(f"`method` must be 'auto' or one of {METHODS}, got {name!r}.")
    allowed = [f.name for f in fields(cls)]
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise SketchConfigError(
            f"method={name!r} does not use {extra}; it takes {allowed or 'no arguments'}."
        )
    out: AttributionMethod = cls(**kwargs)
    return out
