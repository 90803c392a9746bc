"""Every sketch kind against an independent dense construction of its equation (arXiv 2402.03994).

The conformance "matrix" check (``apply(x) == x @ apply(I)ᵀ``) only proves linearity. Here each
kind's matrix is rebuilt in the test from the sketch's random state, with plain dense linear
algebra and nothing from the package but the seed hashing (:func:`derive_seed`, which defines the
random streams):

- the random draws (signs, Gaussians, permutations, Haar factors) are redrawn from the named
  streams with plain ``torch`` calls;
- every structured factor is built as a matrix here: the Sylvester Walsh–Hadamard by its
  recursion, row/column permutation matrices, ``torch.kron`` of the factors, ``diag`` of the
  signs and Gaussians, the restriction R_D as a slice, the real Fourier basis from cos/sin, Haar
  factors by a sign-corrected QR (Mezzadri 2007);
- the matrix is the product the paper writes: eq. 2 (FJL), eq. 3/12 (FFD), eq. 6 (AFFD),
  eq. 7 (AFJL), eq. 8 (QK), and the dense Gaussian baseline.

Then ``apply`` and ``transpose`` of the real sketch must equal ``x @ Φᵀ`` and ``y @ Φ`` in float64.
A mutation check builds AFFD/AFJL variants without the per-factor permutations (their defining
feature) or with a changed scale and requires the same comparison to fail for them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sketch.sketches import make
from lightning_sketch.sketches.affd import AFFDSketch
from lightning_sketch.sketches.afjl import AFJLSketch
from lightning_sketch.sketches.base import derive_seed

F64 = torch.float64


# ---------------------------------------------------------------- independent building blocks
def gen(kind: str, seed: int, stream: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, kind, stream))
    return g


def sylvester(n: int) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard by the recursion H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factor_sizes(n: int, max_block: int) -> list[int]:
    """The paper's ``compute_kronecker_shapes`` (Listing 4): remainder factor first."""
    out = []
    while n > 1:
        out.append(min(n, max_block))
        n //= max_block
    return out[::-1]


def kron_all(mats: list[torch.Tensor]) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=F64)
    for m in mats:
        out = torch.kron(out, m)
    return out


def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    """P with (P u)_j = u_{perm[j]}, so P @ H permutes the rows of H and H @ Pᵀ its columns."""
    return torch.eye(len(perm), dtype=F64)[perm]


def signs(kind: str, seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen(kind, seed, "signs"), dtype=torch.int8).to(F64) * 2 - 1


