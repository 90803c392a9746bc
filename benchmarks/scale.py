"""Store scale benchmark: append throughput, index build, query latency, recall@10, bytes per row.

Data are sketches of REAL per-example gradients, not isotropic noise: a small tanh MLP
(64-32-10, N = 2,410 parameters) is trained on sklearn digits, then per-example gradients
(``torch.func.vmap(grad)``) of an augmented digits set (random ±1-pixel shifts and pixel noise of
the 1,797 images, random labels kept to the image's class) are sketched to D = 1024 with the
``dense`` sketch. Queries are sketches of a separately drawn augmented set.

Rows are generated in chunks straight into a :class:`SketchStore` (the append timing covers only
``append``/``commit``); the store is cached under ``benchmarks/.cache/`` and reused by later runs.

    python benchmarks/scale.py --quick                 # smoke run, about a minute
    python benchmarks/scale.py --sizes 100000 1000000  # the full run (about 20 min on 2 cores)

Ground truth is the exact torch brute-force search (``exact_topk``) on a subsample of queries.
"""

from __future__ import annotations

import os

# OpenMP threads spinning while they wait collapse throughput on a shared 2-core machine (FAISS
# single-query HNSW latency 20 ms -> 0.2 ms, PQ training 3x faster, measured); set before imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_sketch.sketches import make  # noqa: E402
from lightning_sketch.store import SketchStore, exact_topk  # noqa: E402

CACHE = Path(__file__).with_name(".cache")


def _model_and_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.reshape(-1, 64)), y).backward()
        opt.step()
    return model, x, y


def _augment(x: torch.Tensor, y: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, len(x), (n,), generator=g)
    imgs = x[idx]
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    out = torch.zeros_like(imgs)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[m] = torch.roll(imgs[m], shifts=(dy, dx), dims=(1, 2))
    out = (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(0, 1)
    return out.reshape(n, 64), y[idx]


class Sketcher:
    """Per-example gradients of the digits MLP, sketched to D with a dense sketch."""

    def __init__(self, d: int, seed: int = 0):
        self.model, self.x, self.y = _model_and_data(seed)
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        n_params = sum(p.numel() for p in self.params.values())
        self.sketch = make("dense", n_params, d, seed=seed)

        def loss_one(p, xi, yi):
            out = torch.func.functional_call(self.model, p, (xi[None],))
            return torch.nn.functional.cross_entropy(out, yi[None])

        self.grad_fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))

    def rows(self, n: int, g: torch.Generator) -> np.ndarray:
        xa, ya = _augment(self.x, self.y, n, g)
        grads = self.grad_fn(self.params, xa, ya)
        flat = torch.cat([grads[k].reshape(n, -1) for k in self.params], dim=1)
        return self.sketch.apply(flat).numpy().astype(np.float32)


def build_store(n: int, d: int, sk: Sketcher, chunk: int, commit_every: int) -> tuple[SketchStore, dict]:
    path = CACHE / f"store-n{n}-d{d}"
    meta_path = path / "bench_meta.json"
    if meta_path.exists():
        store = SketchStore.open(path, verify="size")
        if store.num_rows == n:
            return store, json.loads(meta_path.read_text())
    shutil.rmtree(path, ignore_errors=True)
    store = SketchStore.create(path, sk.sketch.spec)
    store.add_checkpoint("final", step=100, lr=0.5)
    g = torch.Generator().manual_seed(1)
    t_gen = t_app = 0.0
    for i, start in enumerate(range(0, n, chunk)):
        t = time.perf_counter()
        rows = sk.rows(min(chunk, n - start), g)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        store.append(np.arange(start, start + len(rows)), rows, checkpoint="final")
        if (i + 1) % commit_every == 0:
            store.commit()
        t_app += time.perf_counter() - t
    t = time.perf_counter()
    store.commit()
    t_app += time.perf_counter() - t
    meta = {"append_s": t_app, "generate_s": t_gen, "rows": n}
    meta_path.write_text(json.dumps(meta))
    store.close()
    return SketchStore.open(path, verify="size"), meta


