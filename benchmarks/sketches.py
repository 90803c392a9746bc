"""Sketch speed, persistent memory and inner-product fidelity (arXiv 2402.03994 Sec. 5.3, Tables 3, 6 and 11).

Part 1 — for N = 2^20 and D in {2^10, 2^12, 2^14, 2^16}: time to sketch 64 vectors (best of
``--repeats`` after a warm-up) and persistent memory (``state_bytes``) of every kind, against

* the dense Gaussian baseline (chunked on-the-fly: its time is ESTIMATED from two 256-row blocks,
  scaled by D/512; its memory is that of the materialised D x N float32 matrix it replaces),
* TRAK's CPU projector ``trak.projectors.BasicProjector`` (benchmark extra ``traker==0.3.2``;
  ESTIMATED from two 100-column blocks scaled by D/200, as it regenerates one block per 100
  columns on every call; memory = its resident N x 100 block),
* one ``torch.fft.rfft`` of the same vectors (the practical N log N floor).

Part 2 — the Table 6 analogue: Pearson r between sketched and exact dot products of per-example
gradients (all pairs i < j) of a small MLP with N ≈ 2^16 trained briefly on generated data
(per-example gradients by ``torch.func.vmap(grad)``), per kind and D in {2^8, ..., 2^14}.

Run: ``python benchmarks/sketches.py`` (≈ 3-5 min on 2 cores) or ``--quick`` (seconds, smoke).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_sketch.sketches import make

KINDS: list[tuple[str, str, dict]] = [
    ("affd", "affd", {}),
    ("afjl", "afjl", {}),
    ("qk", "qk", {}),
    ("fjl", "fjl", {}),
    ("ffd", "ffd", {}),
    ("affd[fft]", "affd", {"preconditioner": "fft"}),
    ("affd[kron_orth]", "affd", {"preconditioner": "kron_orthogonal"}),
]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def dense_estimate(n: int, d: int, x: torch.Tensor, repeats: int) -> float:
    """Seconds for the chunked dense sketch at D, from two 256-row blocks (time is linear in D)."""
    probe = make("dense", n, 512, seed=0, chunked=True, block_rows=256)
    return best_time(lambda: probe.apply(x), max(1, repeats - 1)) * d / 512


def trak_estimate(n: int, d: int, x: torch.Tensor, repeats: int) -> float | None:
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return None
    proj = BasicProjector(n, 200, 0, ProjectionType.normal, torch.device("cpu"), block_size=100)
    return best_time(lambda: proj.project(x, model_id=0), max(1, repeats - 1)) * d / 200


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} PiB"


def part1(n: int, ds: list[int], batch: int, repeats: int) -> None:
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(0))
    rfft = best_time(lambda: torch.fft.rfft(x), repeats)
    times: dict[str, dict[int, float]] = {}
    mem: dict[str, dict[int, int]] = {}
    print(
        f"\n## Part 1: N = 2^{int(math.log2(n))}, batch {batch}, best of {repeats} (ms per batch; persistent memory)"
    )
    print(f"{'kind':<18}" + "".join(f"{'D=2^' + str(int(math.log2(d))):>22}" for d in ds))
    for name, kind, opts in KINDS:
        times[name], mem[name] = {}, {}
        for d in ds:
            s = make(kind, n, d, seed=0, **opts)
            times[name][d] = best_time(lambda s=s: s.apply(x), repeats)
            mem[name][d] = s.state_bytes
            del s
        print(
            f"{name:<18}"
            + "".join(f"{times[name][d] * 1e3:>9.1f} ms {fmt_bytes(mem[name][d]):>10}" for d in ds)
        )
    per_row = dense_estimate(n, 1, x, repeats)  # time is linear in D: measure once, scale
    times["dense (est.)"] = {d: per_row * d for d in ds}
    mem["dense (est.)"] = {d: d * n * 4 for d in ds}
    print(
        f"{'dense (est.)':<18}"
        + "".join(f"{times['dense (est.)'][d] * 1e3:>9.0f} ms {fmt_bytes(d * n * 4):>10}" for d in ds)
    )
    trak = {d: trak_estimate(n, d, x, repeats) for d in ds[:1]}
    if trak[ds[0]] is not None:
        per_col = trak[ds[0]] / ds[0]
        times["trak (est.)"] = {d: per_col * d for d in ds}
        print(
            f"{'trak Basic (est.)':<18}"
            + "".join(f"{per_col * d * 1e3:>9.0f} ms {fmt_bytes(n * 100 * 4):>10}" for d in ds)
        )
    else:
        print("trak not installed (pip install traker==0.3.2): TRAK column skipped")
    rfft = min(rfft, best_time(lambda: torch.fft.rfft(x), repeats))
    print(f"{'rfft floor':<18}{rfft * 1e3:>9.1f} ms")

    lo, hi = ds[0], ds[-1]
    mid = 4096 if 4096 in ds else ds[len(ds) // 2]
    print(
        f"\n### Ratios (D_lo = 2^{int(math.log2(lo))}, D_hi = 2^{int(math.log2(hi))}, D_mid = 2^{int(math.log2(mid))})"
    )
    print(
        f"{'kind':<18}{'t(D_hi)/t(D_lo)':>16}{'dense/kind t@mid':>18}{'dense/kind mem@mid':>20}{'kind/rfft t@mid':>17}"
    )
    for name, _, _ in KINDS:
        t = times[name]
        print(
            f"{name:<18}{t[hi] / t[lo]:>16.2f}{times['dense (est.)'][mid] / t[mid]:>18.1f}"
            f"{mid * n * 4 / max(1, mem[name][mid]):>20.0f}{t[mid] / rfft:>17.2f}"
        )
    if "trak (est.)" in times:
        print(f"trak/affd time at D_mid: {times['trak (est.)'][mid] / times['affd'][mid]:.1f}x")
    print("affd/rfft: " + ", ".join(f"D=2^{int(math.log2(d))}: {times['affd'][d] / rfft:.2f}" for d in ds))


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: tuple[int, ...], d_out: int) -> None:
        super().__init__()
        dims = (d_in, *hidden)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def per_example_gradients(d_in: int, hidden: tuple[int, ...], n_examples: int) -> torch.Tensor:
    """[n_examples, N] float64 per-example gradients of an MLP briefly trained on generated data."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(10, d_in, generator=g) * 2
    labels = torch.randint(0, 10, (2048 + n_examples,), generator=g)
    data = centers[labels] + torch.randn(len(labels), d_in, generator=g)
    torch.manual_seed(0)
    model = MLP(d_in, hidden, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(100):
        idx = torch.randint(0, 2048, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(data[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
        params, data[2048:].double(), labels[2048:]
    )
    return torch.cat([grads[k].reshape(n_examples, -1) for k in params], dim=1)


def part2(d_in: int, hidden: tuple[int, ...], n_examples: int, ds: list[int], seeds: int) -> None:
    grads = per_example_gradients(d_in, hidden, n_examples)
    n = grads.shape[1]
    iu = torch.triu_indices(n_examples, n_examples, offset=1)
    exact = (grads @ grads.T)[iu[0], iu[1]]
    print(
        f"\n## Part 2 (Table 6 analogue): MLP N = {n} (~2^{math.log2(n):.1f}), {iu.shape[1]} gradient pairs, mean r over {seeds} seeds"
    )
    print(
        f"{'kind':<10}"
        + "".join(f"{'D=2^' + str(int(math.log2(d))):>10}" for d in ds)
        + f"{'D for r>=0.95':>16}"
    )
    needed = {}
    for kind in ("dense", "affd", "fjl", "afjl", "qk", "ffd"):
        rs = []
        for d in ds:
            vals = []
            for seed in range(seeds):
                opts = {"chunked": True} if kind == "dense" and d * n * 4 > 2**30 else {}
                s = make(kind, n, d, seed=seed, **opts)
                sk = s.apply(grads)
                approx = (sk @ sk.T)[iu[0], iu[1]]
                vals.append(float(torch.corrcoef(torch.stack([approx, exact]))[0, 1]))
            rs.append(sum(vals) / len(vals))
        hit = next((d for d, r in zip(ds, rs) if r >= 0.95), None)
        needed[kind] = hit
        print(
            f"{kind:<10}"
            + "".join(f"{r:>10.3f}" for r in rs)
            + f"{('2^' + str(int(math.log2(hit)))) if hit else '> grid':>16}"
        )
    order = sorted(needed, key=lambda k: needed[k] or float("inf"))
    print("ordering by required D (smaller first): " + " <= ".join(f"{k}" for k in order))
    print("paper (Table 6): AFFD ≈ dense ≈ FJL <= AFJL (~4x D) <= QK (~16x D)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log2-n", type=int, default=20, help="Part 1 input dimension N = 2^k (default 20)")
    p.add_argument("--log2-d", type=int, nargs="+", default=[10, 12, 14, 16], help="Part 1 sketch dims 2^k")
    p.add_argument("--batch", type=int, default=64, help="vectors per timed call (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (best is kept)")
    p.add_argument(
        "--table6-log2-d", type=int, nargs="+", default=[8, 10, 12, 14], help="Part 2 sketch dims 2^k"
    )
    p.add_argument(
        "--examples", type=int, default=72, help="Part 2 examples (pairs = n(n-1)/2; default 72 -> 2556)"
    )
    p.add_argument("--seeds", type=int, default=2, help="Part 2 sketch seeds averaged")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden = (384, 128)
    d_in = 32
    if args.quick:
        args.log2_n, args.log2_d, args.batch, args.repeats = 12, [6, 8], 4, 1
        args.table6_log2_d, args.examples, args.seeds = [6, 8], 12, 1
        hidden, d_in = (16,), 8
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    if not args.skip_part1:
        part1(2**args.log2_n, [2**k for k in args.log2_d], args.batch, args.repeats)
    if not args.skip_part2:
        part2(d_in, hidden, args.examples, [2**k for k in args.table6_log2_d], args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
