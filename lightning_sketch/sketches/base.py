"""The :class:`Sketch` contract: an immutable random linear map Φ: R^N → R^D.

Shape letters: N = ``dim`` (parameters), D = ``sketch_dim``, B = batch of vectors.
Rows are vectors: :meth:`Sketch.apply` maps ``[..., N] -> [..., D]`` (x ↦ Φx) and
:meth:`Sketch.transpose` maps ``[..., D] -> [..., N]`` (y ↦ Φᵀy).

A sketch is fully determined by its :attr:`Sketch.spec` (kind, dim, sketch_dim, seed, options),
a plain JSON-serialisable dict with ``make(**spec)`` rebuilding a bit-identical map. All random
draws come from dedicated CPU generators whose seeds are hashed from (library tag, kind, seed,
stream), so the same spec gives the same Φ on every device and in every process, and ``seed=0``
does not replay ``torch.manual_seed(0)`` (docs/design.md, "Seeds").
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch._checks import integer, positive_int
from lightning_sketch.exceptions import SketchConfigError, SketchInputError
from lightning_sketch.linalg import LinearOperator

__all__ = ["Sketch", "derive_seed", "next_pow2"]

_LIBRARY_TAG = "lightning_sketch/v1"


def derive_seed(seed: int, kind: str, stream: str) -> int:
    """A 63-bit generator seed hashed from the user's seed, the sketch kind and a stream name.

    Hashing (not ``seed + 1000 * i`` arithmetic) keeps every stream independent and keeps sketch
    randomness uncorrelated with the user's own ``torch.manual_seed`` streams.

    Example:
        >>> derive_seed(0, "affd", "signs") == derive_seed(0, "affd", "signs")
        True
        >>> derive_seed(0, "affd", "signs") != derive_seed(1, "affd", "signs")
        True
    """
    digest = hashlib.blake2b(f"{_LIBRARY_TAG}/{kind}/{int(seed)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n``.

    Example:
        >>> next_pow2(1000), next_pow2(1024)
        (1024, 1024)
    """
    return 1 << max(0, math.ceil(math.log2(n))) if n > 1 else 1


