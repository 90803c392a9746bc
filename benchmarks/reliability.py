"""Figures of docs/reliability.md (issue 11): corruptions detected per file kind, SIGKILLs survived,
hostile run directories handled.

    PYTHONPATH=$PWD python benchmarks/reliability.py [--flips 60] [--cuts 10] [--kills 20]

1. **Corruption sweeps.** ``tests/security/runkit.py`` writes a complete run directory (store
   manifest, segments, FAISS index, weights, spectrum index and snapshots, intrinsic-dimension
   state, query result). For every file, ``--flips`` seeded random single-byte flips and
   ``--cuts`` random truncations are applied one at a time and every reader of that file kind is
   run: each outcome is the reference answer ("same"), a typed library error ("detected"), a
   silently different answer, or an untyped exception.
2. **SIGKILLs.** ``tests/store/_procs.py crash`` forks a committing store writer per seed and
   kills it at a random time; each store is then reopened, fully verified and its rows compared
   with the acknowledged commits (rows lost = acknowledged rows missing).
3. Prints one Markdown table per part, with ``uptime`` load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "security"))
sys.path.insert(0, str(REPO / "tests" / "store"))


def load() -> str:
    return open("/proc/loadavg").read().split()[:3].__str__()


def sweeps(flips: int, cuts: int) -> list[str]:
    import runkit

    root = Path(tempfile.mkdtemp())
    run = runkit.build(root)
    refs = runkit.references(run)
    lines = ["| file kind | files | damages x readers tried | detected (typed error) | harmless (same answer) "
             "| silent different answer | untyped exception |", "|---|---|---|---|---|---|---|"]
    for i, (kind, (pattern, _)) in enumerate(runkit.KINDS.items()):
        out = runkit.sweep(run, kind, refs[kind], flips=flips, cuts=cuts, seed=100 + i)
        lines.append(f"| {kind} | {len(list(run.glob(pattern)))} | {out['tried']} | {out['typed']} | {out['same']} | "
                     f"{len(out['silent'])} | {len(out['untyped'])} |")
        for bad in out["silent"][:3] + out["untyped"][:3]:
            print("  !", bad, file=sys.stderr)
    return lines


def kills(n: int) -> list[str]:
    import _procs

    from lightning_sketch.store import SketchStore, inspect_store

    root = Path(tempfile.mkdtemp())
    out = subprocess.run([sys.executable, str(REPO / "tests" / "store" / "_procs.py"), "crash", str(root),
                          ",".join(str(s) for s in range(n))], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    acked = json.loads(out.stdout.strip().splitlines()[-1])
    survived, lost, extra = 0, 0, 0
    for seed in range(n):
        path = root / f"seed{seed}"
        if not (path / "manifest.json").exists():
            survived += acked[str(seed)] == 0
            continue
        ok = inspect_store(path)["health"]["ok"]
        store = SketchStore.open(path, verify="full")
        store.verify()
        batches = store.num_rows // _procs.B
        ids, rows = _procs.expected(batches)
        exact = batches == 0 or (np.array_equal(store.ids("c"), ids) and np.array_equal(store.vectors("c"), rows))
        survived += bool(ok and exact and batches >= acked[str(seed)])
        lost += max(0, acked[str(seed)] - batches) * _procs.B
        extra += max(0, batches - acked[str(seed)])
    return ["| SIGKILLs of a committing writer | reopened healthy and exact | acknowledged rows lost "
            "| commits in flight that landed whole |", "|---|---|---|---|", f"| {n} | {survived} | {lost} | {extra} |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flips", type=int, default=60)
    p.add_argument("--cuts", type=int, default=10)
    p.add_argument("--kills", type=int, default=20)
    args = p.parse_args()
    print(f"load average before: {load()}")
    t = time.perf_counter()
    print("\n".join(sweeps(args.flips, args.cuts)))
    print(f"\n({time.perf_counter() - t:.0f} s; load average {load()})\n")
    t = time.perf_counter()
    print("\n".join(kills(args.kills)))
    print(f"\n({time.perf_counter() - t:.0f} s; load average {load()})")


if __name__ == "__main__":
    main()
