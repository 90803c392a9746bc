"""Peak memory and latency of every Attributor method at 10^5 and 10^6 stored rows.

Builds a synthetic run directory (a small MLP's layout, AFFD sketch D = 256, C = 2 checkpoint
slices of T rows each, saved weights and sampled-label curvature files, as ``GradientSketch``
writes them) whose slices are committed in S segments each (``--segments``: S commits per slice,
as the inline mode commits once per epoch; the rows are the same for every S), and answers one
top-10 query batch of 10 queries per method in a fresh subprocess, reporting that process's peak
RSS (``VmHWM``), the peak RSS of a process that only imports and opens the run (the baseline), the
size of the stored rows and the latency of the first (cold: checksums, kernels and norms) and
second (warm) query. The ``reopen`` row opens the run and queries (grad_dot) twice in one
process: the second open hashes nothing the first verified.

Run: ``python benchmarks/query_memory.py --rows 100000,1000000 --segments 1,10``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

D, C, SEED, Q = 256, 2, 0, 10
METHODS = ("baseline", "grad_dot", "tracin", "grad_cos", "trak", "fisher_if", "arnoldi_if", "reopen")


class Net(nn.Module):
    """MLP 32 → 64 → 10 with the per-example conventions (N = 2,826 parameters)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")


def build(root: Path, T: int, S: int) -> None:
    from lightning_sketch.attribution.curvature import write_curvature
    from lightning_sketch.gradients import ParamLayout
    from lightning_sketch.sketches import make
    from lightning_sketch.store import SketchStore

    if (root / "done").exists():
        return
    model = Net()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=SEED)
    store = SketchStore.create(root / "store", sketch.spec, layout=layout)
    rng = np.random.default_rng(0)
    for c in range(C):
        name = f"step-{c}"
        store.add_checkpoint(name, step=c, lr=0.1)
        rows = np.empty((T, D), dtype=np.float32)
        for s in range(0, T, 1 << 16):  # clustered rows, generated in blocks
            e = min(T, s + (1 << 16))
            rows[s:e] = rng.standard_normal((e - s, D), dtype=np.float32) * 0.1
            rows[np.arange(s, e), rng.integers(0, D, e - s)] += 1.0
        bounds = np.linspace(0, T, S + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):  # one commit (segment) per part
            store.append(np.arange(a, b), rows[a:b], checkpoint=name)
            store.commit()
        store.save_weights(name, {n: t.detach().clone() for n, t in layout.params(model).items()},
                           root / "weights",
                           layout.fingerprint())
        A = torch.randn(D, 2 * D, dtype=torch.float64)
        write_curvature(root, name, A @ A.T, T, sketch.spec, "sampled", store=store)
        store.commit()
        del rows
    store.close()
    (root / "done").touch()


def child(root: Path, method: str) -> dict:
    from lightning_sketch.attribution import Attributor

    torch.manual_seed(1)
    query = {"x": torch.randn(Q, 32), "y": torch.arange(Q) % 10, "index": torch.arange(Q)}
    model = Net()
    kw = {}
    if method == "arnoldi_if":
        U, _ = torch.linalg.qr(torch.randn(D, 20, dtype=torch.float64))
        kw["eigenpairs"] = (torch.linspace(10.0, 1.0, 20, dtype=torch.float64), U)
    out: dict = {"method": method}
    if method == "reopen":
        for i in (1, 2):
            t0 = time.perf_counter()
            ids, _ = Attributor(root, model, method="grad_dot").top_k(query, k=10)
            out[f"query_{i}_s"] = time.perf_counter() - t0
        out["top1"] = int(ids[0, 0])
        return out
    t0 = time.perf_counter()
    att = Attributor(root, model, method="trak" if method == "baseline" else method, **kw)
    out["open_s"] = time.perf_counter() - t0
    if method != "baseline":
        t0 = time.perf_counter()
        ids, s = att.top_k(query, k=10)
        out["cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        att.top_k(query, k=10)
        out["warm_s"] = time.perf_counter() - t0
        out["top1"] = int(ids[0, 0])
    out["peak_rss_mb"] = _vm_hwm_mb()
    return out


def _vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="100000,1000000")
    p.add_argument("--segments", default="1,10", help="segments (commits) per slice, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--dir", default="/tmp/lightning_sketch_query_memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("ROOT", "METHOD"))
    p.add_argument("--fresh", action="store_true", help="rebuild the synthetic runs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(Path(a.child[0]), a.child[1])))
        return []
    results = []
    for T, S in [(int(t), int(s)) for t in a.rows.split(",") for s in a.segments.split(",")]:
        root = Path(a.dir) / f"T{T}-S{S}"
        t0 = time.perf_counter()
        if a.fresh:
            shutil.rmtree(root, ignore_errors=True)
        build(root, T, S)
        print(f"T={T}, S={S}: store built in {time.perf_counter() - t0:.0f} s; "
              f"rows {C * T * D * 4 / 2**20:.0f} MiB ({C} slices x {T} x D={D} float32, {S} segment(s) each)",
              flush=True)
        if a.build_only:
            continue
        for m in a.methods.split(","):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                os.environ.get("PYTHONPATH", "")]))
            res = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--child", str(root),
                                  m],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"  {m}: failed\n{res.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["rows"], r["segments"] = T, S
            results.append(r)
            if m == "reopen":
                print(f"  {m:<11} first open+query {r['query_1_s']:6.2f} s  second {r['query_2_s']:6.2f} s",
                      flush=True)
                continue
            print(f"  {m:<11} peak RSS {r['peak_rss_mb']:7.0f} MiB  open {r['open_s']:6.2f} s" + (
                f"  cold {r['cold_s']:6.2f} s  warm {r['warm_s']:6.2f} s  top1 {r['top1']}" if "cold_s" in r
                else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
