"""Proponents and opponents from one pass over the stored rows, against two ``top_k`` calls.

Builds a synthetic store (a small MLP's layout, AFFD sketch D = 64, C = 2 ``tracin`` slices of T
random rows each) in a temporary folder and ranks Q random query sketches (``sketches=``, so no
query gradient is timed): ``top_k`` + ``top_k(opponents=True)`` stream the rows twice,
``Attributor.proponents_opponents`` once. Asserts that both give the same ids and scores, and prints
the wall time of each of ``--reps`` repetitions after one warm-up call.

Run: ``python benchmarks/one_pass_ranking.py --rows 200000 --queries 64 --reps 3``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lightning_sketch.attribution import Attributor, TracIn
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    model = _MLP().double()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, a.dim, seed=0)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = SketchStore.create(Path(tmp) / "s", sketch.spec, layout=layout)
        for c in range(2):
            store.add_checkpoint(f"c{c}", step=c, lr=0.1)
            store.append(torch.arange(a.rows), torch.randn(a.rows, a.dim, generator=g), checkpoint=f"c{c}")
        store.commit()
        store.close()
        att = Attributor(Path(tmp) / "s", model, method=TracIn(), current_weights=True)
        qs = [[torch.randn(a.queries, a.dim, generator=g, dtype=torch.float64) for _ in range(2)]]
        att.top_k(None, k=a.k, sketches=qs)  # warm-up: page cache, norms, positions
        for _ in range(a.reps):
            t0 = time.perf_counter()
            pro = att.top_k(None, k=a.k, sketches=qs)
            opp = att.top_k(None, k=a.k, opponents=True, sketches=qs)
            t1 = time.perf_counter()
            both = att.proponents_opponents(None, k=a.k, sketches=qs)
            t2 = time.perf_counter()
            assert all(torch.equal(x, y) for p, q in zip((pro, opp), both) for x, y in zip(p, q))
            print(f"T={a.rows} D={a.dim} Q={a.queries} k={a.k}, 2 slices: two top_k {t1 - t0:.3f} s, "
                  f"proponents_opponents {t2 - t1:.3f} s")
        att.store.close()


if __name__ == "__main__":
    main()
