"""Where the best damping ratio sits when training is short: the suite's tasks at fewer epochs.

The task suite (``_suite_tasks.py``) trains every task to convergence (8–30 epochs). A user's first
try is often a short run. This script takes suite tasks at a shorter ``epochs`` (everything else,
data, model, optimizer and ground-truth protocol, unchanged; the ground truth is retrained with the
same number of epochs), fits ``--runs`` Lightning runs with ``callbacks=[GradientSketch(dirpath=run)]``
only, and measures, through the public API:

- the LDS of ``trak`` at every ratio of ``DAMPING_RATIO_GRID`` in the unit without the training-time
  floor (λ_c = ρ · tr(K_c)/T_c / r_c: every run's τ set to unknown), 1 model (mean over runs) and the
  ensemble of the runs;
- the LDS of the default ``Attributor(run, model)`` (no argument; ``default_*``), of the default
  without the floor (``nofloor_*``), the best ratio, the gaps, and τ (``Attributor.training_time``);
- what describes the regime: the final mean training loss, training accuracy (classifiers) and the
  last slice's RMS residual r (``damping_info``).

A variant is ``task@epochs`` (SGD + momentum, the suite's optimiser) or ``task@epochs+adam``
(torch.optim.Adam at lr 1e-3 for the runs and the ground truth alike).

Run (from the repository root)::

    nice .venv/bin/python benchmarks/damping_regimes.py                       # every SGD variant below
    nice .venv/bin/python benchmarks/damping_regimes.py --variants digits10@3+adam --runs 2 --subsets 10
    # the default of a later library on the same runs, and the before/after table:
    SUITE_LIB_HASH=<hash of the fits> python benchmarks/damping_regimes.py --default-only KEY --out OTHER.json
    python benchmarks/damping_regimes.py --compare OTHER.json KEY

Writes ``benchmarks/.cache/suite/damping_regimes.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _suite_tasks as S  # noqa: E402
from attr_suite import _curve, uptime  # noqa: E402

#: task@epochs: each task at a short length and at the suite's own (binary_small 30, digits10 20,
#: regression 30, large_T 8, label_noise 20, sequence 20, causal_lm 20).
VARIANTS = ("binary_small@3", "binary_small@10", "binary_small@30", "digits10@2", "digits10@5", "digits10@20",
            "regression@3", "regression@10", "regression@30", "large_T@2", "large_T@8", "label_noise@5",
            "label_noise@20", "sequence@3", "sequence@20", "causal_lm@3", "causal_lm@20")
#: the same tasks trained with Adam (lr 1e-3, as most Lightning examples do): `--variants` takes them
ADAM_VARIANTS = ("binary_small@5+adam", "binary_small@30+adam", "digits10@3+adam", "digits10@20+adam",
                 "regression@10+adam", "sequence@5+adam")
OUT = S.SUITE / "damping_regimes.json"


#: ``task@epochs+adam``: trained (and retrained for the ground truth) with torch.optim.Adam at this lr
ADAM_LR = 1e-3


def variant(spec: str, subsets: int) -> S.SuiteTask:
    spec, _, opt = spec.partition("+")
    name, epochs = spec.split("@")
    t = replace(S.get_task(name), epochs=int(epochs), n_subsets=subsets)
    return replace(t, optimizer="adam", lr=ADAM_LR) if opt == "adam" else t


def regime(t: S.SuiteTask, sp, runs) -> dict:
    """Mean final training loss and accuracy (classifiers) over the runs."""
    x, y = sp.train
    losses, accs = [], []
    with torch.no_grad():
        for _, m in runs:
            out = m(x)
            losses.append(float(S.per_example(t, out, y).mean()))
            if t.kind == "binary":
                accs.append(float(((out > 0).float() == y).float().mean()))
            elif t.kind in ("multiclass", "sequence"):
                accs.append(float((out.argmax(-1) == y).float().mean()))
    return {"train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)) if accs else None}


def study(spec: str, n_runs: int, subsets: int, log=print) -> dict:
    from lightning_sketch.attribution import DAMPING_RATIO_GRID, Attributor

    t = variant(spec, subsets)
    sp = S.splits(t)
    t0 = time.perf_counter()
    gt = S.ground_truth(t)
    runs, info = S.fit_runs(t, n_runs, log=log)
    qb = S.dict_batch(t, *sp.query)
    with S.capture_warnings():
        singles = [Attributor(r, m) for r, m in runs]
        chosen = (singles[0].method, singles[0].kernel, singles[0].damping_ratio)  # before tune_damping
        default_1 = [S.lds_of(a.scores(qb), gt) for a in singles]
        ens = Attributor([r for r, _ in runs], runs[0][1])
        default_5 = S.lds_of(ens.scores(qb), gt)
        dinfo = singles[0].damping_info(qb, k=10)
        taus = [a.training_time(0) for a in singles]
        # the grid, and the default without the training-time floor (λ_c = ρ · tr(K_c)/T_c / r_c, the
        # library before the floor): every run's τ set to "unknown"
        for a in [*singles, ens]:
            a._engine._tau_cache = dict.fromkeys(range(len(a.runs)))
        nofloor_1 = [S.lds_of(a.scores(qb), gt) for a in singles]
        nofloor_5 = S.lds_of(ens.scores(qb), gt)
        curves = [_curve(a, qb, gt, "query")[0] for a in singles]
        curve_5 = _curve(ens, qb, gt, "query")[0]
    grid = list(DAMPING_RATIO_GRID)
    c1 = np.nanmean(np.asarray(curves), 0)
    c5 = np.asarray(curve_5)
    return {
        "variant": spec, "task": t.name, "epochs": t.epochs, "runs": n_runs, "subsets": subsets,
        "method": chosen[0], "kernel": chosen[1], "default_ratio": chosen[2],
        "default_1": float(np.mean(default_1)), "default_5": float(default_5), "training_time": taus,
        "nofloor_1": float(np.mean(nofloor_1)), "nofloor_5": float(nofloor_5),
        "grid": grid, "curve_1": c1.tolist(), "curve_5": c5.tolist(),
        "best_1": float(np.nanmax(c1)), "best_ratio_1": grid[int(np.nanargmax(c1))],
        "best_5": float(np.nanmax(c5)), "best_ratio_5": grid[int(np.nanargmax(c5))],
        "residual_last": (dinfo.get("slices") or [{}])[-1].get("residual"),
        "n_checkpoints": len(singles[0].checkpoints), **regime(t, sp, runs),
        "seconds": time.perf_counter() - t0, "gt_seconds": gt.seconds,
    }


def default_lds(spec: str, n_runs: int, subsets: int) -> dict:
    """LDS of ``Attributor(run, model)`` (1 model: mean over runs) and of the ensemble, and τ per run."""
    from lightning_sketch.attribution import Attributor

    t = variant(spec, subsets)
    sp = S.splits(t)
    gt = S.ground_truth(t)
    runs, _ = S.fit_runs(t, n_runs)
    qb = S.dict_batch(t, *sp.query)
    with S.capture_warnings():
        singles = [Attributor(r, m) for r, m in runs]
        one = [S.lds_of(a.scores(qb), gt) for a in singles]
        ens = S.lds_of(Attributor([r for r, _ in runs], runs[0][1]).scores(qb), gt)
        taus = [a.training_time(0) for a in singles]
    return {"lds_1": float(np.mean(one)), "lds_5": float(ens), "training_time": taus}


def at(r: dict, rho: float, which: str) -> float:
    g = np.asarray(r["grid"])
    return float(np.asarray(r[f"curve_{which}"])[int(np.argmin(np.abs(np.log(g) - np.log(rho))))])


def table(results: list[dict]) -> str:
    rows = ["| task @ epochs | train loss / acc | r (last slice) | default ρ | default 1 / E | best 1 / E (ρ₁, ρ_E) "
            "| gap default 1 / E | LDS at ρ = 1: 1 / E | gap at ρ = 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = "–" if r["train_acc"] is None else f"{r['train_acc']:.2f}"
        g1, g5 = r["default_1"] - r["best_1"], r["default_5"] - r["best_5"]
        o1, o5 = at(r, 1.0, "1"), at(r, 1.0, "5")
        res = "–" if r["residual_last"] is None else f"{r['residual_last']:.3f}"
        rows.append(
            f"| {r['variant']} | {r['train_loss']:.3f} / {acc} | {res} | {r['default_ratio']:.3g} "
            f"| {r['default_1']:.3f} / {r['default_5']:.3f} | {r['best_1']:.3f} / {r['best_5']:.3f} "
            f"({r['best_ratio_1']:.3g}, {r['best_ratio_5']:.3g}) | {g1:+.3f} / {g5:+.3f} "
            f"| {o1:.3f} / {o5:.3f} | {o1 - r['best_1']:+.3f} / {o5 - r['best_5']:+.3f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------- a training-time floor on λ
FLOOR_GRID = tuple(float(10.0**e) for e in np.arange(-1.0, 2.01, 0.5))


def training_times(att, r: int) -> dict[str, float]:
    """τ of each slice of run ``r``: the training time of the linearised model up to that slice.

    Gradient flow on the mean loss moves θ by −τ ∇L over a time τ (Σ η_s for plain SGD; momentum and
    Adam change it). Between slices c−1 and c, τ_c − τ_{c−1} = −⟨Φ(θ_c − θ_{c−1}), ḡ⟩ / ‖ḡ‖² with
    ḡ the mean of the two slices' mean sketched loss gradients (the stored rows); the first interval
    is the second scaled by their step counts. Needs ≥ 2 slices with saved weights.
    """
    from lightning_sketch.attribution._stored import load_weights

    run, sketch, layout = att.runs[r], att.sketches[r], att.layouts[r]
    names = list(att.checkpoints)
    pos, mean = [], []
    for n in names:
        saved = load_weights(run, n, layout)
        flat = layout.flatten({k: saved[k].double() for k in layout.names})
        pos.append(sketch.apply(flat))
        tot, cnt = 0.0, 0
        for _, g in run.iter_blocks(n):
            tot = tot + g.sum(0)
            cnt += g.shape[0]
        mean.append(tot / max(cnt, 1))
    ints = []
    for i in range(1, len(names)):
        gbar = 0.5 * (mean[i] + mean[i - 1])
        ints.append(max(float(-(pos[i] - pos[i - 1]) @ gbar) / max(float(gbar @ gbar), 1e-300), 0.0))
    steps = [run.steps.get(n) or 0 for n in names]
    first = ints[0] * steps[0] / max(steps[1] - steps[0], 1)
    return dict(zip(names, np.cumsum([first] + ints).tolist()))


def floor_study(spec: str, n_runs: int, subsets: int) -> dict:
    """LDS of λ_c = max(ρ·u_c, κ·T_c/(r_c·τ)) for κ on FLOOR_GRID: τ per slice ("cum") or the run's total."""
    from lightning_sketch.attribution import Attributor

    t = variant(spec, subsets)
    sp = S.splits(t)
    gt = S.ground_truth(t)
    runs, _ = S.fit_runs(t, n_runs)
    qb = S.dict_batch(t, *sp.query)
    out: dict = {"variant": spec, "grid": list(FLOOR_GRID)}
    with S.capture_warnings():
        singles = [Attributor(r, m) for r, m in runs]
        ens = Attributor([r for r, _ in runs], runs[0][1])
        taus = [training_times(a, 0) for a in singles]
        out["tau_total"] = [float(list(tt.values())[-1]) for tt in taus]
        base = {}
        for i, a in enumerate(singles):
            for n in a.checkpoints:
                base[(i, n)] = (a.slice_damping(0, n), len(a.runs[0].ids(n)), a._engine._residual(0, n))

        def patch(att, run_of, kappa, which):
            def lam(r, n):
                b, T_c, res = base[(run_of(r), n)]
                tt = taus[run_of(r)]
                tau = tt[n] if which == "cum" else list(tt.values())[-1]
                return max(b, kappa * T_c / (res * max(tau, 1e-300)))
            att.slice_damping = lam

        for which in ("cum", "total"):
            c1, c5 = [], []
            for kappa in FLOOR_GRID:
                one = []
                for i, a in enumerate(singles):
                    patch(a, lambda r, i=i: i, kappa, which)
                    one.append(S.lds_of(a.scores(qb), gt))
                patch(ens, lambda r: r, kappa, which)
                c1.append(float(np.mean(one)))
                c5.append(S.lds_of(ens.scores(qb), gt))
            out[f"{which}_1"], out[f"{which}_5"] = c1, c5
    return out


