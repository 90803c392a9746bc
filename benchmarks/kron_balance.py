"""One-hot spread of the Kronecker-Haar restrictions (QK prefixes, AFFD/AFJL with ``kron_orthogonal``).

Prints the relative standard deviation of ‖Φx‖² over 64 one-hot inputs x and 5 seeds (N = 2^14,
D = 2^10), and for QK the spread of the first d coordinates of a D_max = 1024 sketch (rescaled by
√(D_max/d)) beside a fresh d-dimensional QK of the same seed. Run from the repository root:

    python benchmarks/kron_balance.py
"""

from __future__ import annotations

import torch

from lightning_sketch.sketches import make


def _one_hots(n: int, count: int = 64) -> torch.Tensor:
    cols = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:count]
    x = torch.zeros(count, n, dtype=torch.float64)
    x[torch.arange(count), cols] = 1.0
    return x


def main() -> None:
    torch.set_num_threads(1)
    n, d = 2**14, 2**10
    x = _one_hots(n)
    for opts in ({"kind": "affd"}, {"kind": "affd", "preconditioner": "kron_orthogonal"},
                 {"kind": "afjl"}, {"kind": "afjl", "preconditioner": "kron_orthogonal"}, {"kind": "qk"}):
        vals = torch.cat([(make(dim=n, sketch_dim=d, seed=s, **opts).apply(x) ** 2).sum(1) for s in range(5)])
        print(f"{opts}: mean {float(vals.mean()):.3f}, relative std {float(vals.std() / vals.mean()):.3f}")
    for dd in (16, 64):
        pre, fresh = [], []
        for s in range(5):
            pre.append((make("qk", n, 1024, seed=s).apply(x)[:, :dd] ** 2).sum(1) * 1024 / dd)
            fresh.append((make("qk", n, dd, seed=s).apply(x) ** 2).sum(1))
        p, f = torch.cat(pre), torch.cat(fresh)
        print(f"qk d={dd}: prefix of D_max=1024 relative std {float(p.std() / p.mean()):.3f}, "
              f"fresh relative std {float(f.std() / f.mean()):.3f}")


if __name__ == "__main__":
    main()