class Sketch(ABC):
    """Random linear map Φ: R^N → R^D, fully determined by ``spec``.

    Subclasses set ``kind``, declare their options with defaults in ``OPTIONS``, build their
    persistent random state in ``_build`` (CPU tensors from :meth:`generator`), and implement
    ``_apply`` on a 2-D ``[B, N]`` tensor. ``_transpose`` defaults to the vector-Jacobian product
    of ``_apply`` (the exact adjoint, docs/design.md); subclasses may override it with a
    hand-written transpose, which the adjoint test then guards.

    Args:
        dim: N, the input dimension (e.g. the flattened parameter count).
        sketch_dim: D, the output dimension, ``1 <= D <= N`` unless the kind says otherwise.
        seed: any int; equal seeds give bit-identical maps.
        **options: kind-specific options (see each class's ``OPTIONS``); unknown names raise.

    Raises:
        SketchConfigError: on a non-int or non-positive ``dim``/``sketch_dim``, ``D > N``,
            or an unknown option.
    """

    kind: ClassVar[str] = "abstract"
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: kinds whose D may exceed N (none by default).
    ALLOW_EXPANSION: ClassVar[bool] = False
    #: capability: Φ is block diagonal over parameter tensors with Kronecker blocks (exposed as
    #: ``blocks``, one per tensor of the layout, and the option ``shapes``), so per-example
    #: sketches can be formed inside backward hooks without per-example gradients
    #: (``sketch_gradients(mode="factorized")``, the LoGra factorisation of Choe et al. 2024).
    supports_factorized: ClassVar[bool] = False

    # Instance state, set once in ``__init__``/``_build`` through ``object.__setattr__`` (the
    # instance is frozen afterwards); declared here for the type checker.
    _dim: int
    _sketch_dim: int
    _seed: int
    _options: dict[str, Any]
    _cache: dict[Any, Any]
    _frozen: bool

    @classmethod
    def layout_options(cls, layout: Any) -> dict[str, Any]:
        """Options this kind takes from a :class:`~lightning_sketch.layout.ParamLayout` (none by default).

        Lets a caller that knows only the kind and the layout build the sketch,
        ``make(kind, layout.dim, D, seed, **sketch_class(kind).layout_options(layout))``, without
        special-casing kinds by name.
        """
        return {}

    def __init__(self, dim: int, sketch_dim: int, seed: int = 0, **options: Any) -> None:
        dim = positive_int("dim", dim)
        sketch_dim = positive_int("sketch_dim", sketch_dim)
        seed = integer("seed", seed)
        if sketch_dim > dim and not self.ALLOW_EXPANSION:
            raise SketchConfigError(
                f"`sketch_dim` must be <= `dim` (got {sketch_dim} > {dim}); lower `sketch_dim` "
                f"or use kind='identity' for an exact, unprojected reference."
            )
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            known = ", ".join(sorted(self.OPTIONS)) or "none"
            raise SketchConfigError(
                f"Unknown option(s) {unknown} for sketch kind {self.kind!r}; known options: {known}."
            )
        opts = {**self.OPTIONS, **options}
        object.__setattr__(self, "_dim", dim)
        object.__setattr__(self, "_sketch_dim", sketch_dim)
        object.__setattr__(self, "_seed", int(seed))
        object.__setattr__(self, "_options", opts)
        object.__setattr__(self, "_cache", {})
        self._validate_options(opts)
        self._build()
        object.__setattr__(self, "_frozen", True)

    # ----------------------------------------------------------------- immutability
    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable; build a new sketch with make(...).")
        object.__setattr__(self, name, value)

    def _set(self, name: str, value: Any) -> None:
        """Set persistent state during ``_build`` (before the object is frozen)."""
        object.__setattr__(self, name, value)

    # ----------------------------------------------------------------- subclass hooks
    def _validate_options(self, options: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Check kind-specific options; raise :class:`SketchConfigError` with a fix."""

    @abstractmethod
    def _build(self) -> None:
        """Draw the persistent random state from :meth:`generator` streams (CPU)."""

    @abstractmethod
    def _apply(self, x: Tensor) -> Tensor:
        """``[B, N] -> [B, D]`` in ``x``'s dtype and device."""

    def _transpose(self, y: Tensor) -> Tensor:
        """``[B, D] -> [B, N]``: the exact adjoint, by the VJP of the linear map ``_apply``."""
        zeros = torch.zeros(y.shape[0], self.dim, dtype=y.dtype, device=y.device)
        vjp_fn = torch.func.vjp(self._apply, zeros)[1]
        return vjp_fn(y)[0]

    def _state_tensors(self) -> dict[str, Tensor]:
        """The persistent tensors (their bytes make :attr:`state_bytes`)."""
        return {}

    # ----------------------------------------------------------------- public API
    @property
    def dim(self) -> int:
        """N, the input dimension."""
        return self._dim

    @property
    def sketch_dim(self) -> int:
        """D, the output dimension."""
        return self._sketch_dim

    @property
    def seed(self) -> int:
        """The user seed (generator seeds are hashed from it)."""
        return self._seed

    @property
    def options(self) -> dict[str, Any]:
        """Kind-specific options with defaults filled in (a copy)."""
        return dict(self._options)

    @property
    def spec(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; ``make(**spec)`` rebuilds the identical map."""
        return {
            "kind": self.kind, "dim": self.dim, "sketch_dim": self.sketch_dim, "seed": self.seed,
            **self.options,
        }

    @property
    def state_bytes(self) -> int:
        """Persistent memory of the map's random state, in bytes (caches of dtype copies excluded)."""
        return int(sum(t.numel() * t.element_size() for t in self._state_tensors().values()))

    def generator(self, stream: str) -> torch.Generator:
        """A fresh CPU generator for the named random stream of this sketch."""
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, self.kind, stream))
        return g

    def state(self, name: str, like: Tensor) -> Tensor:
        """Persistent tensor ``name`` on ``like``'s device (floating state in ``like``'s dtype), cached."""
        base = self._state_tensors()[name]
        dtype = like.dtype if base.is_floating_point() else base.dtype
        key = (name, like.device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = base.to(device=like.device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def _check(self, x: Tensor, last: int, name: str, what: str) -> None:
        if not isinstance(x, Tensor):
            raise SketchInputError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point() or x.is_complex():
            raise SketchInputError(
                f"`{name}` must be a real floating tensor, got dtype {x.dtype}; cast it with `.float()`."
            )
        if x.ndim == 0 or x.shape[-1] != last:
            raise SketchInputError(
                f"`{name}` must have last dimension {what} = {last} for {self!r}, got shape {tuple(x.shape)}."
            )

    def apply(self, x: Tensor) -> Tensor:
        """Φx for every row: ``[..., N] -> [..., D]``, same dtype and device as ``x``.

        Raises:
            SketchInputError: if ``x`` is not a real floating tensor with last dimension N.
        """
        self._check(x, self.dim, "x", "dim (N)")
        lead = x.shape[:-1]
        out = self._apply(x.reshape(-1, self.dim))
        return out.reshape(*lead, self.sketch_dim)

    def transpose(self, y: Tensor) -> Tensor:
        """Φᵀy for every row: ``[..., D] -> [..., N]``, same dtype and device as ``y``.

        Raises:
            SketchInputError: if ``y`` is not a real floating tensor with last dimension D.
        """
        self._check(y, self.sketch_dim, "y", "sketch_dim (D)")
        lead = y.shape[:-1]
        out = self._transpose(y.reshape(-1, self.sketch_dim))
        return out.reshape(*lead, self.dim)

    @property
    def op(self) -> LinearOperator:
        """Φ as a :class:`~lightning_sketch.linalg.LinearOperator` of shape ``(D, N)``; ``op.T`` is Φᵀ.

        The same object on every access, so ``s.op @ H @ s.op.T`` is recognised as symmetric.

        Example:
            >>> import torch
            >>> from lightning_sketch.sketches import make
            >>> s = make("dense", dim=6, sketch_dim=3, seed=0)
            >>> x = torch.randn(6, dtype=torch.float64)
            >>> s.op.shape, torch.equal(s.op @ x, s.apply(x))
            ((3, 6), True)
        """
        op = self._cache.get("operator")
        if op is None:
            op = _SketchOperator(self)
            self._cache["operator"] = op
        return op

    def to_dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The ``[D, N]`` matrix of Φ, by applying it to the identity (small N only; for tests)."""
        eye = torch.eye(self.dim, dtype=dtype)
        return self.apply(eye).T.contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sketch) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.spec.items())))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(dim={self.dim}, sketch_dim={self.sketch_dim}, seed={self.seed}{opts})"


class _SketchOperator(LinearOperator):
    """Φ of a sketch as a linear operator: rows through ``apply``, the adjoint through ``transpose``."""

    def __init__(self, sketch: Sketch) -> None:
        super().__init__((sketch.sketch_dim, sketch.dim))
        self.sketch = sketch

    def _rows(self, v: Tensor) -> Tensor:
        return self.sketch.apply(v)

    def _adjoint_rows(self, w: Tensor) -> Tensor:
        return self.sketch.transpose(w)

    def __repr__(self) -> str:
        return f"Φ[{self.sketch!r}]"