def haar(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def real_fourier(n: int) -> torch.Tensor:
    """Orthonormal real DFT rows: 1, √2 cos(2πkj/n), (Nyquist), -√2 sin(2πkj/n), all / √n."""
    j = torch.arange(n, dtype=F64)
    m = (n - 1) // 2
    rows = [torch.ones(1, n, dtype=F64)]
    k = torch.arange(1, m + 1, dtype=F64)[:, None]
    rows.append(math.sqrt(2) * torch.cos(2 * math.pi * k * j / n))
    if n % 2 == 0:
        rows.append(torch.cos(math.pi * j)[None, :])
    rows.append(-math.sqrt(2) * torch.sin(2 * math.pi * k * j / n))
    return torch.cat(rows) / math.sqrt(n)


def balanced_rows(sizes: list[int], d: int) -> list[int]:
    """R_D of the Kronecker-Haar kinds: the rows of ⊗_i Q_i kept, in output order.

    The bits of next_pow2(D) go one at a time to the factor with the fewest so far that has room
    (ties: the larger factor, then the later one); bit t of output coordinate j is the next bit of
    that factor's row index. So every power-of-two prefix is a balanced product of leading rows.
    """
    d_pad = next_pow2(d)
    caps = [s.bit_length() - 1 for s in sizes]
    have = [0] * len(sizes)
    owners = []
    for _ in range(d_pad.bit_length() - 1):
        i = min((j for j in range(len(sizes)) if have[j] < caps[j]), key=lambda j: (have[j], -caps[j], -j))
        have[i] += 1
        owners.append(i)
    out = []
    for j in range(d_pad):
        r, filled = [0] * len(sizes), [0] * len(sizes)
        for t, i in enumerate(owners):
            r[i] |= ((j >> t) & 1) << filled[i]
            filled[i] += 1
        out.append(sum(r[i] * math.prod(sizes[i + 1 :]) for i in range(len(sizes))))
    return out[:d]


def pad_eye(n: int, n_pad: int) -> torch.Tensor:
    """The zero-padding map R^n → R^{n_pad} as an [n_pad, n] matrix."""
    return torch.eye(n_pad, n, dtype=F64)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------- reference matrices, one per equation
def ref_dense(n, d, seed, block_rows=256, **_):
    blocks = []
    for b in range(math.ceil(d / block_rows)):
        rows = min(block_rows, d - b * block_rows)
        blocks.append(torch.randn(rows, n, generator=gen("dense", seed, f"block/{b}"), dtype=torch.float32))
    return (torch.cat(blocks) / math.sqrt(d)).to(F64)  # the entries are stored in float32


def ref_fjl(n, d, seed, nnz_per_row=8, **_):
    """eq. 2: √(N/D) · G_s · H_N · B, G_s sparse with k entries g/√k per row."""
    n_pad = next_pow2(n)
    g = gen("fjl", seed, "sparse")
    idx = torch.randint(0, n_pad, (d, nnz_per_row), generator=g)
    vals = torch.randn(d, nnz_per_row, generator=g, dtype=torch.float32).to(F64)
    gs = torch.zeros(d, n_pad, dtype=F64)
    for r in range(d):
        for c in range(nnz_per_row):
            gs[r, idx[r, c]] += vals[r, c] / math.sqrt(nnz_per_row)
    h = sylvester(n_pad) / math.sqrt(n_pad)
    return math.sqrt(n_pad / d) * gs @ h @ torch.diag(signs("fjl", seed, n_pad)) @ pad_eye(n, n_pad)


def ref_ffd(n, d, seed, **_):
    """eq. 12 (eq. 3 transposed): Σ_b B_b H_D Π_bᵀ G_b H_D x_b, σ = 1, blocks of length D."""
    n_pad = next_pow2(n)
    nb = n_pad // d
    g = gen("ffd", seed, "perms")
    perms = [torch.randperm(d, generator=g) for _ in range(nb)]
    b = signs("ffd", seed, n_pad).view(nb, d)
    gauss = torch.randn(n_pad, generator=gen("ffd", seed, "gauss"), dtype=torch.float32).to(F64).view(nb, d)
    h = sylvester(d) / math.sqrt(d)
    blocks = [torch.diag(b[i]) @ h @ perm_matrix(perms[i]) @ torch.diag(gauss[i]) @ h for i in range(nb)]
    return torch.cat(blocks, dim=1) @ pad_eye(n, n_pad)


def _transforms(kind, seed, n_pad, max_block, preconditioner, passes, permute=True):
    """T1 (rows of each factor permuted) and T2 (columns permuted), or Kronecker Haar, or real DFT."""
    if preconditioner == "fft":
        f = real_fourier(n_pad)
        return [f for _ in passes]
    out = []
    for p in passes:
        mats = []
        for i, s in enumerate(factor_sizes(n_pad, max_block)):
            g = gen(kind, seed, f"{p}/{i}")
            if preconditioner == "hadamard":
                h = sylvester(s) / math.sqrt(s)
                perm = torch.randperm(s, generator=g) if permute else torch.arange(s)
                pm = perm_matrix(perm)
                mats.append(pm @ h if p == "t1" else h @ pm.T)
            else:  # kron_orthogonal: stored as float32
                mats.append(haar(s, g).to(torch.float32).to(F64))
        out.append(kron_all(mats))
    return out


def ref_afamily(kind, n, d, seed, preconditioner="hadamard", max_block=32, permute=True, scale=None, **_):
    """eq. 6 (AFFD): R_D √(N/D) T2 G T1 B;  eq. 7 (AFJL): R_D √(N/D) G T1 B (N padded unless fft)."""
    n_pad = n if preconditioner == "fft" else next_pow2(n)
    passes = ("t1", "t2") if kind == "affd" else ("t1",)
    ts = _transforms(kind, seed, n_pad, max_block, preconditioner, passes, permute)
    gauss = torch.randn(n_pad, generator=gen(kind, seed, "gauss"), dtype=torch.float32).to(F64)
    b = torch.eye(n_pad, dtype=F64) if preconditioner == "kron_orthogonal" else torch.diag(signs(kind, seed, n_pad))
    m = torch.diag(gauss) @ ts[0] @ b
    if kind == "affd":
        m = ts[1] @ m
    scale = math.sqrt(n_pad / d) if scale is None else scale
    keep = balanced_rows(factor_sizes(n_pad, max_block), d) if preconditioner == "kron_orthogonal" else list(range(d))
    return scale * m[keep] @ pad_eye(n, n_pad)


def ref_qk(n, d, seed, max_block=32, **_):
    """eq. 8: √(N/D) · (Q^(1) ⊗ … ⊗ Q^(K)), Q^(i) the first D_i rows of a Haar [B_i, B_i]."""
    n_pad = next_pow2(n)
    sizes = factor_sizes(n_pad, max_block)
    mats = [haar(s, gen("qk", seed, f"factor/{i}")).to(torch.float32).to(F64) for i, s in enumerate(sizes)]
    return math.sqrt(n_pad / d) * kron_all(mats)[balanced_rows(sizes, d)] @ pad_eye(n, n_pad)


def reference(sketch) -> torch.Tensor:
    spec = dict(sketch.spec)
    kind, n, d, seed = spec.pop("kind"), spec.pop("dim"), spec.pop("sketch_dim"), spec.pop("seed")
    if kind == "identity":
        return torch.eye(n, dtype=F64)
    if kind == "dense":
        return ref_dense(n, d, seed, **spec)
    if kind == "fjl":
        return ref_fjl(n, d, seed, **spec)
    if kind == "ffd":
        return ref_ffd(n, d, seed)
    if kind in ("affd", "afjl"):
        return ref_afamily(kind, n, d, seed, **spec)
    if kind == "qk":
        return ref_qk(n, d, seed, **spec)
    raise AssertionError(f"no reference for {kind}")


def reference_error(sketch, phi: torch.Tensor, rows: int = 5) -> float:
    """Largest relative error of apply and transpose against x @ Φᵀ and y @ Φ (float64)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, sketch.dim, generator=g, dtype=F64)
    y = torch.randn(rows, sketch.sketch_dim, generator=g, dtype=F64)
    errs = []
    for got, want in ((sketch.apply(x), x @ phi.T), (sketch.transpose(y), y @ phi)):
        errs.append(float((got - want).abs().max() / want.abs().max()))
    return max(errs)


# float64 throughout; the Haar factors and Gaussians are stored in float32 and rounded alike above.
TOL = 1e-10

CASES = [
    ("dense", {}),
    ("dense", {"chunked": True, "block_rows": 7}),
    ("fjl", {}),
    ("fjl", {"nnz_per_row": 3, "max_block": 4}),
    ("ffd", {}),
    ("ffd", {"max_block": 4}),
    ("affd", {}),
    ("affd", {"max_block": 4}),
    ("affd", {"preconditioner": "fft"}),
    ("affd", {"preconditioner": "kron_orthogonal", "max_block": 8}),
    ("afjl", {}),
    ("afjl", {"max_block": 4}),
    ("afjl", {"preconditioner": "fft"}),
    ("afjl", {"preconditioner": "kron_orthogonal", "max_block": 8}),
    ("qk", {}),
    ("qk", {"max_block": 4}),
    ("identity", {}),
]
SIZES = [(200, 24), (256, 16), (64, 64)]


@pytest.mark.parametrize(("n", "d"), SIZES, ids=[f"N{n}-D{d}" for n, d in SIZES])
@pytest.mark.parametrize(("kind", "opts"), CASES, ids=[k + "".join(f"-{v}" for v in o.values()) for k, o in CASES])
def test_sketch_equals_its_equation(kind, opts, n, d):
    if kind == "identity":
        d = n
    if kind == "ffd":
        d = 1 << (d.bit_length() - 1)
    sketch = make(kind, n, d, seed=5, **opts)
    phi = reference(sketch)
    assert phi.shape == (d, n)
    assert reference_error(sketch, phi) < TOL


@pytest.mark.parametrize("sizes", [(200, 24), (2048, 64)])
def test_qk_row_splits_are_balanced(sizes):
    """Thm 3.3 bounds QK's error through each D_i: the split gives no factor a single row while another has many."""
    n, d = sizes
    s = make("qk", n, d, seed=0)
    splits, blocks = s.row_splits, factor_sizes(next_pow2(n), 32)
    assert math.prod(splits) == next_pow2(d)
    assert all(r <= b for r, b in zip(splits, blocks))
    # every factor either holds all its rows or at least half as many as the largest D_i
    assert all(r == b or 2 * r >= max(splits) for r, b in zip(splits, blocks)), splits


# ---------------------------------------------------------------- mutation check
class _NoPermutations:
    """Mixin: the same sketch with every Kronecker factor left unpermuted (H^{π} -> H)."""

    def _build(self):
        real = torch.randperm
        try:
            torch.randperm = lambda n, generator=None, **kw: torch.arange(n)
            super()._build()
        finally:
            torch.randperm = real


class _ScaleChanged:
    """Mixin: the same sketch with √(N/D) replaced by √(N/D)·(1 + 1e-3)."""

    def _build(self):
        super()._build()
        self._set("_scale", self._scale * 1.001)


class AFFDNoPerm(_NoPermutations, AFFDSketch):
    pass


class AFJLNoPerm(_NoPermutations, AFJLSketch):
    pass


class AFFDScaled(_ScaleChanged, AFFDSketch):
    pass


class AFJLScaled(_ScaleChanged, AFJLSketch):
    pass


@pytest.mark.parametrize("n", [200, 1024])
@pytest.mark.parametrize(
    ("real", "mutants"),
    [(AFFDSketch, (AFFDNoPerm, AFFDScaled)), (AFJLSketch, (AFJLNoPerm, AFJLScaled))],
    ids=["affd", "afjl"],
)
def test_mutants_fail_the_reference_and_the_real_sketch_passes(real, mutants, n):
    d = 32
    sketch = real(n, d, seed=11, max_block=8)
    phi = reference(sketch)
    assert reference_error(sketch, phi) < TOL
    for mutant_cls in mutants:
        mutant = mutant_cls(n, d, seed=11, max_block=8)
        assert mutant.spec == sketch.spec  # same kind, seed and options: only the construction differs
        # the mutants are still linear and adjoint-consistent, so the linearity checks cannot see them
        x = torch.randn(3, n, dtype=F64)
        assert torch.allclose(mutant.apply(x), x @ mutant.to_dense().T)
        assert reference_error(mutant, phi) > 1e-4, mutant_cls.__name__


def test_the_permutation_free_reference_differs_from_the_real_one():
    """The reference itself depends on the permutations (a reference without them would be vacuous)."""
    with_perm = ref_afamily("affd", 256, 32, seed=2, max_block=8)
    without = ref_afamily("affd", 256, 32, seed=2, max_block=8, permute=False)
    assert (with_perm - without).abs().max() > 1e-2
