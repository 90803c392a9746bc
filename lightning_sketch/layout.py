"""The flattened parameter vector θ ∈ R^N of a model: which tensors, in which order (arXiv 2402.03994,
Listings 6-7: the whole model, flattened).

The paper sketches the **whole model as one flattened vector**; this module fixes that vector:
the trainable parameters of ``module.named_parameters()`` (shared tensors listed once), in that
order, each flattened row-major and concatenated. ``include``/``exclude`` fnmatch patterns select a
subset (e.g. ``exclude=["*norm*"]``); per-layer sketching (kind ``per_layer``) uses the same blocks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sketch.exceptions import LayoutMismatchError, SketchConfigError, SketchInputError

__all__ = ["ParamLayout"]


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise SketchConfigError(f"`{name}` must be None, a str or a list of str patterns, got {value!r}.")
    return tuple(value)


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the parameters that make up θ ∈ R^N, in flattening order.

    Attributes:
        names: parameter names as in ``module.named_parameters()``.
        shapes: their shapes.
        numels: elements per tensor.
        offsets: start of each tensor in the flat vector (``offsets[i] + numels[i] = offsets[i+1]``).
        dim: N, the total number of elements.

    Example:
        >>> import torch
        >>> layout = ParamLayout.from_module(torch.nn.Linear(3, 2))
        >>> layout.names, layout.dim
        (('weight', 'bias'), 8)
        >>> v = torch.arange(8.0)
        >>> torch.equal(layout.flatten(layout.unflatten(v)), v)
        True
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...] = field(init=False)
    offsets: tuple[int, ...] = field(init=False)
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(s) for s in shape) for shape in self.shapes)
        if len(names) != len(shapes):
            raise SketchConfigError(f"`names` and `shapes` differ in length ({len(names)} != {len(shapes)}).")
        if not names:
            raise SketchConfigError("A ParamLayout needs at least one parameter; got none.")
        if len(set(names)) != len(names):
            raise SketchConfigError(f"`names` must be unique, got {list(names)}.")
        numels = tuple(math.prod(s) for s in shapes)
        offsets = tuple(sum(numels[:i]) for i in range(len(numels)))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "dim", int(sum(numels)))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> ParamLayout:
        """The trainable parameters of ``module`` in ``named_parameters()`` order.

        Args:
            module: any ``nn.Module``.
            include: fnmatch patterns; if given, keep only names matching one of them.
            exclude: fnmatch patterns; drop names matching one of them (applied after ``include``).

        Raises:
            SketchConfigError: if the patterns are malformed or select no trainable parameter.
        """
        if not isinstance(module, nn.Module):
            raise SketchConfigError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        inc, exc = _patterns("include", include), _patterns("exclude", exclude)
        names, shapes = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if inc is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in inc):
                continue
            if exc is not None and any(fnmatch.fnmatchcase(name, pat) for pat in exc):
                continue
            names.append(name)
            shapes.append(tuple(p.shape))
        if not names:
            raise SketchConfigError(
                f"No trainable parameter of {type(module).__name__} matches include={include!r}, "
                f"exclude={exclude!r}; check the patterns against `[n for n, _ in "
                f"module.named_parameters()]`."
            )
        return cls(tuple(names), tuple(shapes))

    # ----------------------------------------------------------------- (un)flattening
    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors in layout order: each ``[*lead, *shape]`` -> ``[*lead, N]``.

        Args:
            tensors: a dict keyed by the layout's names (extra keys ignored) or a sequence in
                layout order. All must share the same leading (batch) dimensions ``lead``.

        Raises:
            SketchInputError: on a missing name, a wrong count or a shape mismatch.
        """
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise SketchInputError(f"`tensors` lacks layout parameter(s) {missing}.")
            parts = [tensors[n] for n in self.names]
        else:
            parts = list(tensors)
            if len(parts) != len(self.names):
                raise SketchInputError(
                    f"`tensors` must hold {len(self.names)} tensors in layout order, got {len(parts)}."
                )
        lead = None
        flat = []
        for name, shape, t in zip(self.names, self.shapes, parts):
            nd = t.ndim - len(shape)
            if nd < 0 or tuple(t.shape[nd:]) != shape:
                raise SketchInputError(
                    f"Tensor for `{name}` must end with shape {shape}, got {tuple(t.shape)}."
                )
            if lead is None:
                lead = tuple(t.shape[:nd])
            elif tuple(t.shape[:nd]) != lead:
                raise SketchInputError(
                    f"Tensor for `{name}` has leading dims {tuple(t.shape[:nd])}, expected {lead} like the "
                    f"first."
                )
            flat.append(t.reshape(*lead, -1))
        return torch.cat(flat, dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split ``[..., N]`` into a dict of ``[..., *shape]`` views, in layout order.

        Raises:
            SketchInputError: if the last dimension is not N.
        """
        if not isinstance(vec, Tensor) or vec.ndim == 0 or vec.shape[-1] != self.dim:
            shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
            raise SketchInputError(f"`vec` must have last dimension N = {self.dim}, got {shape}.")
        lead = vec.shape[:-1]
        parts = torch.split(vec, list(self.numels), dim=-1)
        return {n: p.reshape((*lead, *s)) for n, s, p in zip(self.names, self.shapes, parts)}  # (): a scalar

    def params(self, module: nn.Module) -> dict[str, Tensor]:
        """Detached views of ``module``'s selected parameters, keyed by name, in layout order.

        Raises:
            LayoutMismatchError: if ``module`` lacks a name or a shape differs.
        """
        own = dict(module.named_parameters())
        missing = [n for n in self.names if n not in own]
        wrong = [
            (n, s, tuple(own[n].shape))
            for n, s in zip(self.names, self.shapes)
            if n in own and tuple(own[n].shape) != s
        ]
        if missing or wrong:
            raise LayoutMismatchError(
                f"Module {type(module).__name__} does not fit the layout: missing {missing}, "
                f"shape mismatches (name, layout, module) {wrong}; build the layout from this module "
                f"with ParamLayout.from_module(module)."
            )
        return {n: own[n].detach() for n in self.names}

    def restrict(self, vec: Tensor, source: ParamLayout) -> Tensor:
        """The coordinates of this (sub-)layout's tensors in ``vec [..., source.dim]``, ``[..., N]``.

        For vectors over a larger layout (e.g. Hessian eigenvectors of the whole model) that must
        meet rows stored over ``include``/``exclude`` patterns. Restricting eigenvectors gives the
        corresponding rows of the matrix they came from, not eigenvectors of the sub-block.

        Raises:
            LayoutMismatchError: if a tensor of this layout is missing from ``source`` or differs in shape.

        Example:
            >>> import torch
            >>> full = ParamLayout(("a", "b"), ((2,), (3,)))
            >>> sub = ParamLayout(("b",), ((3,),))
            >>> sub.restrict(torch.arange(5.0), full).tolist()
            [2.0, 3.0, 4.0]
        """
        where = dict(zip(source.names, zip(source.offsets, source.shapes)))
        bad = [n for n, s in zip(self.names, self.shapes) if n not in where or where[n][1] != s]
        if bad:
            raise LayoutMismatchError(
                f"Parameters {bad} are missing from the source layout or differ in shape; restrict only to a "
                f"sub-layout of the same model (same include/exclude semantics)."
            )
        if not isinstance(vec, Tensor) or vec.ndim == 0 or vec.shape[-1] != source.dim:
            got = getattr(vec, "shape", vec)
            raise SketchInputError(f"`vec` must have last dimension {source.dim}, got {got}.")
        parts = [vec[..., where[n][0] : where[n][0] + k] for n, k in zip(self.names, self.numels)]
        return torch.cat(parts, dim=-1)

    # ----------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """sha256 hex digest of the ordered (name, shape) list; equal layouts, equal fingerprints."""
        payload = json.dumps([[n, list(s)] for n, s in zip(self.names, self.shapes)], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable ``{"names", "shapes", "fingerprint"}``."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParamLayout:
        """Rebuild from :meth:`to_dict`; checks the stored fingerprint if present.

        Raises:
            LayoutMismatchError: if ``data`` is malformed or its fingerprint does not match.
        """
        try:
            layout = cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))
        except (KeyError, TypeError, ValueError) as err:
            raise LayoutMismatchError(
                f"`data` is not a ParamLayout dict ({err!r}); expected keys 'names', 'shapes'."
            ) from err
        fp = data.get("fingerprint")
        if fp is not None and fp != layout.fingerprint():
            raise LayoutMismatchError(
                f"Layout fingerprint mismatch: stored {fp}, recomputed {layout.fingerprint()}; the dict was "
                f"edited."
            )
        return layout

    def check_compatible(self, other: ParamLayout) -> None:
        """Raise unless ``other`` has the same names and shapes in the same order.

        Raises:
            LayoutMismatchError: naming the parameters only in one layout, those whose shape
                differs, and whether only the order differs.
        """
        if self.names == other.names and self.shapes == other.shapes:
            return
        mine, theirs = dict(zip(self.names, self.shapes)), dict(zip(other.names, other.shapes))
        only_self = [n for n in self.names if n not in theirs]
        only_other = [n for n in other.names if n not in mine]
        shape_diff = [(n, mine[n], theirs[n]) for n in self.names if n in theirs and mine[n] != theirs[n]]
        order = "" if only_self or only_other or shape_diff else " Same parameters, different order."
        raise LayoutMismatchError(
            f"Parameter layouts differ (N = {self.dim} vs {other.dim}): only in this layout {only_self}; "
            f"only in the other {only_other}; shape differs (name, this, other) {shape_diff}.{order} "
            f"Use the same model architecture and include/exclude patterns for both."
        )
