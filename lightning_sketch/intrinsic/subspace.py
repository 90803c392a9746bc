"""Subspace training θ = θ0 + Φᵀω (Li et al. 2018; arXiv 2402.03994, the implicit form of eq. 10).

:meth:`Subspace.attach` reparametrises every trainable tensor of a module with
``torch.nn.utils.parametrize`` so that its value is its frozen starting point θ0 plus its slice of
ONE global projection of ω ∈ R^D over the flattened model (not one projection per layer), and ω
(plus, with SAID, one scalar per tensor) becomes the only trainable tensor. The module keeps
working as before: ``module(x)``, ``module.parameters()`` (so an ordinary optimiser over
``self.parameters()`` trains ω; θ0 has ``requires_grad=False``), ``state_dict``, ``.to()`` and
``torch.func.functional_call``.

- Φ is any sketch kind (default ``qk``, as the callback), rebuilt from its ``spec`` (seed), so a
  checkpoint holds θ0, ω, the spec and the active size, never an N×D matrix. The spec and the
  active size travel in the module's ``state_dict`` as the subspace's extra state.
- By default θ = θ0 + Φᵀω exactly (paper eq. 10), so ∇_ω L = Φ ∇_θ L. ``normalize=True``
  multiplies Φᵀω by √(D/N), so the columns of the N×D map have unit norm on average, as in Li et
  al. (a step in ω then moves θ by the same length, which sets the learning-rate scale); the
  :class:`~lightning_sketch.callbacks.IntrinsicDimension` callback uses it by default.
- SAID (Aghajanyan et al. 2021, structure-aware intrinsic dimension): θ_i = θ0_i + λ_i (Φᵀω)_i with
  one learned λ per tensor, initialised to 1. The m scalars count inside D: ω has D − m
  coordinates, so the trainable count at active size d is exactly d.
- Masking (arXiv 2402.03994, Listing 9): coordinates of ω beyond the active size get zero gradient
  and keep their value. It is done in the forward as ``where(mask, ω, ω.detach())`` rather than with a tensor
  hook, so it survives ``deepcopy``, DDP and ``functional_call`` unchanged.
- The subspace is registered as the last child of the module (``module.intrinsic_subspace``); its
  ``forward`` is the identity so that an ``nn.Sequential`` root still computes the same function
  (its ``len`` grows by one).
- Φᵀω is computed once per call of a hooked module (the attached root or any submodule holding
  reparametrised tensors) and shared by all tensors in that forward; outside a forward, each
  access computes it afresh.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sketch._checks import boolean, integer
from lightning_sketch.exceptions import SketchConfigError, SubspaceError, UnsupportedModelError
from lightning_sketch.layout import ParamLayout
from lightning_sketch.linalg import FunctionOperator, LinearOperator
from lightning_sketch.sketches import Sketch, make

__all__ = ["ATTR", "Subspace"]

#: attribute under which the subspace is registered on the attached module.
ATTR = "intrinsic_subspace"


class _Offset(nn.Module):
    """Parametrisation of tensor ``index``: θ_i = θ0_i + (λ_i ·) slice_i(Φᵀω)."""

    _sub: Subspace

    def __init__(self, sub: Subspace, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_sub", sub)  # not a submodule: ω must appear once in state_dict
        self.index = index

    def forward(self, original: Tensor) -> Tensor:
        return original + self._sub._delta(self.index).to(original.dtype)


class Subspace(nn.Module):
    """The trainable subspace ω of a module reparametrised as θ = θ0 + Φᵀω (build with :meth:`attach`).

    Attributes:
        omega: ``[D - m]`` trainable coordinates (m = number of tensors with SAID, else 0).
        said_scale: ``[m]`` SAID scalars (``None`` without SAID).
        sketch: the projection Φ: R^N → R^(D-m), rebuilt from ``spec``.
        layout: the reparametrised tensors (names, shapes, offsets in θ ∈ R^N).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> before = net(x)
        >>> sub = Subspace.attach(net, kind="dense", sketch_dim=16, seed=0)
        >>> torch.equal(net(x), before)  # ω = 0 gives back θ0 bit for bit
        True
        >>> [n for n, p in net.named_parameters() if p.requires_grad]
        ['intrinsic_subspace.omega']
        >>> sub.set_active(4); sub.num_trainable
        4
    """

    active_mask: Tensor  # registered buffer, [D - m] bool

    def __init__(
        self,
        layout: ParamLayout,
        sketch: Sketch,
        said: bool,
        normalize: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.sketch = sketch
        self.said = said
        self.normalize = normalize
        m = len(layout.names) if said else 0
        self.omega = nn.Parameter(torch.zeros(sketch.sketch_dim, dtype=dtype, device=device))
        self.said_scale = nn.Parameter(torch.ones(m, dtype=dtype, device=device)) if said else None
        self.register_buffer(
            "active_mask", torch.ones(sketch.sketch_dim, dtype=torch.bool, device=device), persistent=False
        )
        self._scale = math.sqrt(sketch.sketch_dim / layout.dim) if normalize else 1.0
        self._active = sketch.sketch_dim + m
        self._owner: list[nn.Module] = []  # plain list: the root is not a child of its subspace
        self._handles: list[Any] = []
        self._scope: int | None = None  # id() of the module whose forward opened the cache scope
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None
        #: Φᵀω split into the tensors' pieces, cached with ``_cache`` (one autograd split node)
        self._pieces: tuple[Tensor, tuple[Tensor, ...]] | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def attach(
        cls,
        module: nn.Module,
        kind: str = "qk",
        sketch_dim: int = 1024,
        seed: int = 0,
        said: bool = False,
        normalize: bool = True,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        **options: Any,
    ) -> Subspace:
        """Reparametrise ``module``'s trainable tensors as θ = θ0 + Φᵀω; ω ∈ R^D starts at 0.

        Args:
            module: any ``nn.Module``; its trainable parameters (filtered by ``include``/``exclude``
                fnmatch patterns) make up θ ∈ R^N, flattened in ``named_parameters()`` order.
            kind: sketch kind of Φ (see :func:`lightning_sketch.sketches.make`).
            sketch_dim: D, the number of trainable scalars (ω, plus the SAID scalars), D_max of a search.
            seed: seed of Φ; the same seed gives the same Φ in every process.
            said: add one learned scalar per tensor (structure-aware intrinsic dimension).
            normalize: scale Φᵀ by √(D/N) for unit-norm columns (Li et al.), so a step in ω moves θ
                about as far whatever N and D are; the default, as in the IntrinsicDimension
                callback. False uses Φᵀ as is.
            include: keep only parameters whose names match one of these patterns.
            exclude: drop parameters matching one of these patterns.
            **options: kind-specific sketch options.

        Returns:
            The :class:`Subspace`, also registered as ``module.intrinsic_subspace``.

        Raises:
            SubspaceError: if ``module`` already has a subspace or user parametrisations, or
                ``sketch_dim`` leaves no ω coordinate after the SAID scalars.
            UnsupportedModelError: if a selected parameter is shared by several modules (tied weights).
            SketchConfigError: for an invalid kind, dimension or option (from the sketch; with SAID
                the message names the sketch's own size, ``sketch_dim - m``).
        """
        if not isinstance(module, nn.Module):
            raise SubspaceError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        if cls.of(module) is not None:
            raise SubspaceError(
                f"{type(module).__name__} already has a subspace attached; call `.detach()` on "
                f"`module.{ATTR}` first, or attach to a fresh copy of the model."
            )
        boolean("said", said, error=SubspaceError)
        boolean("normalize", normalize, error=SubspaceError)
        layout = ParamLayout.from_module(module, include=include, exclude=exclude)
        if any("parametrizations." in n for n in layout.names):
            raise SubspaceError(
                "`module` already carries torch parametrisations on selected parameters; remove them or "
                "exclude those parameters with `exclude=['*parametrizations*']`."
            )
        all_names: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            all_names.setdefault(id(p), []).append(name)
        tied = [names for names in all_names.values() if len(names) > 1 and set(names) & set(layout.names)]
        if tied:
            # the layout lists a shared tensor once, under its first name: leaving that name out suffices
            shared = [n for names in tied for n in names if n in layout.names]
            given = [] if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)
            raise UnsupportedModelError(
                f"Tied (shared) parameters {tied} cannot be reparametrised independently (one tensor would "
                f"get two offsets). Leave the shared tensor out of the subspace with "
                f"exclude={given + shared!r} (IntrinsicDimension(exclude=...) or "
                "Subspace.attach(exclude=...)), or untie the weights."
            )
        m = len(layout.names) if said else 0
        integer("sketch_dim", sketch_dim, minimum=m + 1, error=SubspaceError,
                hint=f"It must exceed the {m} SAID scalar(s): raise it or set said=False.")
        try:
            sketch = make(kind, layout.dim, sketch_dim - m, seed=seed, **options)
        except SketchConfigError as err:
            if not m:
                raise
            raise SketchConfigError(
                f"{err} (With said=True the projection has sketch_dim - m = {sketch_dim} - {m} coordinates, "
                f"m = number of tensors; choose sketch_dim so that the difference fits the kind.)"
            ) from err
        params = dict(module.named_parameters())
        first = params[layout.names[0]]
        sub = cls(layout, sketch, said, normalize, first.dtype, first.device)
        module.add_module(ATTR, sub)
        sub._owner.append(module)
        hooked = {""}
        for i, name in enumerate(layout.names):
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path)
            parametrize.register_parametrization(owner, attr, _Offset(sub, i), unsafe=True)
            plist = cast(nn.ModuleDict, owner.parametrizations)[attr]
            cast(parametrize.ParametrizationList, plist).original.requires_grad_(False)
            parts = path.split(".") if path else []
            hooked.update(".".join(parts[:k]) for k in range(len(parts) + 1))
        for path in sorted(hooked):
            mod = module.get_submodule(path)
            sub._handles.append(mod.register_forward_pre_hook(sub._open_scope))
            sub._handles.append(mod.register_forward_hook(sub._close_scope, always_call=True))
        return sub

    @staticmethod
    def of(module: nn.Module) -> Subspace | None:
        """The subspace attached to ``module``, or ``None``."""
        sub = getattr(module, ATTR, None) if isinstance(module, nn.Module) else None
        return sub if isinstance(sub, Subspace) else None

    # ----------------------------------------------------------------- forward machinery
    def forward(self, x: Any) -> Any:
        """Identity, so that containers iterating over their children (``nn.Sequential``) pass through."""
        return x

    def _open_scope(self, mod: nn.Module, args: Any) -> None:
        if self._scope is None:
            self._scope, self._cache, self._pieces = id(mod), None, None

    def _close_scope(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self._scope == id(mod):
            self._scope, self._cache, self._pieces = None, None, None

    def _omega_eff(self) -> Tensor:
        if bool(self.active_mask.all()):
            return self.omega
        return torch.where(self.active_mask, self.omega, self.omega.detach())

    def _full_delta(self) -> Tensor:
        """Φᵀω (times √(D/N) when normalised): ``[N]``, cached for the current forward scope."""
        key = (id(self.omega), self.omega._version, self._active, torch.is_grad_enabled())
        if self._scope is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        delta = self.lift_operator()(self._omega_eff())
        if self._scope is not None:
            self._cache = (key, delta)
        return delta

    def lift_operator(self) -> LinearOperator:
        """P with θ = θ0 + Pω before SAID scalars: Φᵀ, or √(D/N)·Φᵀ when normalised (``[N, D]``)."""
        sk = self.sketch  # read at each call (not cached): Φᵀ goes through sketch.transpose
        lift = FunctionOperator((self.layout.dim, sk.sketch_dim), sk.transpose, lambda v: sk.apply(v))
        return lift * self._scale if self._scale != 1.0 else lift

    def _delta(self, index: int) -> Tensor:
        lay = self.layout
        full = self._full_delta()
        # One split of Φᵀω per forward scope, not one slice per tensor: the backward of a slice
        # zero-fills a whole [N] gradient, so per-tensor slices cost O(N · #tensors) per step
        # (22.7M × 103 floats written per step for MiniLM), a split's backward one concatenation.
        if self._pieces is None or self._pieces[0] is not full:
            self._pieces = (full, full.split(list(lay.numels)))
        piece = self._pieces[1][index].view(lay.shapes[index])
        if self.said_scale is not None:
            piece = piece * self.said_scale[index]
        return piece

    def delta(self) -> Tensor:
        """θ − θ0 as one flat ``[N]`` tensor in layout order (SAID scalars applied)."""
        if self.said_scale is None:
            return self._full_delta()
        opened = self._scope is None
        if opened:  # one Φᵀω for all slices
            self._scope, self._cache, self._pieces = id(self), None, None
        try:
            return torch.cat([self._delta(i).reshape(-1) for i in range(len(self.layout.names))])
        finally:
            if opened:
                self._scope, self._cache, self._pieces = None, None, None

    # ----------------------------------------------------------------- public API
    @property
    def sketch_dim(self) -> int:
        """D: ω coordinates plus SAID scalars."""
        return self.sketch.sketch_dim + (len(self.layout.names) if self.said else 0)

    @property
    def active(self) -> int:
        """The active size d (SAID scalars included)."""
        return self._active

    @property
    def num_trainable(self) -> int:
        """Scalars that receive a gradient: the active ω coordinates plus the SAID scalars (= d)."""
        return self._active

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable ``{"sketch", "said", "normalize", "active", "layout"}``.

        Φ is ``make(**spec["sketch"])``.
        """
        return {
            "sketch": self.sketch.spec,
            "said": self.said,
            "normalize": self.normalize,
            "active": self._active,
            "layout": self.layout.fingerprint(),
        }

    def set_active(self, d: int) -> None:
        """Train only the first d scalars: ω coordinates beyond ``d - m`` get zero gradient, values kept.

        Raises:
            SubspaceError: unless ``m < d <= D`` (m = number of SAID scalars, 0 without SAID).
        """
        m = self.sketch_dim - self.sketch.sketch_dim
        integer("d", d, minimum=m + 1, maximum=self.sketch_dim, error=SubspaceError,
                hint=f"The upper bound is D = sketch_dim{', SAID scalars included' if m else ''}.")
        self._active = d
        self.active_mask.copy_(torch.arange(self.sketch.sketch_dim, device=self.active_mask.device) < d - m)
        self._cache, self._pieces = None, None

    def projection_checksum(self) -> str:
        """sha256 of the spec and of Φᵀ applied to a fixed probe vector; equal on every rank iff Φ is."""
        g = torch.Generator().manual_seed(20240203)
        probe = torch.randn(self.sketch.sketch_dim, generator=g, dtype=torch.float64)
        out = self.sketch.transpose(probe).numpy().tobytes()
        h = hashlib.sha256(json.dumps(self.sketch.spec, sort_keys=True).encode())
        h.update(out)
        return h.hexdigest()

    def detach(self) -> nn.Module:
        """Write θ0 + Φᵀω back into ordinary trainable parameters and remove the reparametrisation.

        Returns:
            The module, which then trains normally (its parameters have ``requires_grad=True``).

        Raises:
            SubspaceError: if this subspace was already detached.
        """
        if not self._owner:
            raise SubspaceError("This subspace was already detached; attach a new one with Subspace.attach.")
        root = self._owner[0]
        with torch.no_grad():
            self._scope, self._cache, self._pieces = id(self), None, None  # one Φᵀω for all tensors
            values = {}
            for name in self.layout.names:
                path, _, attr = name.rpartition(".")
                values[name] = getattr(root.get_submodule(path), attr).detach().clone()
            self._scope, self._cache, self._pieces = None, None, None
            for name in self.layout.names:
                path, _, attr = name.rpartition(".")
                owner = root.get_submodule(path)
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
                getattr(owner, attr).copy_(values[name]).requires_grad_(True)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        delattr(root, ATTR)
        self._owner.clear()
        return root

    # ----------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def set_extra_state(self, state: Any) -> None:
        spec = state.get("spec", {}) if isinstance(state, dict) else {}
        mine = self.spec
        for key in ("sketch", "said", "normalize", "layout"):
            if spec.get(key) != mine[key]:
                raise SubspaceError(
                    f"Checkpoint subspace `{key}` = {spec.get(key)!r} differs from the attached one "
                    f"{mine[key]!r}; attach with the checkpoint's kind, sketch_dim, seed and options."
                )
        self.set_active(int(spec["active"]))

    def extra_repr(self) -> str:
        return (
            f"N={self.layout.dim}, D={self.sketch_dim}, active={self._active}, "
            f"kind={self.sketch.kind!r}, said={self.said}"
        )
