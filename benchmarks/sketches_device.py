"""Device check for the sketches (run on a CUDA machine): same map on GPU as on CPU, and timings.

1. For every kind: the CPU-generated state moved to the GPU gives the same Φx and Φᵀy as on CPU
   (float64, max relative error printed), outputs keep the input's dtype/device (float32,
   float64, bfloat16), and the buffered path equals the autograd path on the GPU.
2. N = 2^20, batch 64, float32: time per batch of affd/afjl/qk/fjl/ffd/affd[fft] at D = 2^10 and
   2^16 against one ``torch.fft.rfft`` (CUDA events, median of 10 after 3 warm-ups).

Run: ``PYTHONPATH=. python3 benchmarks/sketches_device.py``.
"""

from __future__ import annotations

import sys

import torch

from lightning_sketch.sketches import make

CASES = [
    ("dense", {}),
    ("fjl", {}),
    ("ffd", {}),
    ("affd", {}),
    ("affd", {"preconditioner": "fft"}),
    ("affd", {"preconditioner": "kron_orthogonal"}),
    ("afjl", {}),
    ("afjl", {"preconditioner": "fft"}),
    ("qk", {}),
]


def check_equal(dev: torch.device) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    for kind, opts in CASES:
        for n, d in ((1000, 64), (4096, 256), (2**16 + 3, 512)):
            if kind == "dense" and n > 5000:
                continue
            s = make(kind, n, d, seed=5, **opts)
            x = torch.randn(9, n, generator=g, dtype=torch.float64)
            y = torch.randn(9, d, generator=g, dtype=torch.float64)
            ref_x, ref_y = s.apply(x), s.transpose(y)
            gx, gy = s.apply(x.to(dev)), s.transpose(y.to(dev))
            err = max(
                float((gx.cpu() - ref_x).abs().max() / ref_x.abs().max()),
                float((gy.cpu() - ref_y).abs().max() / ref_y.abs().max()),
            )
            slow = s.apply(x.to(dev).requires_grad_(True)).detach()
            err_path = float((slow - gx).abs().max() / gx.abs().max())
            types = all(
                (o := s.apply(x.to(dev, dt))).dtype == dt and o.device.type == dev.type
                for dt in (torch.float32, torch.float64, torch.bfloat16)
            )
            good = err < 1e-10 and err_path < 1e-10 and types and gx.device.type == dev.type
            ok &= good
            print(
                f"{kind:<5}{opts.get('preconditioner', ''):<16} N={n:<7} D={d:<4} cpu-vs-gpu rel err {err:.1e} "
                f"buffered-vs-autograd {err_path:.1e} dtypes {'ok' if types else 'WRONG'} -> {'ok' if good else 'FAIL'}"
            )
    return ok


def time_cuda(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def timings(dev: torch.device) -> None:
    n = 2**20
    x = torch.randn(64, n, device=dev)
    rfft = time_cuda(lambda: torch.fft.rfft(x))
    print(f"\nN=2^20 batch 64 float32 on {torch.cuda.get_device_name(dev)}: rfft {rfft:.3f} ms")
    for kind, opts in [
        ("affd", {}),
        ("afjl", {}),
        ("qk", {}),
        ("fjl", {}),
        ("ffd", {}),
        ("affd", {"preconditioner": "fft"}),
    ]:
        row = []
        for d in (2**10, 2**16):
            s = make(kind, n, d, seed=0, **opts)
            row.append(time_cuda(lambda s=s: s.apply(x)))
        print(
            f"{kind:<5}{opts.get('preconditioner', ''):<6} D=2^10 {row[0]:8.3f} ms  D=2^16 {row[1]:8.3f} ms  "
            f"t(2^16)/t(2^10) {row[1] / row[0]:.2f}  /rfft at 2^10 {row[0] / rfft:.2f}"
        )


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}")
    ok = check_equal(dev)
    timings(dev)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
