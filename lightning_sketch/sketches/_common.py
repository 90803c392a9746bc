"""Helpers shared by the structured sketches: dtypes, padding, row chunks, the real FFT isometry.

Private module; the public contract is :class:`lightning_sketch.sketches.base.Sketch`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sketch._checks import is_int, refuse

__all__ = [
    "WORK_ELEMENTS",
    "check_max_block",
    "compute_dtype",
    "float_state",
    "pad_cols",
    "rademacher",
    "rfft_real",
    "rfft_real_t",
    "rows_per_chunk",
]

#: elements per work buffer of the chunked fast path (16 MiB in float32): small enough that the
#: allocator reuses the memory between calls, large enough for efficient batched matmuls.
WORK_ELEMENTS = 1 << 22


def compute_dtype(x: Tensor) -> torch.dtype:
    """float16/bfloat16 inputs are computed in float32 (and cast back); others in their own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def pad_cols(x: Tensor, n: int) -> Tensor:
    """Zero-pad the last dimension of ``x [M, k]`` to ``n >= k`` (no copy when ``k == n``)."""
    return x if x.shape[-1] == n else F.pad(x, (0, n - x.shape[-1]))


def rows_per_chunk(width: int, device: torch.device | None = None) -> int:
    """Rows processed at once by the chunked fast path for vectors of length ``width``.

    On CPU the work buffers stay at :data:`WORK_ELEMENTS`; accelerators (caching allocators,
    wide parallelism) take up to 64x more per chunk.
    """
    budget = WORK_ELEMENTS if device is None or device.type == "cpu" else 64 * WORK_ELEMENTS
    return max(1, budget // max(1, width))


def rademacher(n: int, generator: torch.Generator) -> Tensor:
    """``n`` i.i.d. ±1 signs as int8 (1 byte each)."""
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(torch.int8)


def float_state(sketch: Any, name: str, like: Tensor) -> Tensor:
    """Persistent tensor ``name`` of ``sketch`` as a float tensor of ``like``'s dtype/device (cached).

    Unlike :meth:`Sketch.state` this also casts integer state (e.g. int8 signs) to floats.
    """
    key = ("float", name, like.device, like.dtype)
    cached = sketch._cache.get(key)
    if cached is None:
        cached = sketch._state_tensors()[name].to(device=like.device, dtype=like.dtype)
        sketch._cache[key] = cached
    return cached


def check_max_block(value: Any) -> None:
    """``max_block`` must be a power of two in [2, 1024].

    arXiv 2402.03994 caps factors at about 1024 columns; its Listing 4 uses 32.
    """
    if not is_int(value) or not 2 <= value <= 1024 or value & (value - 1):
        raise refuse("max_block", "a power of two between 2 and 1024 (the paper's cap)", value,
                     hint="Use 32 (the default) or 64.")


def rfft_real(x: Tensor) -> Tensor:
    """The real DFT as an exact isometry R^n → R^n on the rows of ``x [M, n]`` (the F variant of arXiv
    2402.03994 Table 8, whose real packing the paper leaves open).

    Packing: ``rfft(x, norm="ortho")`` gives bins ``0..n//2``; the output is
    ``[Re X_0, √2·Re X_1..X_m, (Re X_{n/2} if n even), √2·Im X_1..X_m]`` with ``m = (n-1)//2``.
    DC (and Nyquist for even n) are real and appear once in the full spectrum; every other bin
    appears twice (with its conjugate), hence the √2 so that ``‖out‖ = ‖x‖``. The rows of the
    matrix are the orthonormal real Fourier basis, so the map is orthogonal and
    :func:`rfft_real_t` (its inverse) is its exact transpose. No power-of-two padding is needed.

    Example:
        >>> x = torch.randn(3, 10, dtype=torch.float64)
        >>> torch.allclose(rfft_real(x).norm(dim=1), x.norm(dim=1))
        True
    """
    n = x.shape[-1]
    z = torch.fft.rfft(x, norm="ortho")
    m = (n - 1) // 2
    root2 = math.sqrt(2.0)
    parts = [z.real[:, :1], z.real[:, 1 : m + 1] * root2]
    if n % 2 == 0:
        parts.append(z.real[:, n // 2 : n // 2 + 1])
    parts.append(z.imag[:, 1 : m + 1] * root2)
    return torch.cat(parts, dim=1)


def rfft_real_t(y: Tensor) -> Tensor:
    """Transpose (= inverse) of :func:`rfft_real` on the rows of ``y [M, n]``.

    Example:
        >>> x = torch.randn(2, 9, dtype=torch.float64)
        >>> torch.allclose(rfft_real_t(rfft_real(x)), x)
        True
    """
    n = y.shape[-1]
    m = (n - 1) // 2
    inv = 1.0 / math.sqrt(2.0)
    re = [y[:, :1], y[:, 1 : m + 1] * inv]
    if n % 2 == 0:
        re.append(y[:, m + 1 : m + 2])
    real = torch.cat(re, dim=1)
    imag = torch.cat([torch.zeros_like(y[:, :1]), y[:, n - m :] * inv], dim=1)
    if n % 2 == 0:
        imag = torch.cat([imag, torch.zeros_like(y[:, :1])], dim=1)
    return torch.fft.irfft(torch.complex(real, imag), n=n, norm="ortho")
