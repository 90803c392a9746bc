"""Kronecker-factored linear maps, Walsh–Hadamard factors and Haar factors (arXiv 2402.03994,
eqs. 6-8, App. C.3).

A Kronecker product ``F = F_0 ⊗ F_1 ⊗ … ⊗ F_{K-1}`` with ``F_i`` of shape ``[r_i, c_i]`` maps
R^(Π c_i) → R^(Π r_i). Applied to the rows of ``x [M, Π c_i]`` it never forms F: ``x`` is viewed
as ``[M, c_0, …, c_{K-1}]`` (row-major, the ordering of ``torch.kron``) and axis ``i`` is
contracted with the column index of ``F_i``, one batched matmul per factor, so the cost is
``M · Σ_i r_i · (Π_{j<i} r_j) · (Π_{j>=i} c_j)`` multiply-adds instead of ``M · Π r_i · Π c_i``.

Two execution paths give the same numbers (up to BLAS blocking):

* :func:`kron_apply` — plain out-of-place ops, safe under autograd and ``torch.func`` transforms;
* :func:`kron_apply_into` — ping-pongs between two caller-owned work buffers (``out=`` matmuls).
  On the 2-core CPU allocating a fresh 256 MiB tensor costs ~100 ms against ~7 ms to refill one
  (docs/measurements.md), so for N = 2^20 this path is 2-3x faster; sketches use it in row chunks
  when no gradient is being tracked.

Factor shapes follow the paper's ``compute_kronecker_shapes`` (remainder factor FIRST).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "balanced_order",
    "balanced_split",
    "haar_orthogonal",
    "hadamard",
    "kron_apply",
    "kron_apply_into",
    "kron_apply_into_lead",
    "kron_shapes",
    "prefix_rows",
    "uses_autograd",
]


def kron_shapes(n: int, max_block: int) -> tuple[int, ...]:
    """Factor sizes whose product is ``n``, each ``<= max_block``, remainder factor first.

    Repeatedly takes ``min(n, max_block)`` and divides, then reverses (the paper's listing), so
    for powers of two every factor but the first equals ``max_block``.

    Args:
        n: a power of two (the padded dimension).
        max_block: the largest factor size, a power of two ``>= 2``.

    Returns:
        The factor sizes; ``()`` for ``n = 1``.

    Example:
        >>> kron_shapes(2048, 32)
        (2, 32, 32)
        >>> kron_shapes(1024, 32)
        (32, 32)
    """
    shapes = []
    while n > 1:
        b = min(n, max_block)
        shapes.append(b)
        n //= b
    return tuple(reversed(shapes))


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The unnormalised ``[n, n]`` Sylvester Walsh–Hadamard matrix (entries ±1), ``n`` a power of 2.

    ``(H_n)_{ij} = (-1)^{popcount(i & j)}``; divide by ``sqrt(n)`` for the orthonormal H_n of
    arXiv 2402.03994 App. C.3 (built scipy-free).

    Example:
        >>> hadamard(2)
        tensor([[ 1.,  1.],
                [ 1., -1.]])
    """
    idx = torch.arange(n)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def haar_orthogonal(n: int, generator: torch.Generator, rows: int | None = None) -> Tensor:
    """A Haar-distributed orthogonal ``[n, n]`` matrix (or its first ``rows`` rows), float64.

    Sign-corrected QR of a Gaussian matrix (Mezzadri 2007): the columns of Q are
    multiplied by ``sign(diag(R))``; without that fix Q is not exactly Haar.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q = haar_orthogonal(8, g)
        >>> torch.allclose(q @ q.T, torch.eye(8, dtype=torch.float64))
        True
    """
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    q = q * d[None, :]
    return q if rows is None else q[:rows].contiguous()


def prefix_rows(shapes: Sequence[int], d: int) -> tuple[int, ...]:
    """Per-factor row counts so that the Kronecker output's first ``D' >= d`` rows are kept.

    The first ``d`` rows of a row-major Kronecker product only involve the first few rows of the
    leading factors: with ``tail_j = Π_{i>j} s_i`` and the first ``j`` with ``d > tail_j``,
    factors ``i < j`` keep 1 row, factor ``j`` keeps ``ceil(d / tail_j)`` rows and the rest are
    whole. Restricting the factors this way (R_D after the last transform) skips most of the
    last pass. Slice the result to ``[:d]`` when ``D' > d``.

    Example:
        >>> prefix_rows((32, 32, 32, 32), 1024)
        (1, 1, 32, 32)
        >>> prefix_rows((2, 32, 32), 1000)
        (1, 32, 32)
        >>> prefix_rows((4, 4), 16)
        (4, 4)
    """
    k = len(shapes)
    rows = list(shapes)
    for j in range(k):
        tail = math.prod(shapes[j + 1 :])
        if d > tail or j == k - 1:
            rows[:j] = [1] * j
            rows[j] = math.ceil(d / tail)
            break
    return tuple(rows)


def _bit_owners(shapes: Sequence[int], d: int) -> list[int]:
    """The factor that receives each successive bit of ``d`` (a power of two), most even first."""
    caps = [int(math.log2(b)) for b in shapes]
    bits = [0] * len(shapes)
    owners = []
    for _ in range(int(math.log2(d))):
        room = [i for i in range(len(shapes)) if bits[i] < caps[i]]
        i = min(room, key=lambda j: (bits[j], -caps[j], -j))
        bits[i] += 1
        owners.append(i)
    return owners


def balanced_split(shapes: Sequence[int], d: int) -> tuple[int, ...]:
    """Row counts ``D_i <= B_i`` (powers of two) with ``Π D_i = d``, as equal as possible.

    ``d`` must be a power of two ``<= Π B_i``. The bits of ``d`` are handed out one at a time to
    the factor with the fewest so far that still has room (ties: the larger factor), so no factor
    collapses to ``D_i = 1`` while another holds many rows (Thm 3.3 of arXiv 2402.03994 bounds a
    Kronecker sketch's error through each D_i). Because bits are handed out one at a time, the
    split of ``d`` refines the split of ``d/2``: see :func:`balanced_order`.

    Example:
        >>> balanced_split((16, 32, 32), 1024)
        (8, 8, 16)
        >>> balanced_split((2, 32, 32), 4)
        (1, 2, 2)
    """
    counts = [0] * len(shapes)
    for i in _bit_owners(shapes, d):
        counts[i] += 1
    return tuple(1 << c for c in counts)


def balanced_order(shapes: Sequence[int], d: int) -> Tensor:
    """An ordering of the ``d`` rows of ``⊗_i F_i[:D_i]`` (``D_i = balanced_split(shapes, d)``) with balanced
    prefixes.

    Returns ``order [d]`` (int64): output coordinate ``j`` is row ``order[j]`` of the row-major
    Kronecker product of the restricted factors. Bit t of ``j`` (from the least significant) is the
    next bit of the row index of the factor that received bit t in :func:`balanced_split`, so for
    every power of two ``d' <= d`` the first ``d'`` coordinates are exactly the rows of
    ``⊗_i F_i[:D'_i]`` with ``D'_i = balanced_split(shapes, d')``: every prefix is itself a
    balanced Kronecker sketch (the prefix of row-major order keeps one row of the leading factors).

    Example:
        >>> balanced_order((4, 4), 16)[:4].tolist()  # rows (0,0), (0,1), (1,0), (1,1) of a 4x4 grid
        [0, 1, 4, 5]
    """
    owners = _bit_owners(shapes, d)
    splits = balanced_split(shapes, d)
    j = torch.arange(d, dtype=torch.int64)
    rows = [torch.zeros(d, dtype=torch.int64) for _ in shapes]
    filled = [0] * len(shapes)
    for t, i in enumerate(owners):
        rows[i] |= ((j >> t) & 1) << filled[i]
        filled[i] += 1
    index = torch.zeros(d, dtype=torch.int64)
    for i, r in enumerate(rows):
        index = index * splits[i] + r
    return index


def uses_autograd(x: Tensor) -> bool:
    """Whether ``x`` takes part in autograd or a ``torch.func`` transform (then avoid ``out=``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return True
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - older torch; stay on the safe path
        return True


def kron_apply(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``(F_0 ⊗ … ⊗ F_{K-1}) x`` for every row of ``x [M, Π c_i]`` -> ``[M, Π r_i]``.

    Out-of-place (autograd- and ``torch.func``-safe). Factors must have ``x``'s dtype/device.

    Example:
        >>> a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        >>> x = torch.randn(7, 10, dtype=torch.float64)
        >>> torch.allclose(kron_apply(x, [a, b]), x @ torch.kron(a, b).T)
        True
    """
    m = x.shape[0]
    cols = [f.shape[1] for f in factors]
    pre = m
    y = x
    for i, f in enumerate(factors):
        post = math.prod(cols[i + 1 :])
        if post == 1:
            y = y.reshape(-1, cols[i]) @ f.T
        else:
            y = torch.matmul(f, y.reshape(pre, cols[i], post))
        pre *= f.shape[0]
    return y.reshape(m, math.prod(f.shape[0] for f in factors))


def kron_apply_into(x: Tensor, factors: Sequence[Tensor], work: tuple[Tensor, Tensor]) -> Tensor:
    """Same map as :func:`kron_apply`, writing each stage into one of two flat work buffers.

    ``x`` may itself be a view at the start of one of the buffers; stages alternate buffers so
    input and output never alias. The result is a view into a work buffer (copy it out before
    the buffers are reused). Not for tensors that need gradients.

    Args:
        x: ``[M, Π c_i]``.
        factors: ``[r_i, c_i]`` matrices, ``x``'s dtype and device.
        work: two contiguous 1-D buffers, each with at least ``M · max_stage_size`` elements.

    Returns:
        ``[M, Π r_i]``, a view into ``work[0]`` or ``work[1]``.
    """
    m = x.shape[0]
    cols = [f.shape[1] for f in factors]
    k = 1 if x.data_ptr() == work[0].data_ptr() else 0
    pre = m
    y = x
    for i, f in enumerate(factors):
        post = math.prod(cols[i + 1 :])
        r = f.shape[0]
        out = work[k][: pre * r * post]
        if post == 1:
            torch.mm(y.reshape(-1, cols[i]), f.T, out=out.view(-1, r))
        else:
            torch.matmul(f, y.reshape(pre, cols[i], post), out=out.view(pre, r, post))
        y = out
        k ^= 1
        pre *= r
    return y.view(m, math.prod(f.shape[0] for f in factors))


def kron_apply_into_lead(
    x: Tensor, factors: Sequence[Tensor], work: tuple[Tensor, Tensor], lead: int
) -> Tensor:
    """:func:`kron_apply_into` for inputs that are zero beyond the first ``lead`` slices of axis 0.

    ``x [M, lead · Π_{i>0} c_i]`` holds only those slices (e.g. an N-vector zero-padded to N_p, with
    ``lead = ceil(N / Π_{i>0} c_i)``); the result is ``(F_0 ⊗ … ⊗ F_{K-1})`` applied to the full,
    zero-extended rows, ``[M, Π r_i]``. The trailing factors run on the ``lead`` slices only and then
    ``F_0[:, :lead]``: with the CNN's N = 151,498 padded to 2^18 (``lead`` 5 of 8) that skips 37% of
    the multiply-adds that :func:`kron_apply_into` spends on zeros. Same buffers and aliasing rules.

    Example:
        >>> fs = [torch.randn(4, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)]
        >>> x = torch.randn(2, 6, dtype=torch.float64)             # 2 of the 4 leading slices
        >>> full = torch.cat([x, x.new_zeros(2, 6)], dim=1)           # zero-extended to 12
        >>> work = (torch.empty(2 * 12, dtype=torch.float64), torch.empty(2 * 12, dtype=torch.float64))
        >>> _ = work[0][:12].copy_(x.reshape(-1))
        >>> out = kron_apply_into_lead(work[0][:12].view(2, 6), fs, work, lead=2)
        >>> torch.allclose(out, kron_apply(full, fs))
        True
    """
    m = x.shape[0]
    f0 = factors[0]
    post = math.prod(f.shape[1] for f in factors[1:])
    if len(factors) == 1:
        y = x.reshape(m * lead, 1)
    else:
        y = kron_apply_into(x.reshape(m * lead, post), factors[1:], work)
    rows = y.shape[1]
    other = work[1] if y.data_ptr() == work[0].data_ptr() else work[0]
    out = other[: m * f0.shape[0] * rows].view(m, f0.shape[0], rows)
    torch.matmul(f0[:, :lead], y.view(m, lead, rows), out=out)
    return out.view(m, f0.shape[0] * rows)

