"""Which per-slice kernel K_c makes the best influence: same stored rows and slices, only K_c changed.

For one run of a task of ``_attr_tasks`` (trained with ``GradientSketch(curvature="fisher")``, so it
holds the sampled-label Fisher), computes at every slice's saved weights, with the run's own sketch:

- ``GG``: GᵀG of the stored loss gradients (the empirical Fisher);
- ``F1``: the sampled-label Fisher the callback wrote (one label per example);
- ``GN``: the exact Gauss–Newton Σ_t Σ_y p_y ∇ℓ_y∇ℓ_yᵀ (every class, weighted by p_y);
- ``margin``: TRAK's kernel Σ_t ∇m_t∇m_tᵀ of the margin gradients (what the default now gathers);

then the LDS of Σ_c q_c (K_c + ρ tr(K_c)/T I)⁻¹ G_cᵀ / C over ρ, with margin-gradient queries, on
the held-out queries, and the ρ a user would pick on the validation split.

Run: ``python benchmarks/kernel_study.py [--task digits_cnn] [--dim 1024] [--run 0]``
(RESULTS.md, "TRAK's margin kernel").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _attr_tasks as T  # noqa: E402

from lightning_sketch.attribution import Attributor  # noqa: E402
from lightning_sketch.attribution.curvature import read_curvature  # noqa: E402

RHO = [float(10.0**e) for e in np.arange(-3, 2.01, 0.5)]


def _weighted_class_loss(module, batch):
    """sqrt(p_y) · (−log p_y) with p_y detached: Σ over classes of its gradient outer products is the GN."""
    loss = module.per_example_loss(batch)
    return loss * torch.exp(-loss).detach().sqrt()


def kernels(task, run_dir, module, classes: int):
    sp = T.splits(task)
    x, y = sp.train
    att = Attributor(run_dir, module, method="trak")
    both = T.dict_batch(torch.cat([sp.query[0], sp.val[0]]), torch.cat([sp.query[1], sp.val[1]]))
    Q = att.query_sketches(both)  # margin gradients (the task's module defines per_example_margin)
    G, K = [], {"GG": [], "F1": [], "GN": [], "margin": []}
    margin_rows = att.query_sketches(T.dict_batch(x, y))
    gn_att = Attributor(run_dir, module, method="trak", query_loss_fn=_weighted_class_loss)
    xs = torch.cat([x] * classes)
    ys = torch.cat([torch.full_like(y, c) for c in range(classes)])
    gn_rows = gn_att.query_sketches(T.dict_batch(xs, ys))
    for c, name in enumerate(att.checkpoints):
        pos = att._engine._positions(0, name)
        g = torch.zeros(len(att.ids), att.sketch.sketch_dim, dtype=torch.float64)
        for sl, blk in att.runs[0].iter_blocks(name):
            g[pos[sl]] = blk.to(torch.float64)
        G.append(g)
        K["GG"].append((g.T @ g, len(g)))
        f1, meta = read_curvature(att.runs[0].root, name, att.sketch.spec)
        K["F1"].append((f1, int(meta["count"])))
        K["GN"].append((gn_rows[c].T @ gn_rows[c], len(g)))
        K["margin"].append((margin_rows[c].T @ margin_rows[c], len(g)))
    return Q, G, K, len(sp.query[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="digits_cnn")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--run", type=int, default=0)
    p.add_argument("--out", default=str(T.CACHE / "kernel_study"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = T.get_task(a.task)
    runs = T.fit_runs(task, a.run + 1, Path(a.out) / f"{a.task}_D{a.dim}",
                      callback_kwargs={"curvature": "fisher"}, sketch_dim=a.dim, reuse=True)
    run_dir, module = runs[a.run]
    gt = T.ground_truth(task)
    Q, G, K, nq = kernels(task, run_dir, module, classes=10)
    for kind, per_slice in K.items():
        parts = []
        for (k, t), q, g in zip(per_slice, Q, G):
            s, U = torch.linalg.eigh(k)
            parts.append((s.clamp_min(0), q @ U, g @ U, float(k.trace()) / t))
        val, qry = [], []
        for rho in RHO:
            sc = sum((qU / (s + rho * unit)) @ gU.T for s, qU, gU, unit in parts) / len(parts)
            qry.append(T.lds_ci(sc[:nq], gt.masks, gt.query_outputs, n_boot=1)[0])
            val.append(T.lds_ci(sc[nq:], gt.masks, gt.val_outputs, n_boot=1)[0])
        i = int(np.argmax(val))
        print(f"{a.task} D={a.dim} run {a.run} K={kind:6s} validation picks ρ={RHO[i]:.3g}: query LDS "
              f"{qry[i]:.3f} (best {max(qry):.3f})", flush=True)
        print("   over ρ " + " ".join(f"{r:.3g}" for r in RHO) + ":\n   " + " ".join(f"{v:.3f}" for v in qry))


if __name__ == "__main__":
    main()