def _index_bytes(index) -> int:
    path = CACHE / "tmp.index"
    import faiss

    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def bench_size(n: int, d: int, sk: Sketcher, args) -> list[dict]:
    store, meta = build_store(n, d, sk, args.chunk, args.commit_every)
    results = []
    row_bytes = store.size_bytes / n
    print(f"\n== n = {n:,} rows, D = {d}: append {n / meta['append_s']:,.0f} rows/s "
          f"(generation {n / meta['generate_s']:,.0f} rows/s), store {row_bytes:,.0f} B/row", flush=True)
    queries = sk.rows(args.queries, torch.Generator().manual_seed(2))
    nq_exact = min(args.queries, args.exact_queries if n >= 500_000 else args.queries)
    truth_path = store.path / f"bench_truth_q{nq_exact}.npy"
    t = time.perf_counter()
    if truth_path.exists():
        truth = np.load(truth_path)
    else:
        _, truth = exact_topk(queries[:nq_exact], store.vectors(), store.ids(), 10, dtype=torch.float32)
        np.save(truth_path, truth)
    t_exact = time.perf_counter() - t
    print(f"exact torch ground truth: {nq_exact} queries in {t_exact:.1f} s", flush=True)
    sqrt_n = math.sqrt(n)
    configs = [("flat", {}, [{}])]
    nlist = int(args.nlist_factor * sqrt_n)
    configs.append(("ivf", {"nlist": nlist, "max_train": 40 * nlist}, [{"nprobe": p} for p in args.nprobe]))
    configs.append(("ivfpq", {"nlist": nlist, "max_train": 40 * nlist, "m": args.pq_m, "nbits": 8},
                    [{"nprobe": p, "candidates": args.pq_candidates} for p in args.nprobe]))
    if n <= args.hnsw_max:
        configs.append(("hnsw", {"M": 32, "ef_construction": 64}, [{"ef_search": e} for e in args.ef_search]))
    for kind, build, sweeps in configs:
        if kind not in args.kinds:
            continue
        t = time.perf_counter()
        store.build_index(kind, persist=False, **build)
        t_build = time.perf_counter() - t
        index = store._views.cache[("index", "final", kind, None, "cpu", store.generation)]
        idx_bytes = _index_bytes(index)
        for knobs in sweeps:
            store.search(queries[:1], 10, index=kind, **knobs)  # warm-up
            t = time.perf_counter()
            for i in range(args.single):
                store.search(queries[i : i + 1], 10, index=kind, **knobs)
            single_ms = 1000 * (time.perf_counter() - t) / args.single
            t = time.perf_counter()
            _, found = store.search(queries[:nq_exact], 10, index=kind, **knobs)
            batched_ms = 1000 * (time.perf_counter() - t) / nq_exact
            recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, truth)]))
            row = {"n": n, "kind": kind, "build_s": round(t_build, 2), **build, **knobs,
                   "recall@10": round(recall, 4), "single_ms": round(single_ms, 2),
                   "batched_ms_per_query": round(batched_ms, 3), "index_bytes_per_row": round(idx_bytes / n, 1),
                   "store_bytes_per_row": round(row_bytes, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
        store._views.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20k rows, fewer queries")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfpq", "hnsw"])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--exact-queries", type=int, default=200, help="ground-truth queries at >= 5e5 rows")
    parser.add_argument("--single", type=int, default=20, help="single-query latency repetitions")
    parser.add_argument("--nlist-factor", type=float, default=1.0, help="nlist = factor * sqrt(n)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--pq-candidates", type=int, default=100)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW above this many rows")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--commit-every", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=CACHE / "scale_results.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.single, args.pq_m = [20_000], 100, 5, 32
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    CACHE.mkdir(exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, threads={args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    sk = Sketcher(args.dim)
    results = []
    for n in args.sizes:
        results += bench_size(n, args.dim, sk, args)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
