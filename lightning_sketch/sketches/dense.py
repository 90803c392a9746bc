"""Dense Gaussian sketch, the baseline of arXiv 2402.03994 (Tables 2 and 11): Φ = P, P_ij ~ N(0, 1/D)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch._checks import boolean, positive_int
from lightning_sketch.exceptions import SketchMemoryError
from lightning_sketch.sketches.base import Sketch

#: default cap on the bytes a materialised dense matrix may take.
DEFAULT_MAX_BYTES = 2 * 1024**3


class DenseSketch(Sketch):
    """Dense Gaussian projection, entries i.i.d. N(0, 1/D), so E‖Φx‖² = ‖x‖².

    Rows are generated in blocks of ``block_rows`` from per-block CPU generators, so the
    materialised matrix and the on-the-fly ``chunked`` mode (which regenerates each block per
    call and stores nothing; TRAK-style) are the same matrix bit for bit. Persistent memory is
    D·N·4 bytes when materialised, 0 when chunked. A materialised matrix over ``max_bytes``
    raises :class:`SketchMemoryError` suggesting ``chunked=True``.

    Options:
        chunked: regenerate blocks on every call instead of storing the matrix.
        block_rows: rows per generated block (part of the spec: it fixes the random stream).
        max_bytes: refuse to materialise a matrix larger than this.

    Example:
        >>> import torch
        >>> s = DenseSketch(64, 16, seed=0)
        >>> torch.allclose(s.apply(torch.eye(64, dtype=torch.float64)).T, s.to_dense())
        True
    """

    kind: ClassVar[str] = "dense"
    OPTIONS: ClassVar[dict[str, Any]] = {"chunked": False, "block_rows": 256, "max_bytes": DEFAULT_MAX_BYTES}

    # Persistent state, set in ``_build``: the ``[D, N]`` matrix, or None when ``chunked``.
    _matrix: Tensor | None

    def _validate_options(self, options: dict[str, Any]) -> None:
        boolean("chunked", options["chunked"])
        for name in ("block_rows", "max_bytes"):
            positive_int(name, options[name])

    def _block(self, b: int) -> Tensor:
        rows = min(self.options["block_rows"], self.sketch_dim - b * self.options["block_rows"])
        g = self.generator(f"block/{b}")
        return torch.randn(rows, self.dim, generator=g, dtype=torch.float32).div_(math.sqrt(self.sketch_dim))

    def _num_blocks(self) -> int:
        return math.ceil(self.sketch_dim / self.options["block_rows"])

    def _build(self) -> None:
        if self.options["chunked"]:
            self._set("_matrix", None)
            return
        nbytes = self.sketch_dim * self.dim * 4
        if nbytes > self.options["max_bytes"]:
            raise SketchMemoryError(
                f"A dense {self.sketch_dim} x {self.dim} float32 sketch needs {nbytes / 2**30:.2f} GiB, over "
                f"`max_bytes` = {self.options['max_bytes'] / 2**30:.2f} GiB; pass chunked=True to regenerate "
                f"blocks from the seed on every call, or use a structured kind ('affd', 'qk')."
            )
        self._set("_matrix", torch.cat([self._block(b) for b in range(self._num_blocks())], dim=0))

    def _state_tensors(self) -> dict[str, Tensor]:
        return {} if self._matrix is None else {"matrix": self._matrix}

    def _apply(self, x: Tensor) -> Tensor:
        if self._matrix is not None:
            return x @ self.state("matrix", x).T
        outs = []
        for b in range(self._num_blocks()):
            block = self._block(b).to(device=x.device, dtype=x.dtype)
            outs.append(x @ block.T)
        return torch.cat(outs, dim=-1)

    def _transpose(self, y: Tensor) -> Tensor:
        if self._matrix is not None:
            return y @ self.state("matrix", y)
        out = torch.zeros(y.shape[0], self.dim, dtype=y.dtype, device=y.device)
        br = self.options["block_rows"]
        for b in range(self._num_blocks()):
            block = self._block(b).to(device=y.device, dtype=y.dtype)
            out.addmm_(y[:, b * br : b * br + block.shape[0]], block)
        return out
