"""Per-layer factorised sketching against whole-model sketching (RESULTS.md "Per-layer factorised sketching").

On a ~1M-parameter MLP (784-1024-256-10, generated data, batch 256, float32, 2 threads) this times:

- a plain forward + backward of the mean loss (the unit of every ratio);
- the same forward + backward inside ``GradientCapture`` with a ``per_layer`` sketch (inline path,
  target <= 1.5x);
- ``sketch_gradients(mode="factorized")`` (its functional twin, autograd.grad);
- ``per_example_grads`` (vmap) alone, and vmap + a whole-model sketch (``--kind``, default affd),
  i.e. ``sketch_gradients(mode="explicit")``;
- ``sketch_gradients(mode="implicit")`` with the same whole-model sketch (arXiv 2402.03994 Table 4:
  explicit is expected to be faster; direction only).

It also checks the fast path against the general path (per-example gradients, then
``PerLayerSketch.apply``) and prints the relative error. Usage::

    .venv/bin/python benchmarks/per_layer.py [--batch 256] [--sketch-dim 1024] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from lightning_sketch.gradients import GradientCapture, ParamLayout, per_example_grads, sketch_gradients
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


CLOCK = time.perf_counter
SYNC = lambda: None


def _once(fn) -> float:
    SYNC()
    t0 = CLOCK()
    fn()
    SYNC()
    return CLOCK() - t0


def paired(fn, base, reps: int) -> tuple[float, float, float]:
    """(median time of ``fn``, median of the per-rep ratios fn / base, min time of ``fn``).

    ``fn`` and the baseline run back to back in every rep, so load from other jobs on the shared
    machine hits both sides of each ratio alike.
    """
    fn(), base()  # warm-up
    times, ratios = [], []
    for _ in range(reps):
        tb = _once(base)
        tf = _once(fn)
        times.append(tf)
        ratios.append(tf / tb)
    return statistics.median(times), statistics.median(ratios), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sketch-dim", type=int, default=1024)
    parser.add_argument("--kind", default="affd", help="whole-model sketch kind for the vmap paths")
    parser.add_argument("--inner", default="qk", choices=["qk", "dense"])
    parser.add_argument("--chunk-size", type=int, default=64, help="examples per vmap call")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slow-reps", type=int, default=2, help="reps for the vmap paths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="cpu: process CPU time (less sensitive to other jobs on a shared machine); wall: perf_counter",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda forces --clock wall)")
    args = parser.parse_args()
    global CLOCK, SYNC
    device = torch.device(args.device)
    if device.type == "cuda":
        args.clock, SYNC = "wall", torch.cuda.synchronize
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    layout = ParamLayout.from_module(model)
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(10, 784, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    x = centers[y] + 0.5 * torch.randn(args.batch, 784, generator=g)
    model, batch = model.to(device), (x.to(device), y.to(device))
    per_layer = PerLayerSketch.for_module(model, args.sketch_dim, seed=0, inner=args.inner)
    whole = make(args.kind, dim=layout.dim, sketch_dim=args.sketch_dim, seed=0)
    print(
        f"model 784-1024-256-10: N = {layout.dim:,}; batch {args.batch}; D = {args.sketch_dim}; "
        f"device {device}; threads {args.threads}; whole-model kind {args.kind}; per_layer inner {args.inner} "
        f"({per_layer.zero_columns} zero columns)"
    )

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).mean().backward()

    def captured() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with GradientCapture(model, per_layer, layout) as cap:
            loss_fn(model, batch).mean().backward()
        return cap.sketches()

    # Correctness of the fast path on this model (float32).
    ref = per_layer.apply(per_example_grads(model, loss_fn, batch, layout=layout, chunk_size=args.chunk_size))
    fast = captured()
    rel = ((fast - ref).norm() / ref.norm()).item()
    print(f"fast path vs per-example grads + PerLayerSketch.apply: relative error {rel:.2e} (float32)")

    r, sr = args.reps, args.slow_reps
    rows = [
        ("plain forward+backward", *paired(plain, plain, r)),
        ("forward+backward with GradientCapture (inline)", *paired(captured, plain, r)),
        (
            "sketch_gradients(mode='factorized')",
            *paired(lambda: sketch_gradients(model, loss_fn, batch, per_layer, mode="factorized"), plain, r),
        ),
        (
            "per_example_grads (vmap), no sketch",
            *paired(lambda: per_example_grads(model, loss_fn, batch, chunk_size=args.chunk_size), plain, sr),
        ),
        (
            f"vmap + {args.kind} (explicit whole-model)",
            *paired(
                lambda: sketch_gradients(
                    model, loss_fn, batch, whole, mode="explicit", chunk_size=args.chunk_size
                ),
                plain,
                sr,
            ),
        ),
        (
            f"implicit whole-model {args.kind} (grad wrt omega)",
            *paired(
                lambda: sketch_gradients(
                    model, loss_fn, batch, whole, mode="implicit", chunk_size=args.chunk_size
                ),
                plain,
                sr,
            ),
        ),
    ]
    print(f"\nclock: {args.clock}")
    print(f"{'path':52s} {'median s':>9s} {'x plain (paired median)':>24s} {'x plain (min/min)':>18s}")
    best_plain = rows[0][3]
    for name, t, ratio, best in rows:
        print(f"{name:52s} {t:9.4f} {ratio:24.2f} {best / best_plain:18.2f}")
    explicit, implicit = rows[4][2], rows[5][2]
    print(
        f"\nimplicit / explicit whole-model time: {implicit / explicit:.2f} "
        f"({'explicit faster, as in the paper' if implicit > explicit else 'implicit faster here, unlike the paper'})"
    )
    print(f"inline GradientCapture overhead: {rows[1][2]:.2f}x a plain forward+backward (target <= 1.5x)")


if __name__ == "__main__":
    main()
