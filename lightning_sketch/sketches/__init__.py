"""Random linear maps Φ: R^N → R^D that keep the geometry of gradients (arXiv 2402.03994, eqs. 1-8).

``make(kind, dim, sketch_dim, seed=0, **options)`` builds any registered kind. ``KINDS`` lists
the registered kind names, an explicit literal (no import-time self-registration); each class is
imported on first use so that importing the package stays cheap.

| kind        | arXiv 2402.03994   | persistent memory          |
|-------------|--------------------|----------------------------|
| identity    | –                  | 0 (D = N, exact reference) |
| dense       | dense baseline     | D·N floats (or 0 chunked)  |
| fjl         | eq. 2              | O(N + nnz)                 |
| ffd         | eq. 3, Thm 3.1     | O(N)                       |
| affd        | eq. 6, Thm 3.2     | O(N)                       |
| afjl        | eq. 7              | O(N)                       |
| qk          | eq. 8, Thm 3.3     | O(Σ B_i D_i)               |
| per_layer   | Choe et al. 2024   | O(Σ (o·d_o + i·d_i))       |
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.sketches.base import Sketch, derive_seed, next_pow2

#: kind -> (module under lightning_sketch.sketches, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "identity": ("identity", "IdentitySketch"),
    "dense": ("dense", "DenseSketch"),
    "fjl": ("fjl", "FJLSketch"),
    "ffd": ("ffd", "FFDSketch"),
    "affd": ("affd", "AFFDSketch"),
    "afjl": ("afjl", "AFJLSketch"),
    "qk": ("qk", "QKSketch"),
    "per_layer": ("per_layer", "PerLayerSketch"),
}

KINDS: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["KINDS", "Sketch", "derive_seed", "make", "next_pow2", "sketch_class"]


def sketch_class(kind: str) -> type[Sketch]:
    """The class registered for ``kind``.

    Raises:
        SketchConfigError: for an unknown kind (the message lists the known ones).
    """
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise SketchConfigError(f"Unknown sketch kind {kind!r}; choose one of {sorted(_REGISTRY)}.")
    module, name = _REGISTRY[kind]
    return getattr(importlib.import_module(f"lightning_sketch.sketches.{module}"), name)


def make(kind: str, dim: int, sketch_dim: int | None, seed: int = 0, **options: Any) -> Sketch:
    """Build the sketch of ``kind`` mapping R^dim → R^sketch_dim; ``make(**s.spec) == s``.

    ``sketch_dim=None`` is accepted by ``kind="identity"`` only (it means ``dim``).

    Raises:
        SketchConfigError: for an unknown kind or a bad dimension or option.

    Example:
        >>> s = make("dense", dim=100, sketch_dim=10, seed=3)
        >>> make(**s.spec) == s
        True
    """
    # None reaches only IdentitySketch (whose `sketch_dim` is `int | None`); other kinds reject it
    # with a SketchConfigError.
    return sketch_class(kind)(dim, sketch_dim, seed, **options)  # type: ignore[arg-type]


def __getattr__(name: str) -> Any:
    # Lazy access to the classes, e.g. ``from lightning_sketch.sketches import AFFDSketch``.
    for kind, (_, cls_name) in _REGISTRY.items():
        if cls_name == name:
            return sketch_class(kind)
    raise AttributeError(f"module 'lightning_sketch.sketches' has no attribute {name!r}")