def compare(before: dict, after: dict, key: str) -> str:
    """Markdown: the default before (``before``: this script's main run) and after (``after[key]``:
    ``--default-only KEY``) a library change, against the best ratio of the main run's grid."""
    rows = ["| task @ epochs | τ (runs) | r (last slice) | best ρ 1 / E | best 1 / E | default before 1 / E "
            "| default now 1 / E | gap before 1 / E | gap now 1 / E |", "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in before.items():
        if spec not in after or key not in after[spec]:
            continue
        a = after[spec][key]
        taus = [t for t in a["training_time"] if t is not None]
        tau = f"{min(taus):.3g}–{max(taus):.3g}" if taus else "–"
        res = "–" if r["residual_last"] is None else f"{r['residual_last']:.3f}"
        rows.append(
            f"| {spec} | {tau} | {res} | {r['best_ratio_1']:.3g} / {r['best_ratio_5']:.3g} "
            f"| {r['best_1']:.3f} / {r['best_5']:.3f} | {r['default_1']:.3f} / {r['default_5']:.3f} "
            f"| {a['lds_1']:.3f} / {a['lds_5']:.3f} | {r['default_1'] - r['best_1']:+.3f} / "
            f"{r['default_5'] - r['best_5']:+.3f} | {a['lds_1'] - r['best_1']:+.3f} / {a['lds_5'] - r['best_5']:+.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--subsets", type=int, default=50, help="ground-truth half subsets (× 2 seeds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--floor", action="store_true", help="the training-time floor study (reuses the runs)")
    p.add_argument("--default-only", default=None, metavar="KEY",
                   help="only the default's LDS (reuses the runs), stored under KEY in each variant's entry")
    p.add_argument("--compare", nargs=2, metavar=("AFTER_JSON", "KEY"), default=None,
                   help="print the before/after table of --out (the main run) and AFTER_JSON[KEY]")
    a = p.parse_args()
    if a.compare:
        print(compare(json.loads(Path(a.out).read_text()), json.loads(Path(a.compare[0]).read_text()),
                      a.compare[1]))
        return
    if a.default_only:
        torch.set_num_threads(a.threads)
        out = Path(a.out)
        done = json.loads(out.read_text()) if out.exists() else {}
        for spec in [v for v in a.variants.split(",") if v]:
            done.setdefault(spec, {})[a.default_only] = default_lds(spec, a.runs, a.subsets)
            out.write_text(json.dumps(done, indent=1))
            print(spec, a.default_only, done[spec][a.default_only], uptime(), flush=True)
        return
    if a.floor:
        torch.set_num_threads(a.threads)
        res = {}
        for spec in [v for v in a.variants.split(",") if v]:
            res[spec] = floor_study(spec, a.runs, a.subsets)
            f = res[spec]
            print(spec, "tau", [round(x, 1) for x in f["tau_total"]], "cum", [round(x, 3) for x in f["cum_1"]],
                  [round(x, 3) for x in f["cum_5"]], "total", [round(x, 3) for x in f["total_1"]],
                  [round(x, 3) for x in f["total_5"]], flush=True)
        Path(a.out).with_name("damping_floor.json").write_text(json.dumps(res, indent=1))
        return
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {uptime()}", flush=True)
    for spec in [v for v in a.variants.split(",") if v]:
        r = study(spec, a.runs, a.subsets)
        r["uptime"] = uptime()
        done[spec] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1))
        print(f"{spec}: default {r['default_1']:.3f}/{r['default_5']:.3f}, best {r['best_1']:.3f}/{r['best_5']:.3f} "
              f"at {r['best_ratio_1']:.3g}/{r['best_ratio_5']:.3g}; {r['seconds']:.0f} s; {r['uptime']}", flush=True)
    print(table([done[v] for v in a.variants.split(",") if v in done]))
    print(f"end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {uptime()}")


if __name__ == "__main__":
    main()
