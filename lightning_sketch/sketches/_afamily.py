"""Shared machinery of AFFD (eq. 6) and AFJL (eq. 7): pre-conditioners, Gaussian diagonal, R_D.

Both sketches are ``R_D · scale · [T2 · G] · T1 · B · pad(x)`` where T1, T2 are N-dimensional
orthogonal transforms (T2 and its G only for AFFD). The ``preconditioner`` option picks T:

* ``"hadamard"`` (default, the paper's eqs. 6-7): N is zero-padded to the next power of two
  ``N_p``; T1 = H^{π1} = ⊗_i (P_i H_{s_i}) (each normalised Sylvester factor with its ROWS
  independently permuted), T2 = H^{π2} = ⊗_i (H_{s_i} P'_i) (COLUMNS permuted), factor sizes
  ``kron_shapes(N_p, max_block)``. B (Rademacher, int8) and G (standard normal, float32) have
  length N_p. Factors are stored unnormalised (±1, exact in every float dtype); the 1/√N_p of each
  pass is folded into the output scale.
* ``"fft"`` (the paper's F variant, Table 8): T = the real DFT packed as an exact isometry
  (:func:`~lightning_sketch.sketches._common.rfft_real`); no padding, no permutations (the FFT is
  not Kronecker-factored, so there is nothing to permute; the randomness is B and G).
* ``"kron_orthogonal"`` (the paper's Q variant): T1, T2 = Kronecker products of independent
  Haar-orthogonal ``[s_i, s_i]`` factors (sign-corrected QR), applied WITHOUT B (arXiv 2402.03994,
  Table 8, Q = 1);
  N zero-padded to a power of two as for the Hadamard. The D kept coordinates of the last pass
  are a balanced product set, as for QK: ``D_i = balanced_split(s, next_pow2(D))`` rows of each
  factor, ordered by :func:`~lightning_sketch.sketches._kron.balanced_order` (first D kept). The
  row-major first D coordinates would keep a single row of the leading factors; a Hadamard row
  has flat entries ±1/√s, but a Haar row does not, and with one row of a factor the one-hot
  spread of ‖Φx‖² was about 10x that of the Hadamard pre-conditioner (0.46 against 0.047 at
  N = 2^14, D = 2^10).

The output is the first D coordinates after the last transform (for ``kron_orthogonal``, the
balanced set above), times √(N_p/D) (N_p = N for ``fft``), so E‖Φx‖² = ‖x‖². Only the leading
Kronecker factors' first rows reach those D coordinates
(:func:`~lightning_sketch.sketches._kron.prefix_rows`), so the last pass is restricted to them, which makes
the time nearly flat in D. Persistent memory: N_p signs (1 B),
N_p Gaussians (4 B; AFJL keeps only the D it uses), and Σ s_i² factor entries per pass.

``max_block`` defaults to 32: the paper caps factors at 1024 for accelerators and its didactic
listing (arXiv 2402.03994 App. B, Listing 4) uses 32; on this CPU 16-32 wide factors are the
fastest (batched matmuls that stay in cache, docs/measurements.md) while 1024 is ~3x slower. Any value
is a faithful AFFD; it is part of the spec because it changes the drawn permutations.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.sketches._common import (
    check_max_block,
    compute_dtype,
    float_state,
    pad_cols,
    rademacher,
    rfft_real,
    rfft_real_t,
    rows_per_chunk,
)
from lightning_sketch.sketches._kron import (
    balanced_order,
    balanced_split,
    haar_orthogonal,
    hadamard,
    kron_apply,
    kron_apply_into,
    kron_apply_into_lead,
    kron_shapes,
    prefix_rows,
    uses_autograd,
)
from lightning_sketch.sketches.base import Sketch, next_pow2

__all__ = ["PRECONDITIONERS", "PreconditionedSketch"]

PRECONDITIONERS = ("hadamard", "fft", "kron_orthogonal")


def _full_index(shapes: tuple[int, ...], rows: tuple[int, ...]) -> Tensor:
    """Index in ``[0, Π shapes)`` of each row (row-major) of the product restricted to ``rows[i]`` rows."""
    index = torch.zeros(1, dtype=torch.int64)
    for s, r in zip(shapes, rows):
        index = (index[:, None] * s + torch.arange(r)[None, :]).reshape(-1)
    return index


class PreconditionedSketch(Sketch):
    """Base of AFFD/AFJL; subclasses set ``kind`` and ``TWO_PASS`` (AFFD: True)."""

    OPTIONS: ClassVar[dict[str, Any]] = {"preconditioner": "hadamard", "max_block": 32}
    TWO_PASS: ClassVar[bool] = True

    # Persistent state, set in ``_build``.
    _n_pad: int
    _shapes: tuple[int, ...]
    _rows: tuple[int, ...]
    _order: Tensor | None
    _scale: float
    _passes: tuple[str, ...]
    _tensors: dict[str, Tensor]

    def _validate_options(self, options: dict[str, Any]) -> None:
        pc = options["preconditioner"]
        if pc not in PRECONDITIONERS:
            raise SketchConfigError(
                f"`preconditioner` must be one of {list(PRECONDITIONERS)}, got {pc!r}; use 'hadamard' (the "
                f"paper's default)."
            )
        check_max_block(options["max_block"])

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        pc = self.options["preconditioner"]
        n_pad = self.dim if pc == "fft" else next_pow2(self.dim)
        shapes = () if pc == "fft" else kron_shapes(n_pad, self.options["max_block"])
        state: dict[str, Tensor] = {}
        if pc != "kron_orthogonal":
            state["signs"] = rademacher(n_pad, self.generator("signs"))
        gauss = torch.randn(n_pad, generator=self.generator("gauss"), dtype=torch.float32)
        passes = ("t1", "t2") if self.TWO_PASS else ("t1",)
        for p in passes:
            for i, s in enumerate(shapes):
                g = self.generator(f"{p}/{i}")
                if pc == "hadamard":
                    perm = torch.randperm(s, generator=g)
                    h = hadamard(s)
                    state[f"{p}_{i}"] = (h[perm] if p == "t1" else h[:, perm]).contiguous()
                else:
                    state[f"{p}_{i}"] = haar_orthogonal(s, g).to(torch.float32).contiguous()
        order = None
        if pc == "kron_orthogonal" and shapes:
            rows = balanced_split(shapes, next_pow2(self.sketch_dim))
            order = balanced_order(shapes, next_pow2(self.sketch_dim))[: self.sketch_dim].contiguous()
        else:
            rows = prefix_rows(shapes, self.sketch_dim) if shapes else ()
        if not self.TWO_PASS:
            if shapes:  # G at the full-length coordinates that the restricted pass computes
                gauss = gauss[_full_index(shapes, rows)].clone()
            else:
                gauss = gauss[: self.sketch_dim].clone()
        state["gauss"] = gauss
        scale = math.sqrt(n_pad / self.sketch_dim)
        if pc == "hadamard":
            scale /= math.sqrt(n_pad) ** len(passes)
        self._set("_n_pad", n_pad)
        self._set("_shapes", shapes)
        self._set("_rows", rows)
        self._set("_order", order)
        self._set("_scale", scale)
        self._set("_passes", passes)
        self._set("_tensors", state)

    def _state_tensors(self) -> dict[str, Tensor]:
        return self._tensors

    def _factors(self, p: str, like: Tensor, restrict: bool, transpose: bool = False) -> list[Tensor]:
        out = []
        for i in range(len(self._shapes)):
            f = self.state(f"{p}_{i}", like)
            if restrict:
                f = f[: self._rows[i]]
            out.append(f.T if transpose else f)
        return out

    # ------------------------------------------------------------------ apply
    def _apply(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(compute_dtype(x))
        if self.options["preconditioner"] == "fft":
            chunks = x.split(rows_per_chunk(self._n_pad, x.device)) if x.shape[0] else (x,)
            out = torch.cat([self._apply_fft(c) for c in chunks])
        elif uses_autograd(x) or x.shape[0] == 0:
            out = self._apply_functional(x)
        else:
            out = self._apply_chunked(x)
        return out.to(dtype)

    def _apply_fft(self, x: Tensor) -> Tensor:
        v = rfft_real(x * float_state(self, "signs", x))
        g = self.state("gauss", x)
        if self.TWO_PASS:
            v = rfft_real(v * g)
        else:
            v = v[:, : self.sketch_dim] * g[: self.sketch_dim]
        return v[:, : self.sketch_dim] * self._scale

    def _apply_functional(self, x: Tensor) -> Tensor:
        u = pad_cols(x, self._n_pad)
        if "signs" in self._tensors:
            u = u * float_state(self, "signs", x)
        g = self.state("gauss", x)
        if self.TWO_PASS:
            v = kron_apply(u, self._factors("t1", x, restrict=False)) * g
            w = kron_apply(v, self._factors("t2", x, restrict=True))
        else:
            w = kron_apply(u, self._factors("t1", x, restrict=True)) * g
        return self._restrict(w) * self._scale

    def _lead(self) -> int | None:
        """How many slices of the first Kronecker axis hold the N real coordinates (the rest is zero
        padding), when fewer than all; else None."""
        if not self._shapes or self._shapes[0] < 2 or self._n_pad == self.dim:
            return None
        lead = -(-self.dim // (self._n_pad // self._shapes[0]))
        return lead if lead < self._shapes[0] else None

    def _restrict(self, w: Tensor) -> Tensor:
        """R_D: the first D coordinates, or the balanced set of ``kron_orthogonal``."""
        return w[:, : self.sketch_dim] if self._order is None else w[:, self._order.to(w.device)]

    def _apply_chunked(self, x: Tensor) -> Tensor:
        """Same map as :meth:`_apply_functional`, in row chunks through two reused work buffers."""
        m, n, n_pad = x.shape[0], self.dim, self._n_pad
        rows = min(m, rows_per_chunk(n_pad, x.device))
        work = (x.new_empty(rows * n_pad), x.new_empty(rows * n_pad))
        out = x.new_empty(m, self.sketch_dim)
        signs = float_state(self, "signs", x) if "signs" in self._tensors else None
        g = self.state("gauss", x)
        f1 = self._factors("t1", x, restrict=not self.TWO_PASS)
        f2 = self._factors("t2", x, restrict=True) if self.TWO_PASS else None
        lead = self._lead()
        if lead is not None and f1[0].shape[0] < lead:
            lead = None  # a restricted F_0 shrinks the rows more when applied first
        # the zero padding fills the last slices of the first axis: the trailing factors skip them
        width = n_pad if lead is None else lead * (n_pad // self._shapes[0])
        for start in range(0, m, rows):
            xc = x[start : start + rows]
            r = xc.shape[0]
            u = work[0][: r * width].view(r, width)
            if width > n:
                u[:, n:].zero_()
            if signs is None:
                u[:, :n].copy_(xc)
            else:
                torch.mul(xc, signs[:n], out=u[:, :n])
            v = kron_apply_into(u, f1, work) if lead is None else kron_apply_into_lead(u, f1, work, lead)
            if f2 is not None:
                v.mul_(g)
                v = kron_apply_into(v, f2, work)
            else:
                v = v[:, : g.shape[0]]
                v.mul_(g)
            torch.mul(self._restrict(v), self._scale, out=out[start : start + r])
        return out

    # ------------------------------------------------------------------ transpose
    def _transpose(self, y: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.to(compute_dtype(y))
        if self.options["preconditioner"] != "fft" and not uses_autograd(y) and y.shape[0]:
            return self._transpose_chunked(y).to(dtype)
        y = y * self._scale
        g = self.state("gauss", y)
        if self.options["preconditioner"] == "fft":
            v = pad_cols(y, self.dim)
            if self.TWO_PASS:
                v = rfft_real_t(v) * g
            else:
                v = v * pad_cols(g[None, : self.sketch_dim], self.dim)
            u = rfft_real_t(v)
        else:
            d_prime = math.prod(self._rows)
            if self._order is None:
                v = pad_cols(y, d_prime)
            else:
                v = y.new_zeros(y.shape[0], d_prime).index_copy(1, self._order.to(y.device), y)
            if self.TWO_PASS:
                v = kron_apply(v, self._factors("t2", y, restrict=True, transpose=True)) * g
                u = kron_apply(v, self._factors("t1", y, restrict=False, transpose=True))
            else:
                u = kron_apply(v * g[:d_prime], self._factors("t1", y, restrict=True, transpose=True))
        if "signs" in self._tensors:
            u = u * float_state(self, "signs", y)
        return u[:, : self.dim].to(dtype)

    def _transpose_chunked(self, y: Tensor) -> Tensor:
        """Same map as the out-of-place transpose (Kronecker preconditioners), in row chunks through
        two reused work buffers: at N = 22.7M a fresh [N_p] tensor per factor cost 2.5x the whole
        chunked pass (docs/measurements.md, "Memory traffic and allocation")."""
        m, n, n_pad, d = y.shape[0], self.dim, self._n_pad, self.sketch_dim
        d_prime = math.prod(self._rows)
        rows = min(m, rows_per_chunk(n_pad, y.device))
        work = (y.new_empty(rows * n_pad), y.new_empty(rows * n_pad))
        out = y.new_empty(m, n)
        signs = float_state(self, "signs", y) if "signs" in self._tensors else None
        g = self.state("gauss", y)
        order = None if self._order is None else self._order.to(y.device)
        f2 = self._factors("t2", y, restrict=True, transpose=True) if self.TWO_PASS else None
        f1 = self._factors("t1", y, restrict=not self.TWO_PASS, transpose=True)
        lead = self._lead()
        # only the first `lead` output slices of the first axis reach the N real coordinates
        f1_out = f1 if lead is None else [f1[0][:lead], *f1[1:]]
        for start in range(0, m, rows):
            yc = y[start : start + rows] * self._scale
            r = yc.shape[0]
            v = work[0][: r * d_prime].view(r, d_prime)
            if order is None:
                v[:, d:].zero_()
                v[:, :d].copy_(yc)
            else:
                v.zero_()
                v.index_copy_(1, order, yc)
            if f2 is not None:
                v = kron_apply_into(v, f2, work)
                v.mul_(g)
            else:
                v.mul_(g[:d_prime])
            u = kron_apply_into(v, f1_out, work)[:, :n]
            if signs is None:
                out[start : start + r].copy_(u)
            else:
                torch.mul(u, signs[:n], out=out[start : start + r])
        return out

