"""The identity "sketch" (D = N): exact answers for small models and the reference in tests."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.sketches.base import Sketch


class IdentitySketch(Sketch):
    """Φ = I_N. ``sketch_dim`` must equal ``dim``; ``None`` (the default) means ``dim``, so callers
    that do not know N (``GradientSketch(sketch_kind="identity", sketch_dim=None)``) need not.

    Example:
        >>> import torch
        >>> s = IdentitySketch(4)
        >>> s.sketch_dim, torch.equal(s.apply(torch.arange(4.0)), torch.arange(4.0))
        (4, True)
    """

    kind: ClassVar[str] = "identity"

    def __init__(self, dim: int, sketch_dim: int | None = None, seed: int = 0, **options: Any) -> None:
        super().__init__(dim, dim if sketch_dim is None else sketch_dim, seed, **options)

    def _build(self) -> None:
        if self.sketch_dim != self.dim:
            raise SketchConfigError(
                f"kind='identity' needs `sketch_dim` == `dim` (got {self.sketch_dim} != {self.dim}); "
                f"set sketch_dim={self.dim} or sketch_dim=None."
            )

    def _apply(self, x: Tensor) -> Tensor:
        return x.clone()

    def _transpose(self, y: Tensor) -> Tensor:
        return y.clone()
