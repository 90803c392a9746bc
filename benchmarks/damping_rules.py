"""Ground-truth-free damping rules for ``trak`` measured on the attribution task suite.

Every rule sets each slice's λ_c from its own kernel K_c alone (eigenvalues s of K_c, T_c examples,
sketch dimension D), with one free constant c:

* ``trace``     λ = c · tr(K)/T          (mean squared per-example gradient; the library's unit)
* ``mean_eig``  λ = c · tr(K)/D          (mean eigenvalue; Kronfluence's heuristic is c = 0.1 of its
                                          own EK-FAC eigenvalues)
* ``pr``        λ = c · Σs²/Σs           (eigenvalue mean weighted by eigenvalue: tr(K)/participation ratio)
* ``deff``      λ with d_eff(λ) = Σ s/(s+λ) = c · rank(K)  (a fraction of the resolved directions)
* ``fit``       λ = c · (tr(K)/T) / f,  f = tr(GᵀG)/tr(K) on margin kernels (G the stored loss
                gradients −(1 − p)φ: f is the mean squared residual (1 − p)², how far from fitted the
                training set is; a well-fitted set has a small true Hessian Σ p(1 − p)φφᵀ next to
                K = Σ φφᵀ), f = 1 on the other kernels (their K is the loss's Gauss–Newton)
* ``fit_sqrt``  the same with √f

For each task of ``_suite_tasks`` whose Lightning runs are cached (``attr_suite.py`` fits them), each
rule and each constant: LDS on the val and query splits with 1 model (mean over runs) and the
ensemble of the runs (mean of the runs' scores, what ``Attributor(runs, model)`` computes). The
constant of each rule is then chosen on **val** LDS only, to maximise the worst task's LDS minus that
task's best val LDS over all rules and constants; the tables report the **query** split.

Run (from the repository root, after ``attr_suite.py`` has fitted the runs)::

    nice .venv/bin/python benchmarks/damping_rules.py            # all cached tasks
    nice .venv/bin/python benchmarks/damping_rules.py --tasks binary_small,regression

Writes ``benchmarks/.cache/suite/damping_rules.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _suite_tasks as S  # noqa: E402

GRIDS = {
    "trace": [float(10.0**e) for e in np.arange(-4.0, 3.01, 0.5)],
    "mean_eig": [float(10.0**e) for e in np.arange(-3.0, 5.01, 0.5)],
    "pr": [float(10.0**e) for e in np.arange(-5.0, 2.01, 0.5)],
    "deff": [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "fit": [float(10.0**e) for e in np.arange(-4.0, 3.01, 0.5)],
    "fit_sqrt": [float(10.0**e) for e in np.arange(-4.0, 3.01, 0.5)],
}


def rank_of(s: torch.Tensor) -> int:
    return int((s > 1e-10 * float(s.max().clamp_min(1e-300))).sum())


def deff_lambda(s: torch.Tensor, target: float) -> float:
    """λ > 0 with Σ s/(s+λ) = target (bisection in log λ; d_eff decreases in λ)."""
    s = s[s > 0]
    lo, hi = math.log(float(s.min()) * 1e-6), math.log(float(s.max()) * 1e6)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float((s / (s + math.exp(mid))).sum()) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def rule_lambda(rule: str, c: float, s: torch.Tensor, T: int, D: int, f: float = 1.0) -> float:
    tr = float(s.sum())
    if tr <= 0:
        return 1.0
    if rule == "fit":
        return c * tr / T / f
    if rule == "fit_sqrt":
        return c * tr / T / math.sqrt(f)
    if rule == "trace":
        return c * tr / T
    if rule == "mean_eig":
        return c * tr / D
    if rule == "pr":
        return c * float((s * s).sum()) / tr
    if rule == "deff":
        return deff_lambda(s, c * rank_of(s))
    raise ValueError(rule)


def slice_stats(att, r: int, counts: dict) -> list[dict]:
    out = []
    for n in att.checkpoints:
        s, _, unit = att._eigh(r, n)
        K_T = counts[n]
        tr = float(s.sum())
        out.append({"slice": n, "T": K_T, "D": int(s.numel()), "trace_over_T": unit, "rank": rank_of(s),
                    "participation": tr * tr / max(float((s * s).sum()), 1e-300)})
    return out


def scores_with(att, qs, lam_of) -> torch.Tensor:
    att.slice_damping = lam_of  # instance attribute shadows the method
    try:
        out = torch.zeros(qs[0][0].shape[0], len(att.ids), dtype=torch.float64)
        # one run per Attributor: _accumulate averages over its runs
        return att._accumulate(qs, out)
    finally:
        del att.slice_damping


def fit_ratio(att, r: int, name: str, T: int) -> float:
    """tr(GᵀG)/tr(K) of the slice on margin kernels (the mean squared residual), else 1."""
    if att.kernel != "margin":
        return 1.0
    s, _, _ = att._eigh(r, name)
    gg = sum(float((g.double() ** 2).sum()) for _, g in att.runs[r].iter_blocks(name))
    return max(gg / max(float(s.sum()), 1e-300), 1e-12)


def save(name: str, res: dict) -> None:
    """Merge ``res`` into damping_rules.json (re-read first: other processes may have added to it)."""
    path = S.SUITE / "damping_rules.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if name in results:
        res = {**res, "rules": {**results[name]["rules"], **res["rules"]}}
    results[name] = res
    path.write_text(json.dumps(results, indent=1))


def run_task(name: str, rules: list[str]) -> dict:
    from lightning_sketch.attribution import Attributor

    t = S.get_task(name)
    sp = S.splits(t)
    gt = S.ground_truth(t)
    runs, _ = S.fit_runs(t, 5)
    atts = [Attributor(r, m, method="trak") for r, m in runs]
    batches = {"query": S.dict_batch(t, *sp.query), "val": S.dict_batch(t, *sp.val)}
    qs = {k: [a.all_query_sketches(b) for a in atts] for k, b in batches.items()}
    D = atts[0].sketches[0].sketch_dim
    counts = [{n: a._kernel(0, n)[1] for n in a.checkpoints} for a in atts]  # T_c per slice (read once)
    fits = [{n: fit_ratio(a, 0, n, c[n]) for n in a.checkpoints} for a, c in zip(atts, counts)]
    res: dict = {"task": name, "kernel": atts[0].kernel, "stats": [slice_stats(a, 0, c) for a, c in zip(atts, counts)],
                 "fit_ratio": [list(f.values()) for f in fits], "rules": {}}
    for rule in rules:
        grid = GRIDS[rule]
        rows = []
        for c in grid:
            row = {"c": c}
            for split in ("query", "val"):
                per = []
                for a, q, cnt, fr in zip(atts, qs[split], counts, fits):
                    def lam_of(r, n, a=a, cnt=cnt, fr=fr):
                        s, _, _ = a._eigh(r, n)
                        return rule_lambda(rule, c, s, cnt[n], D, fr[n])
                    per.append(scores_with(a, q, lam_of))
                row[f"{split}_1"] = float(np.mean([S.lds_of(x, gt, split) for x in per]))
                row[f"{split}_5"] = S.lds_of(torch.stack(per).mean(0), gt, split)
            rows.append(row)
        res["rules"][rule] = rows
        save(name, res)  # after every rule: a long run keeps what it measured
        best = max(rows, key=lambda x: x["query_5"])
        print(f"[{name}] {rule:9s} best c {best['c']:.3g}: query LDS 1 {best['query_1']:.3f} 5 {best['query_5']:.3f}",
              flush=True)
    return res


def choose(results: dict) -> dict:
    """Per rule: the constant maximising the worst task's (val LDS − best val LDS of that task)."""
    out = {}
    for r in results.values():  # on kernels other than the margin's, f = 1: fit rules are the trace rule
        if r["kernel"] != "margin" and "trace" in r["rules"]:
            for k in ("fit", "fit_sqrt"):
                r["rules"].setdefault(k, r["rules"]["trace"])
    rules = sorted({k for r in results.values() for k in r["rules"]}, key=list(GRIDS).index)
    for rule in rules:
        if any(rule not in r["rules"] for r in results.values()):
            continue
        best_c, best_worst = None, -np.inf
        for i, c in enumerate(GRIDS[rule]):
            gaps = []
            for r in results.values():
                for m in ("1", "5"):
                    top = max(x[f"val_{m}"] for rr in r["rules"].values() for x in rr)
                    gaps.append(r["rules"][rule][i][f"val_{m}"] - top)
            if min(gaps) > best_worst:
                best_c, best_worst = (i, c), min(gaps)
        i, c = best_c
        per = {}
        for name, r in results.items():
            qtop1 = max(x["query_1"] for rr in r["rules"].values() for x in rr)
            qtop5 = max(x["query_5"] for rr in r["rules"].values() for x in rr)
            x = r["rules"][rule][i]
            per[name] = {"query_1": x["query_1"], "query_5": x["query_5"],
                         "gap_1": x["query_1"] - qtop1, "gap_5": x["query_5"] - qtop5}
        out[rule] = {"c": c, "worst_val_gap": best_worst, "tasks": per,
                     "worst_query_gap": min(min(v["gap_1"], v["gap_5"]) for v in per.values())}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(S.TASKS))
    p.add_argument("--rules", default=",".join(GRIDS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    path = S.SUITE / "damping_rules.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for name in a.tasks.split(","):
        t0 = time.perf_counter()
        res = run_task(name, a.rules.split(","))
        res["seconds"] = time.perf_counter() - t0
        save(name, res)
    results = json.loads(path.read_text())
    chosen = choose(results)
    (S.SUITE / "damping_rules_chosen.json").write_text(json.dumps(chosen, indent=1))
    names = list(results)
    print(f"\nQuery-split LDS (1 / 5 models) with each rule's constant chosen on val over {', '.join(names)}; "
          f"gap = LDS − the task's best over every rule and constant. {up}\n")
    print("| rule | c | " + " | ".join(names) + " | worst gap |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for rule, ch in chosen.items():
        cells = [f"{ch['tasks'][n]['query_1']:.3f} / {ch['tasks'][n]['query_5']:.3f}" for n in names]
        print(f"| {rule} | {ch['c']:.3g} | " + " | ".join(cells) + f" | {ch['worst_query_gap']:.3f} |")


if __name__ == "__main__":
    main()
