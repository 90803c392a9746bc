"""Per-layer Kronecker-factored sketch (LoGra-style, Choe et al. 2024).

A different sketch family from the paper's whole-model maps (arXiv 2402.03994, Listings 6-7): Φ is
block diagonal over the parameter tensors of a :class:`~lightning_sketch.gradients.ParamLayout`. A
tensor with ``ndim >= 2`` is viewed as a matrix G of shape (out, in = prod(rest)) and sketched as

.. math::

    Φ_b \\operatorname{vec}(G) = \\operatorname{vec}(L G R^T),\\quad
    L \\in R^{d_o × out},\\ R \\in R^{d_i × in}

(row-major ``vec``), i.e. Φ_b = L ⊗ R; a tensor with ``ndim <= 1`` gets a small sub-sketch M
``[d, n]``. For ``nn.Linear`` the per-example gradient is δ xᵀ, so its sketch (L δ)(R x)ᵀ never
needs the gradient itself: :class:`~lightning_sketch.gradients.GradientCapture` computes it in
backward hooks.

Factors (``inner``): ``"qk"``: the first d rows of a Haar orthogonal matrix (sign-corrected QR,
Mezzadri 2007) scaled by √(n/d); ``"dense"``: i.i.d. N(0, 1/d). Either way E[LᵀL] = I and
E[RᵀR] = I, L and R independent, so E‖Φx‖² = ‖x‖².

Allocation of D (deterministic, documented): block b gets a target t_b from the largest-remainder
rounding of D·n_b/N with a floor of 1 (so ``sketch_dim`` must be at least the number of tensors).
Blocks are visited in order; each realises r_b ≤ min(t_b + carry, n_b) and passes the shortfall on
as carry. A final carry goes to 1-D blocks with room; whatever still remains becomes **zero output
columns** at the end (they carry no information and do not bias norms).

A matrix block's factor pair d_o ≤ out, d_i ≤ in with d_o·d_i ≤ t is chosen by the option
``split_version``:

- ``1``: the largest product, ties to the most balanced. A prime t then splits as 1 × t, and a
  rank-one gradient δxᵀ (a Linear layer's per-example gradient) is seen through a single
  direction on one side: the relative spread of ‖Φ_b δxᵀ‖² roughly doubles from t = 60 to t = 61.
- ``2``: the largest product with both factors at least m = min(out, in, max(2, ⌈⌊√t⌋ / 2⌉))
  (m = 1 for t < 4), ties to the most balanced. The aspect ratio stays within about 4 where the
  matrix allows it, and neither factor is 1 when t ≥ 4 and the matrix has at least two rows and
  two columns. For rank-one δxᵀ, ‖Φ_b δxᵀ‖² = ‖Lδ‖²·‖Rx‖², whose relative variance under
  Gaussian factors is (1 + 2/d_o)(1 + 2/d_i) − 1: 2.1 for 1 × 61 against 0.6 for 6 × 10. The
  few dims a prime t leaves unused (t − d_o·d_i) pass on as carry like any shortfall.

A spec without ``split_version`` means 1, and a version-1 sketch's spec omits the field, so a
stored spec that lacks it rebuilds the identical map and compares equal to the rebuilt sketch's
spec. :meth:`PerLayerSketch.layout_options` and :meth:`PerLayerSketch.for_module`, the builders
the callbacks use, select :data:`LATEST_SPLIT_VERSION`; a direct ``make("per_layer", ...)`` without
the option cannot be told apart from such a stored spec and gets version 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_sketch._checks import is_int, one_of, refuse
from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches.base import Sketch

__all__ = ["LATEST_SPLIT_VERSION", "LayerBlock", "PerLayerSketch", "SPLIT_VERSIONS"]

#: the factor-pair rules a spec may name (module docstring); 1 is implied when the field is absent.
SPLIT_VERSIONS: tuple[int, ...] = (1, 2)
#: the rule new sketches built from a layout use.
LATEST_SPLIT_VERSION = 2


@dataclass(frozen=True, eq=False)
class LayerBlock:
    """One diagonal block of Φ.

    Attributes:
        index: position of the tensor in the layout.
        shape: the tensor's shape.
        in_offset: start of the tensor in the flat input (length ``numel``).
        out_offset: start of its sketch in the output (length ``out_dim``).
        rows, cols: the matrix view (out, prod(rest)); ``cols == 0`` for a vector block.
        d_o, d_i: factor sizes (``out_dim = d_o * d_i``); for vector blocks d_i = 1.
        L: ``[d_o, rows]`` (vector block: the ``[d, n]`` sub-sketch), float32.
        R: ``[d_i, cols]`` or None for a vector block, float32.
    """

    index: int
    shape: tuple[int, ...]
    in_offset: int
    out_offset: int
    rows: int
    cols: int
    d_o: int
    d_i: int
    L: Tensor
    R: Tensor | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_dim(self) -> int:
        return self.d_o * self.d_i

    @property
    def is_matrix(self) -> bool:
        return self.R is not None


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Integers >= 1 summing to ``total`` (>= len(weights)), proportional to ``weights``."""
    k = len(weights)
    free = total - k
    n = sum(weights)
    raw = [free * w / n for w in weights]
    base = [math.floor(r) for r in raw]
    order = sorted(range(k), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[: free - sum(base)]:
        base[i] += 1
    return [b + 1 for b in base]


def _factor_pair(target: int, rows: int, cols: int, version: int) -> tuple[int, int]:
    """``(d_o, d_i)`` with ``d_o <= rows``, ``d_i <= cols``, ``d_o * d_i <= target`` by rule ``version``."""
    return _factor_pair_v1(target, rows, cols) if version == 1 else _factor_pair_v2(target, rows, cols)


def _factor_pair_v1(target: int, rows: int, cols: int) -> tuple[int, int]:
    """The largest product, ties to the most balanced (a prime target gives 1 × target)."""
    best = (1, 1)
    for d_o in range(1, min(rows, target) + 1):
        d_i = min(cols, target // d_o)
        cand, cur = d_o * d_i, best[0] * best[1]
        if cand > cur or (cand == cur and abs(math.log(d_o / d_i)) < abs(math.log(best[0] / best[1]))):
            best = (d_o, d_i)
    return best


def _factor_pair_v2(target: int, rows: int, cols: int) -> tuple[int, int]:
    """The largest product with both factors at least ``m``, ties to the most balanced (then the
    smaller ``d_o``); ``m = min(rows, cols, max(2, ⌈isqrt(target) / 2⌉))`` for ``target >= 4``, else 1.

    The floor keeps the aspect ratio d_i/d_o within about 4 when the matrix allows it (so a prime
    target does not split as 1 × target); a pair with both factors ``>= m`` always exists.

    Example:
        >>> _factor_pair_v2(61, 64, 64), _factor_pair_v2(60, 64, 64), _factor_pair_v2(5, 8, 8)
        ((6, 10), (6, 10), (2, 2))
    """
    m = min(rows, cols, max(2, (math.isqrt(target) + 1) // 2)) if target >= 4 else 1
    best, key = (m, m), (0, 0)
    for d_o in range(m, min(rows, target // m) + 1):
        d_i = min(cols, target // d_o)
        cand = (d_o * d_i, -abs(d_o - d_i))  # for equal products, closer factors are more balanced
        if d_i >= m and cand > key:
            best, key = (d_o, d_i), cand
    return best


def _factor(n: int, d: int, inner: str, generator: torch.Generator) -> Tensor:
    """``[d, n]`` with E[FᵀF] = I_n: Haar rows scaled √(n/d) ("qk") or N(0, 1/d) entries ("dense")."""
    g = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if inner == "dense":
        return (g.T / math.sqrt(d)).to(torch.float32).contiguous()
    q, r = torch.linalg.qr(g)  # q [n, d]: orthonormal columns
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.mul(math.sqrt(n / d)).to(torch.float32).contiguous()


class PerLayerSketch(Sketch):
    """Block-diagonal Kronecker sketch over parameter tensors (kind ``"per_layer"``).

    Options:
        shapes: the layout's tensor shapes in order (JSON list of lists; their numels must sum to
            ``dim``); default: one vector block ``[[dim]]``.
        inner: ``"qk"`` (Haar rows) or ``"dense"`` (Gaussian) factors.
        split_version: the factor-pair rule of matrix blocks, 1 (absent from the spec) or 2
            (module docstring); :meth:`layout_options` and :meth:`for_module` choose
            :data:`LATEST_SPLIT_VERSION`.

    Persistent memory: Σ (d_o·out + d_i·in) floats.

    Example:
        >>> import torch
        >>> s = PerLayerSketch(3 * 4 + 3, 5, seed=0, shapes=[[3, 4], [3]])
        >>> [(b.d_o, b.d_i) for b in s.blocks]
        [(1, 3), (2, 1)]
        >>> [(b.d_o, b.d_i) for b in PerLayerSketch(61 * 32, 61, shapes=[[61, 32]]).blocks]
        [(61, 1)]
        >>> [(b.d_o, b.d_i) for b in PerLayerSketch(61 * 32, 61, shapes=[[61, 32]], split_version=2).blocks]
        [(6, 10)]
        >>> x = torch.randn(15, dtype=torch.float64)
        >>> torch.allclose(s.apply(x), s.to_dense() @ x)
        True
    """

    kind: ClassVar[str] = "per_layer"
    OPTIONS: ClassVar[dict[str, Any]] = {"shapes": None, "inner": "qk", "split_version": 1}

    # Persistent state, set in ``_build``: the diagonal blocks and the output columns they use.
    _blocks: tuple[LayerBlock, ...]
    _used: int
    supports_factorized: ClassVar[bool] = True

    @classmethod
    def layout_options(cls, layout: Any) -> dict[str, Any]:
        """``{"shapes": ..., "split_version": LATEST_SPLIT_VERSION}``: Φ is block diagonal over the
        layout's tensors (scalars as ``[1]``), with the latest factor-pair rule."""
        return {"shapes": [list(s) or [1] for s in layout.shapes], "split_version": LATEST_SPLIT_VERSION}

    @property
    def spec(self) -> dict[str, Any]:
        """As :attr:`Sketch.spec`, without ``split_version`` when it is 1 (the meaning of its absence),
        so a version-1 sketch has the same spec as before the field existed."""
        spec = super().spec
        if spec["split_version"] == 1:
            del spec["split_version"]
        return spec

    def _validate_options(self, options: dict[str, Any]) -> None:
        one_of("inner", options["inner"], ("qk", "dense"))
        version = options["split_version"]
        if not (is_int(version) and version in SPLIT_VERSIONS):
            raise refuse(
                "split_version", f"one of {list(SPLIT_VERSIONS)}", version,
                hint=f"Omit it to rebuild a spec recorded without it, or use {LATEST_SPLIT_VERSION} for a "
                "new sketch.",
            )
        shapes = options["shapes"]
        if shapes is None:
            shapes = [[self.dim]]
        ok = isinstance(shapes, Sequence) and not isinstance(shapes, str) and len(shapes) > 0
        ok = ok and all(
            isinstance(s, Sequence)
            and all(is_int(v) and v >= 1 for v in s)
            for s in shapes
        )
        if not ok:
            raise SketchConfigError(
                f"`shapes` must be a non-empty list of lists of positive ints (the layout's shapes), got "
                f"{shapes!r}."
            )
        shapes = [[int(v) for v in s] for s in shapes]
        total = sum(math.prod(s) for s in shapes)
        if total != self.dim:
            raise SketchConfigError(
                f"`shapes` must have numels summing to `dim` = {self.dim}, got {total}; pass the layout's "
                f"shapes (PerLayerSketch.for_module builds them)."
            )
        if self.sketch_dim < len(shapes):
            raise SketchConfigError(
                f"`sketch_dim` must be >= the number of tensors ({len(shapes)}) for kind 'per_layer', got "
                f"{self.sketch_dim}; raise `sketch_dim` or exclude tensors from the layout."
            )
        options["shapes"] = shapes  # normalised (tuples -> lists) so the spec is JSON and compares equal

    def _build(self) -> None:
        shapes = self.options["shapes"]
        numels = [math.prod(s) for s in shapes]
        targets = _largest_remainder(self.sketch_dim, numels)
        plan: list[list[int]] = []
        carry = 0
        for shape, n, t in zip(shapes, numels, targets):
            want = min(t + carry, n)
            if len(shape) >= 2:
                d_o, d_i = _factor_pair(want, shape[0], n // shape[0], self.options["split_version"])
            else:
                d_o, d_i = want, 1
            plan.append([d_o, d_i])
            carry = t + carry - d_o * d_i
        for i, (shape, n) in enumerate(zip(shapes, numels)):
            if carry > 0 and len(shape) < 2 and plan[i][0] < n:
                extra = min(carry, n - plan[i][0])
                plan[i][0] += extra
                carry -= extra
        blocks, in_off, out_off = [], 0, 0
        for i, (shape, n, (d_o, d_i)) in enumerate(zip(shapes, numels, plan)):
            if len(shape) >= 2:
                rows, cols = shape[0], n // shape[0]
                L = _factor(rows, d_o, self.options["inner"], self.generator(f"block/{i}/L"))
                R = _factor(cols, d_i, self.options["inner"], self.generator(f"block/{i}/R"))
            else:
                rows, cols = n, 0
                L, R = _factor(n, d_o, self.options["inner"], self.generator(f"block/{i}/M")), None
            blocks.append(LayerBlock(i, tuple(shape), in_off, out_off, rows, cols, d_o, d_i, L, R))
            in_off += n
            out_off += d_o * d_i
        self._set("_blocks", tuple(blocks))
        self._set("_used", out_off)

    # ----------------------------------------------------------------- structure
    @property
    def blocks(self) -> tuple[LayerBlock, ...]:
        """The diagonal blocks, in layout order (factors for the hook-based fast path)."""
        return self._blocks

    @property
    def zero_columns(self) -> int:
        """Trailing output columns that are identically zero (allocation leftovers)."""
        return self.sketch_dim - self._used

    def _state_tensors(self) -> dict[str, Tensor]:
        out = {}
        for b in self._blocks:
            out[f"L{b.index}"] = b.L
            if b.R is not None:
                out[f"R{b.index}"] = b.R
        return out

    def factors(self, block: LayerBlock, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(L, R)`` of ``block`` in ``like``'s dtype and device (cached)."""
        L = self.state(f"L{block.index}", like)
        return L, (self.state(f"R{block.index}", like) if block.R is not None else None)

    # ----------------------------------------------------------------- maps
    def _apply(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        out = x.new_zeros(B, self.sketch_dim)
        for b in self._blocks:
            L, R = self.factors(b, x)
            xb = x[:, b.in_offset : b.in_offset + b.numel]
            if R is None:
                y = xb @ L.T
            else:
                y = (L @ xb.reshape(B, b.rows, b.cols) @ R.T).reshape(B, b.out_dim)
            out[:, b.out_offset : b.out_offset + b.out_dim] = y
        return out

    def _transpose(self, y: Tensor) -> Tensor:
        B = y.shape[0]
        parts = []
        for b in self._blocks:
            L, R = self.factors(b, y)
            yb = y[:, b.out_offset : b.out_offset + b.out_dim]
            if R is None:
                parts.append(yb @ L)
            else:
                parts.append((L.T @ yb.reshape(B, b.d_o, b.d_i) @ R).reshape(B, b.numel))
        return torch.cat(parts, dim=1)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def for_module(
        cls,
        module: nn.Module,
        sketch_dim: int,
        seed: int = 0,
        inner: str = "qk",
        layout: Any = None,
    ) -> PerLayerSketch:
        """The per-layer sketch over ``layout`` (default: all trainable parameters of ``module``), with
        the options of :meth:`layout_options` (the latest ``split_version``).

        Raises:
            SketchConfigError: for a bad ``sketch_dim`` or ``inner``.
        """

        layout = ParamLayout.from_module(module) if layout is None else layout
        return cls(layout.dim, sketch_dim, seed, inner=inner, **cls.layout_options(layout))
