"""Figures of docs/reliability.md: corruptions detected per file kind, SIGKILLs survived,
hostile run directories handled.

    PYTHONPATH=$PWD python benchmarks/reliability.py [--flips 60] [--cuts 10] [--nonfinite 8] [--hostile 40]
        [--kills 20] [--lightning-kills N] [--lightning-every K] [--only PART]

1. **Corruption sweeps.** ``tests/security/runkit.py`` writes a complete run directory (store
   manifest, segments, FAISS index, weights, probe examples, curvature matrices and sidecars,
   spectrum index and snapshots, intrinsic-dimension state, query result). For every file,
   ``--flips`` seeded random single-byte flips and ``--cuts`` random truncations are applied one
   at a time and every reader of that file kind is run: each outcome is the reference answer
   ("same"), a typed library error ("detected"), a silently different answer, or an untyped
   exception.
2. **Older and foreign files.** For every file kind, the run's files are replaced by intact copies
   of an older generation of the same run (the copies ``runkit.build`` keeps of the files a later
   publish replaced) or of another run (a second ``runkit.build`` with other weights, rows and
   spectra), one kind at a time, and every reader of that kind, plus the check a resume or
   ``query --ckpt`` makes against the checkpoint, is classified the same way.
3. **Non-finite JSON numbers** (``--nonfinite N``). In every JSON kind (store manifest, curvature
   sidecar, spectrum index, intrinsic-dimension state, query result), N seeded numbers per file are
   replaced one at a time by ``NaN``, ``Infinity``, ``-Infinity`` and ``1e999``, with every checksum
   covering the file re-recorded (``runkit._rewrite``), and every reader of the content is classified.
4. **Hostile report inputs** (``--hostile N``). N seeded (leaf, value) pairs per file the report
   draws (store manifest, spectrum index, intrinsic state, query result): a leaf replaced by markup,
   TeX, a 50 kB string, a wrong type, a deep list or a dict, checksum re-recorded; the whole report
   is built and classified (file named as refused, drawn escaped, unescaped markup, untyped
   exception, hang).
5. **SIGKILLs.** ``tests/store/_procs.py crash`` forks a committing store writer per seed and
   kills it at a random time; each store is then reopened, fully verified and its rows compared
   with the acknowledged commits (rows lost = acknowledged rows missing).
6. **Lightning-level SIGKILLs** (``--lightning-kills N``, ``--lightning-every K``):
   ``tests/reliability/scripts/lightning_kill.py`` runs each configuration (GradientSketch
   checkpoint mode + HessianSpectrum, GradientSketch inline mode + HessianSpectrum,
   IntrinsicDimension; checkpoints at epoch end, every 3 steps with a resumable loader, every 3
   steps with a plain loader) once uninterrupted, counting its events; then K seeded occurrences
   of every (configuration, event kind) it saw, and N seeded random draws of (configuration, event
   kind, occurrence), are killed there and continued from the latest checkpoint (else a fresh fit).
   Counted: continued runs, acknowledged rows lost, rows duplicated, temporary files left, and for
   the exactly resumable configurations runs equal to the uninterrupted one.
7. Prints one Markdown table per part, with ``uptime`` load averages (``--only PART`` runs one part;
   parts with a count of 0 are skipped).
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
    lines = ["| file kind | files | damages x readers tried | detected (typed error) "
             "| harmless (same answer) | silent different answer | untyped exception |",
             "|---|---|---|---|---|---|---|"]
    for i, (kind, (pattern, _)) in enumerate(runkit.KINDS.items()):
        out = runkit.sweep(run, kind, refs[kind], flips=flips, cuts=cuts, seed=100 + i)
        lines.append(f"| {kind} | {len(list(run.glob(pattern)))} | {out['tried']} | {out['typed']} "
                     f"| {out['same']} | {len(out['silent'])} | {len(out['untyped'])} |")
        for bad in out["silent"][:3] + out["untyped"][:3]:
            print("  !", bad, file=sys.stderr)
    return lines


def swaps() -> list[str]:
    import runkit

    run = runkit.build(Path(tempfile.mkdtemp()))
    other = runkit.build(Path(tempfile.mkdtemp()), variant=1)
    refs = {kind: [r(run) for r in readers] for kind, readers in runkit.SWAP_READERS.items()}
    lines = ["| file kind | readers | older generation: detected / harmless / silent / untyped "
             "| other run: detected / harmless / silent / untyped |", "|---|---|---|---|"]
    for kind in runkit.KINDS:
        cells = []
        for source in (run.parent / "older", other):
            out = runkit.swap_sweep(run, kind, refs[kind], source)
            if out is None:
                cells.append("no older version (immutable file)")
                continue
            cells.append(f"{out['typed']} / {out['same']} / {len(out['silent'])} / {len(out['untyped'])}")
            for bad in out["silent"] + out["untyped"]:
                print("  !", bad, file=sys.stderr)
        names = ", ".join(r.__name__.strip("_") for r in runkit.SWAP_READERS[kind])
        lines.append(f"| {kind} | {names} | {cells[0]} | {cells[1]} |")
    return lines


def nonfinite(per_file: int) -> list[str]:
    import runkit

    run = runkit.build(Path(tempfile.mkdtemp()))
    lines = ["| JSON file kind | files | numbers replaced | replacements x readers tried "
             "| detected (typed error) | harmless (same answer) | silent different answer "
             "| untyped exception |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (kind, readers) in enumerate(runkit.JSON_READERS.items()):
        refs = [r(run) for r in readers]
        out = runkit.nonfinite_sweep(run, kind, refs, per_file=per_file, seed=200 + i)
        files = len(list(run.glob(runkit.KINDS[kind][0])))
        lines.append(f"| {kind} | {files} | {out['numbers']} | {out['tried']} | {out['typed']}"
                     f" | {out['same']} | {len(out['silent'])} | {len(out['untyped'])} |")
        for bad in out["silent"][:3] + out["untyped"][:3]:
            print("  !", bad, file=sys.stderr)
    return lines


def hostile(cases: int) -> list[str]:
    import runkit

    run = runkit.build(Path(tempfile.mkdtemp()))
    lines = ["| file kind | hostile values tried | report built, file named as refused "
             "| report built, drawn escaped | unescaped markup | untyped exception | hang (> 60 s) |",
             "|---|---|---|---|---|---|---|"]
    for i, kind in enumerate(runkit.REPORT_KINDS):
        out = runkit.hostile_report_sweep(run, kind, cases=cases, seed=300 + i)
        lines.append(f"| {kind} | {out['tried']} | {out['named']} | {out['drawn']} | {len(out['markup'])} "
                     f"| {len(out['untyped'])} | {len(out['hang'])} |")
        for bad in out["markup"][:3] + out["untyped"][:3] + out["hang"][:3]:
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
        exact = batches == 0 or (np.array_equal(store.ids("c"), ids)
                                 and np.array_equal(store.vectors("c"), rows))
        survived += bool(ok and exact and batches >= acked[str(seed)])
        lost += max(0, acked[str(seed)] - batches) * _procs.B
        extra += max(0, batches - acked[str(seed)])
    return ["| SIGKILLs of a committing writer | reopened healthy and exact | acknowledged rows lost "
            "| commits in flight that landed whole |", "|---|---|---|---|",
            f"| {n} | {survived} | {lost} | {extra} |"]


def lightning_kills(n: int, every: int = 0, seed: int = 0) -> list[str]:
    import random

    sys.path.insert(0, str(REPO / "tests" / "reliability" / "scripts"))
    root = Path(tempfile.mkdtemp())
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'tests/reliability/scripts')!r}); "
            "import lightning_kill as lk; from pathlib import Path; "
            f"print(json.dumps({{c: lk.run(Path({str(root)!r}) / ('ref-' + c), c, count=True) "
            "for c in lk.CONFIGS}))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    refs = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                     timeout=3600).stdout.strip().splitlines()[-1])
    rng = random.Random(seed)
    picks: list[tuple[str, str, int]] = []
    if every:  # every configuration x every event kind it sees, `every` seeded occurrences each
        for config in sorted(refs):
            for kind in sorted(refs[config]["counts"]):
                picks += [(config, kind, rng.randint(1, refs[config]["counts"][kind])) for _ in range(every)]
    for _ in range(n):
        config = rng.choice(sorted(refs))
        kind = rng.choice(sorted(refs[config]["counts"]))
        picks.append((config, kind, rng.randint(1, refs[config]["counts"][kind])))
    draws = [(f"{root / str(i)}:{config}:{kind}:{n_th}", config)
             for i, (config, kind, n_th) in enumerate(picks)]
    out = subprocess.run([sys.executable, str(REPO / "tests/reliability/scripts/lightning_kill.py"), "fork",
                          *[j for j, _ in draws]], capture_output=True, text=True, env=env, timeout=36000)
    status = json.loads(out.stdout.strip().splitlines()[-1])
    import lightning_kill as lk

    rows: dict[str, list[int]] = {}
    for job, config in draws:
        r = rows.setdefault(config, [0] * 8)
        st = status[job]
        r[0] += 1
        r[1] += st["killed"] == -9
        if st["continued"] != 0:
            errors = [p.read_text()[:300] for p in Path(job.split(":")[0]).glob("*.error")]
            print("  ! not continued:", job, *errors, file=sys.stderr)
            continue
        r[2] += 1
        got = json.loads((Path(job.split(":")[0]) / "continued.json").read_text())
        res = lk.compare(got, refs[config], exact=config.endswith("-mid"))
        r[3] += res["lost"]
        r[4] += res["duplicated"]
        r[5] += res["tmp_files"]
        if config.endswith("-mid"):
            r[6] += 1
            r[7] += not (res["ref_lost"] or res["different"] or res["other"])
            if res["ref_lost"] or res["different"] or res["other"]:
                print("  ! differs from the uninterrupted run:", job, res, file=sys.stderr)
    lines = ["| configuration | killed runs | died by SIGKILL | continued | acknowledged rows lost "
             "| rows duplicated | temp files left | equal to uninterrupted (exact configs) |",
             "|---|---|---|---|---|---|---|---|"]
    for config in sorted(rows):
        r = rows[config]
        eq = f"{r[7]} / {r[6]}" if r[6] else "n/a"
        lines.append(f"| {config} | {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {eq} |")
    tot = [sum(r[i] for r in rows.values()) for i in range(8)]
    lines.append(f"| all | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} | {tot[4]} | {tot[5]} "
                 f"| {tot[7]} / {tot[6]} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flips", type=int, default=60)
    p.add_argument("--cuts", type=int, default=10)
    p.add_argument("--nonfinite", type=int, default=8, help="numbers replaced per JSON file")
    p.add_argument("--hostile", type=int, default=40, help="hostile values tried per report file kind")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--lightning-kills", type=int, default=0, help="random (configuration, event) draws")
    p.add_argument("--lightning-every", type=int, default=0,
                   help="occurrences killed per configuration and event kind (exhaustive over both)")
    p.add_argument("--only", choices=("sweeps", "swaps", "nonfinite", "hostile", "kills", "lightning_kills"),
                   default=None,
                   help="run one part")
    args = p.parse_args()
    print(f"load average before: {load()}")
    parts = {"sweeps": (args.flips or args.cuts, lambda: sweeps(args.flips, args.cuts)),
             "swaps": (1, swaps),
             "nonfinite": (args.nonfinite, lambda: nonfinite(args.nonfinite)),
             "hostile": (args.hostile, lambda: hostile(args.hostile)),
             "kills": (args.kills, lambda: kills(args.kills)),
             "lightning_kills": (args.lightning_kills or args.lightning_every,
                                 lambda: lightning_kills(args.lightning_kills, args.lightning_every))}
    for name, (count, part) in parts.items():
        if args.only not in (None, name) or not count:
            continue
        t = time.perf_counter()
        print("\n".join(part()))
        print(f"\n({time.perf_counter() - t:.0f} s; load average {load()})\n")


if __name__ == "__main__":
    main()
