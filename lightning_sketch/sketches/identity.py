"""The identity "sketch" (D = N): exact answers for small models and the reference in tests."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.sketches.base import Sketch


class IdentitySketch(Sketch):
    """Φ = I_N. ``sketch_dim`` must equal ``dim``.

    Example:
        >>> import torch
        >>> s = IdentitySketch(4, 4)
        >>> torch.equal(s.apply(torch.arange(4.0)), torch.arange(4.0))
        True
    """

    kind: ClassVar[str] = "identity"

    def _build(self) -> None:
        if self.sketch_dim != self.dim:
            raise SketchConfigError(
                f"kind='identity' needs `sketch_dim` == `dim` (got {self.sketch_dim} != {self.dim}); "
                f"set sketch_dim={self.dim}."
            )

    def _apply(self, x: Tensor) -> Tensor:
        return x.clone()

    def _transpose(self, y: Tensor) -> Tensor:
        return y.clone()
