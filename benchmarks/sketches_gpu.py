"""Sketch throughput on a CUDA device (run on a lent GPU machine; nothing depends on it).

Times ``apply`` (explicit gradient sketch) and ``transpose`` for each kind at N = 2^20 .. 2^24 and
D = 2^10 .. 2^18 over a batch of 64 vectors, against one ``torch.fft.rfft`` of the same batch (the
N log N floor) and the on-the-fly chunked dense projection (TRAK-style) where it fits the time
budget; checks that the CUDA result equals the CPU result of the same spec (device-independent
randomness). Prints a table and writes JSON to ``--out``.

Usage:
    python benchmarks/sketches_gpu.py --out gpu_sketches.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_sketch.sketches import make


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="gpu_sketches.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log2n", type=int, nargs="+", default=[20, 22, 24])
    p.add_argument("--log2d", type=int, nargs="+", default=[10, 12, 14, 16, 18])
    p.add_argument("--kinds", nargs="+", default=["affd", "afjl", "qk", "fjl", "ffd", "dense"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    dev = torch.device("cuda")
    rows: list[dict] = []
    print(f"device: {torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    for log2n in args.log2n:
        n = 1 << log2n
        x = torch.randn(args.batch, n, device=dev)
        floor = cuda_time(lambda: torch.fft.rfft(x, dim=-1))
        rows.append({"kind": "rfft", "log2n": log2n, "log2d": None, "apply_ms": floor})
        print(f"N=2^{log2n}: rfft floor {floor:.3f} ms")
        for kind in args.kinds:
            for log2d in args.log2d:
                d = 1 << log2d
                if d > n:
                    continue
                opts = {}
                if kind == "dense":
                    if d > 1 << 14 or n > 1 << 22:
                        continue  # on-the-fly generation grows linearly in D; keep inside the lease
                    opts = {"chunked": True}
                try:
                    t0 = time.perf_counter()
                    s = make(kind, n, d, seed=0, **opts)
                    build_s = time.perf_counter() - t0
                    apply_ms = cuda_time(lambda: s.apply(x), reps=5 if kind == "dense" else 10)
                    y = torch.randn(args.batch, d, device=dev)
                    transpose_ms = cuda_time(lambda: s.transpose(y), reps=5 if kind == "dense" else 10)
                    # device independence: the CUDA map equals the CPU map of the same spec.
                    xs = x[:2].double()
                    same = torch.allclose(s.apply(xs).cpu(), s.apply(xs.cpu()), rtol=1e-9, atol=1e-9)
                    row = {
                        "kind": kind, "log2n": log2n, "log2d": log2d, "apply_ms": apply_ms,
                        "transpose_ms": transpose_ms, "state_bytes": s.state_bytes, "build_s": build_s,
                        "ratio_to_rfft": apply_ms / floor, "cpu_equals_cuda": bool(same),
                    }
                except Exception as err:  # record and go on: one failing kind must not lose the lease
                    row = {"kind": kind, "log2n": log2n, "log2d": log2d, "error": repr(err)[:300]}
                rows.append(row)
                print(json.dumps(row))
                torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
