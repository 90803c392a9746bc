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

Ground-truth-free *procedures* (no per-task constant; each λ_c is the minimiser of a criterion over
λ = ν · tr(K)/T, ν on :data:`NU_GRID`; the optional constant c multiplies the chosen λ, c = 1 is the
procedure itself). They read the kernel-ridge view of TRAK: the linearised model f_t(θ) = φ_tᵀθ fitted
to the targets y_t = −∂ℓ_t/∂f_t (the residual 1 − p_t on a margin kernel, −2(f_t − y_t) for a squared
error): one Gauss–Newton step from the trained weights solves min_w ‖y − Φw‖² + λ‖w‖², whose hat
matrix is H_λ = Φ(K + λI)⁻¹Φᵀ, and TRAK's score is the same (K + λI)⁻¹ applied to a query. The stored
loss gradients are g_t = −y_tφ_t, so the criteria need only Φᵀy = −Σ_t g_t (one pass over the rows)
and ‖y‖², with K = U diag(s) Uᵀ and c = Uᵀ Φᵀy:

* ``gcv``       GCV(λ) = T‖(I − H_λ)y‖² / (T − d_eff(λ))², ‖(I − H_λ)y‖² = ‖y‖² − Σ c_i²(s_i + 2λ)/(s_i + λ)²,
                d_eff = Σ s_i/(s_i + λ). ‖y‖² is not stored (the rows give y_t‖φ_t‖, not y_t): it is
                ‖Py‖² = Σ c_i²/s_i, the part of y in Φ's column space, when Φ has full row rank
                (rank K ≥ T: then ‖Py‖² = ‖y‖² exactly), else max(‖Py‖², T·tr(GᵀG)/tr(K)), the
                second the estimate with every ‖φ_t‖² at its mean.
* ``gcv_py``    the same with ‖y‖² = ‖Py‖² (the part of y that no λ can fit is dropped).
* ``evidence``  the type-II maximum likelihood of Bayesian ridge regression y ~ N(0, σ²(I + ΦΦᵀ/λ)),
                σ² profiled out: minimise T·log(‖y‖² − Σ c_i²/(s_i + λ)) + Σ log(1 + s_i/λ).
* ``press``     the closed-form leave-one-out error of the kernel ridge fit, Σ_t (e_t/(1 − h_tt))²
                with e = (I − H_λ)y, h_tt = g_tᵀ(K + λI)⁻¹g_t / y_t². y_t² is g_tᵀK⁺g_t
                (y_t² times the leverage h_tt(0): exact when rank K ≥ T), else the larger of that lower
                bound and ‖g_t‖²·T/tr(K); rows with g_t = 0 (y_t = 0, φ_t unknown) are left out. Cost
                O(T·D²) per slice for the rotation GU (one pass); ``PRESS_ROWS`` rows at most (a uniform
                subset beyond), which bounds it on a large store.
* ``lcurve``    the corner of the L-curve (log‖(I − H_λ)y‖, log‖w_λ‖), w_λ = (K + λI)⁻¹Φᵀy: the
                point of largest curvature on the grid.

For each task of ``_suite_tasks`` whose Lightning runs are cached (``attr_suite.py`` fits them), each
rule and each constant: LDS on the val and query splits with 1 model (mean over runs) and the
ensemble of the runs (mean of the runs' scores, what ``Attributor(runs, model)`` computes). The
constant of each rule is then chosen on **val** LDS only, to maximise the worst task's LDS minus that
task's best val LDS over all rules and constants; the tables report the **query** split.

Run (from the repository root, after ``attr_suite.py`` has fitted the runs)::

    nice .venv/bin/python benchmarks/damping_rules.py            # all cached tasks
    nice .venv/bin/python benchmarks/damping_rules.py --tasks binary_small,regression
    # the per-slice procedures without a constant, then the slice profiles of the one-ratio procedures
    nice .venv/bin/python benchmarks/damping_rules.py --rules gcv,gcv_py,evidence,press,lcurve \
        --procedures-only-c1
    nice .venv/bin/python benchmarks/damping_rules.py --rules "" --profiles
    # table only, adding rules measured earlier on runs with byte-identical rows and kernels
    nice .venv/bin/python benchmarks/damping_rules.py --rules "" --baseline OLD.json --baseline-tasks ...

The cache is ``$ATTR_BENCH_CACHE/suite`` (default ``benchmarks/.cache/suite``); ``SUITE_LIB_HASH``
pins the fits to score (``_suite_tasks.library_hash``). Writes ``--out`` (default
``damping_rules.json`` there), ``<out>_chosen.json``, ``damping_profiles_<task>.npz`` (``--profiles``)
and prints a markdown table.
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
    # procedures: c multiplies the λ the criterion picks (c = 1: the procedure alone)
    "gcv": [float(10.0**e) for e in np.arange(-1.0, 1.01, 0.5)],
    "gcv_py": [float(10.0**e) for e in np.arange(-1.0, 1.01, 0.5)],
    "evidence": [float(10.0**e) for e in np.arange(-1.0, 1.01, 0.5)],
    "press": [float(10.0**e) for e in np.arange(-1.0, 1.01, 0.5)],
    "lcurve": [float(10.0**e) for e in np.arange(-1.0, 1.01, 0.5)],
    "gcv_ratio": [1.0],
    "evidence_ratio": [1.0],
    "press_ratio": [1.0],
}
PROCEDURES = ("gcv", "gcv_py", "evidence", "press", "lcurve")
#: one ratio ρ for every slice of a task, λ_c = ρ · tr(K_c)/T_c / r_c (the library's unit), ρ on
#: ``GRIDS["fit_sqrt"]`` minimising the criterion averaged over slices (each normalised by its λ → ∞
#: value); LDS read off the ``fit_sqrt`` rows at that ρ
RATIO_PROCEDURES = {"gcv_ratio": "gcv", "evidence_ratio": "evidence", "press_ratio": "press"}
#: λ / (tr(K)/T) over which the procedures minimise their criterion: 10^-4 … 10^3 in steps of 10^0.125
NU_GRID = np.array([float(10.0**e) for e in np.arange(-4.0, 3.001, 0.125)])
#: rows of a slice that ``press`` reads at most (a uniform subset beyond, seeded)
PRESS_ROWS = 8192
#: ν grid of the stored PRESS curves (``--profiles``), wide enough for ρ/r up to 10^3/10^-3
NU_WIDE = np.array([float(10.0**e) for e in np.arange(-5.0, 7.001, 0.25)])


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


def slice_profile(att, r: int, name: str, T: int, press: bool = True, nu_grid: np.ndarray = NU_GRID) -> dict:
    """What the procedures need of one slice, from one pass over its stored rows ``G [T, D]``.

    Returns ``{"s" [D], "c2" [D] (= (Uᵀ Φᵀy)², Φᵀy = −Σ_t g_t), "yy_est" (T·tr(GᵀG)/tr(K)),
    "yy_py" (Σ c_i²/s_i over s_i > 0), "unit" (tr(K)/T), "T", "press" [len(nu_grid)] or None}``,
    float64 numpy arrays.
    """
    s, U, unit = att._engine._eigh(r, name)
    D = s.numel()
    gsum = torch.zeros(D, dtype=torch.float64)
    gg = 0.0
    rows = []
    n_rows = 0
    for sl, g in att.runs[r].iter_blocks(name):
        gsum += g.sum(0)
        gg += float((g * g).sum())
        n_rows += g.shape[0]
        if press:
            rows.append(g)
    c = -(U.T @ gsum)
    tr = float(s.sum())
    pos = s > 1e-10 * float(s.max().clamp_min(1e-300))
    c2 = (c * c).numpy()
    yy_py = float((c[pos] ** 2 / s[pos]).sum())
    out = {"s": s.numpy(), "c2": c2, "yy_est": T * gg / max(tr, 1e-300), "yy_py": yy_py, "unit": unit,
           "T": T, "press": None}
    if press and tr > 0:
        G = torch.cat(rows)
        if G.shape[0] > PRESS_ROWS:
            G = G[torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(0))[:PRESS_ROWS]]
        A = G @ U  # [n, D] rows in K's eigenbasis
        y2_pinv = ((A[:, pos] ** 2) / s[pos]).sum(1)
        y2 = y2_pinv if int(pos.sum()) >= T else torch.maximum((A * A).sum(1) / unit, y2_pinv)
        keep = y2 > 1e-30 * float(y2.max().clamp_min(1e-300))
        A, y2 = A[keep], y2[keep]
        vals = []
        for nu in nu_grid:
            lam = float(nu) * unit
            inv = 1.0 / (s + lam)
            q = (A * A) @ inv  # g_tᵀ(K + λI)⁻¹g_t = y_t² h_tt
            gw = A @ (c * inv)  # g_tᵀ w_λ = −y_t φ_tᵀw_λ
            h = (q / y2).clamp(max=1 - 1e-9)
            e = (y2 + gw) / y2.sqrt()  # y_t − φ_tᵀw_λ (y_t > 0: the sign of y_t does not enter e²)
            vals.append(float(((e / (1 - h)) ** 2).sum()))
        out["press"] = np.asarray(vals)
    return out


def y_norm2(p: dict) -> float:
    """‖y‖² of a slice: ‖Py‖² (exact) when Φ has full row rank (rank K ≥ T), else
    max(‖Py‖², T·tr(GᵀG)/tr(K))."""
    s = torch.as_tensor(p["s"])
    return p["yy_py"] if rank_of(s) >= p["T"] else max(p["yy_py"], p["yy_est"])


def criterion(proc: str, p: dict, nu_grid: np.ndarray = NU_GRID) -> np.ndarray:
    """The criterion of procedure ``proc`` over ``nu_grid`` (λ = ν·tr(K)/T; lower is better)."""
    s, c2, T = p["s"], p["c2"], p["T"]
    lam = nu_grid[:, None] * p["unit"]  # [L, 1]
    if proc == "press":
        return p["press"]
    yy = p["yy_py"] if proc == "gcv_py" else y_norm2(p)
    if proc in ("gcv", "gcv_py"):
        res = np.maximum(yy - (c2 * (s + 2 * lam) / (s + lam) ** 2).sum(1), 0.0)
        deff = (s / (s + lam)).sum(1)
        return T * res / np.maximum(T - deff, 1e-9) ** 2
    if proc == "evidence":
        quad = np.maximum(yy - (c2 / (s + lam)).sum(1), 1e-300)
        return T * np.log(quad) + np.log1p(s / lam).sum(1)
    if proc == "lcurve":
        res = np.maximum(yy - (c2 * (s + 2 * lam) / (s + lam) ** 2).sum(1), 1e-300)
        wn = np.maximum((c2 / (s + lam) ** 2).sum(1), 1e-300)
        x, y, t = 0.5 * np.log(res), 0.5 * np.log(wn), np.log(nu_grid)
        dx, dy = np.gradient(x, t), np.gradient(y, t)
        ddx, ddy = np.gradient(dx, t), np.gradient(dy, t)
        kappa = (dx * ddy - dy * ddx) / np.maximum((dx * dx + dy * dy) ** 1.5, 1e-300)
        kappa[[0, -1]] = -np.inf
        return -kappa  # the corner: largest curvature
    raise ValueError(proc)


def procedure_nu(proc: str, p: dict) -> float:
    """ν = λ/(tr(K)/T) minimising ``proc``'s criterion on ``NU_GRID`` (1 for an all-zero kernel)."""
    if not p["unit"] > 0:
        return 1.0
    v = criterion(proc, p)
    return float(NU_GRID[int(np.nanargmin(v))]) if np.isfinite(v).any() else 1.0


def dump_profiles(name: str) -> Path:
    """Write every slice's profile (all runs) to ``damping_profiles_<task>.npz`` beside :data:`OUT`.

    Arrays ``s``, ``c2`` ``[R, C, D]``; ``yy_est``, ``yy_py``, ``unit``, ``T``, ``residual`` ``[R, C]``;
    ``press`` ``[R, C, len(NU_WIDE)]``; ``nu_wide``. Read back with ``allow_pickle=False``."""
    from lightning_sketch.attribution import Attributor

    t = S.get_task(name)
    runs, _ = S.fit_runs(t, 5)
    cols: dict[str, list] = {k: [] for k in ("s", "c2", "yy_est", "yy_py", "unit", "T", "residual", "press")}
    for run, module in runs:
        a = Attributor(run, module, method="trak")
        per: dict[str, list] = {k: [] for k in cols}
        for n in a.checkpoints:
            prof = slice_profile(a, 0, n, a._engine._count(0, n), press=True, nu_grid=NU_WIDE)
            prof["residual"] = a._engine._residual(0, n)
            for k in per:
                per[k].append(prof[k])
        for k in cols:
            cols[k].append(per[k])
    path = OUT.with_name(f"damping_profiles_{name}.npz")
    np.savez(path, nu_wide=NU_WIDE, **{k: np.asarray(v, dtype=np.float64) for k, v in cols.items()})
    return path


def _loglog_interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    return np.exp(np.interp(np.log(x), np.log(xp), np.log(np.maximum(fp, 1e-300))))


def ratio_curve(proc: str, prof: dict, grid: list[float], run: int | None = None) -> np.ndarray:
    """Mean over slices (of run ``run``, or of all runs) of ``proc``'s criterion at λ_c = ρ·u_c/r_c for
    every ρ of ``grid``, each slice normalised by its λ → ∞ value (GCV: ‖y‖²/T; PRESS: ‖y‖²;
    evidence: per example, minus T·log‖y‖²)."""
    R, C = prof["unit"].shape
    rho = np.asarray(grid)
    tot = np.zeros(len(grid))
    m = 0
    for i in range(R) if run is None else [run]:
        for j in range(C):
            p = {k: prof[k][i, j] for k in ("s", "c2", "yy_est", "yy_py", "unit")}
            p["T"] = int(prof["T"][i, j])
            if not p["unit"] > 0:
                continue
            nu = rho / prof["residual"][i, j]
            yy = y_norm2(p)
            if proc == "press":
                v = _loglog_interp(nu, prof["nu_wide"], prof["press"][i, j]) / yy
            elif proc == "gcv":
                v = criterion("gcv", p, nu) / (yy / p["T"])
            else:
                v = (criterion("evidence", p, nu) - p["T"] * np.log(yy)) / p["T"]
            tot += v
            m += 1
    return tot / max(m, 1)


def add_ratio_procedures(results: dict) -> dict:
    """Rows of :data:`RATIO_PROCEDURES` for every task with a profile file and ``fit_sqrt`` rows."""
    for name, r in results.items():
        path = OUT.with_name(f"damping_profiles_{name}.npz")
        base = r["rules"].get("fit_sqrt") or (r["rules"].get("trace") if r["kernel"] != "margin" else None)
        if not path.exists() or base is None:
            continue
        with np.load(path, allow_pickle=False) as z:
            prof = {k: z[k] for k in z.files}
        grid = [x["c"] for x in base]
        for rule, proc in RATIO_PROCEDURES.items():
            pooled = grid[int(np.nanargmin(ratio_curve(proc, prof, grid)))]
            per_run = [grid[int(np.nanargmin(ratio_curve(proc, prof, grid, i)))]
                       for i in range(prof["unit"].shape[0])]
            row = dict(next(x for x in base if x["c"] == pooled))
            r["rules"][rule] = [{**row, "c": 1.0, "rho": pooled, "rho_per_run": per_run}]
    return results


def slice_stats(att, r: int, counts: dict) -> list[dict]:
    out = []
    for n in att.checkpoints:
        s, _, unit = att._engine._eigh(r, n)
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
        return att._engine._accumulate(qs, out)
    finally:
        del att.slice_damping


def fit_ratio(att, r: int, name: str, T: int) -> float:
    """tr(GᵀG)/tr(K) of the slice on margin kernels (the mean squared residual), else 1."""
    if att.kernel != "margin":
        return 1.0
    s, _, _ = att._engine._eigh(r, name)
    gg = sum(float((g.double() ** 2).sum()) for _, g in att.runs[r].iter_blocks(name))
    return max(gg / max(float(s.sum()), 1e-300), 1e-12)


#: the results file (``--out``)
OUT = S.SUITE / "damping_rules.json"


def save(name: str, res: dict) -> None:
    """Merge ``res`` into :data:`OUT` (re-read first: other processes may have added to it)."""
    path = OUT
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
    # T_c per slice (read once)
    counts = [{n: a._engine._kernel(0, n)[1] for n in a.checkpoints} for a in atts]
    fits = [{n: fit_ratio(a, 0, n, c[n]) for n in a.checkpoints} for a, c in zip(atts, counts)]
    res: dict = {"task": name, "kernel": atts[0].kernel,
                 "stats": [slice_stats(a, 0, c) for a, c in zip(atts, counts)],
                 "fit_ratio": [list(f.values()) for f in fits], "rules": {}}
    procs = [x for x in rules if x in PROCEDURES]
    nus: list[dict] = [{} for _ in atts]  # per run: (procedure, slice) → ν
    if procs:
        t0 = time.perf_counter()
        for i, (a, cnt) in enumerate(zip(atts, counts)):
            for n in a.checkpoints:
                prof = slice_profile(a, 0, n, cnt[n], press="press" in procs)
                for pr in procs:
                    nus[i][pr, n] = procedure_nu(pr, prof)
        res["procedure_seconds"] = time.perf_counter() - t0
        res["procedure_nu"] = {pr: [[nus[i][pr, n] for n in a.checkpoints] for i, a in enumerate(atts)]
                               for pr in procs}
    for rule in rules:
        grid = GRIDS[rule]
        rows = []
        for c in grid:
            row = {"c": c}
            for split in ("query", "val"):
                per = []
                for a, q, cnt, fr, nu in zip(atts, qs[split], counts, fits, nus):
                    def lam_of(r, n, a=a, cnt=cnt, fr=fr, nu=nu):
                        s, _, unit = a._engine._eigh(r, n)
                        if rule in PROCEDURES:
                            return c * nu[rule, n] * unit if unit > 0 else 1.0
                        return rule_lambda(rule, c, s, cnt[n], D, fr[n])
                    per.append(scores_with(a, q, lam_of))
                row[f"{split}_1"] = float(np.mean([S.lds_of(x, gt, split) for x in per]))
                row[f"{split}_5"] = S.lds_of(torch.stack(per).mean(0), gt, split)
            rows.append(row)
        res["rules"][rule] = rows
        save(name, res)  # after every rule: a long run keeps what it measured
        best = max(rows, key=lambda x: x["query_5"])
        print(f"[{name}] {rule:9s} best c {best['c']:.3g}: query LDS 1 {best['query_1']:.3f} "
              f"5 {best['query_5']:.3f}", flush=True)
    return res


def choose(results: dict) -> dict:
    """Per rule: the constant maximising the worst task's (val LDS − best val LDS of that task)."""
    out = {}
    for r in results.values():  # on kernels other than the margin's, f = 1: fit rules are the trace rule
        if r["kernel"] != "margin" and "trace" in r["rules"]:
            for k in ("fit", "fit_sqrt"):
                r["rules"].setdefault(k, r["rules"]["trace"])
    rules = sorted({k for r in results.values() for k in r["rules"]}, key=list(GRIDS).index)
    everything = results
    for rule in rules:
        # a rule without a constant may be reported on the tasks it was measured on (the others: "–")
        results = {n: r for n, r in everything.items() if rule in r["rules"]}
        if len(results) < len(everything) and len(GRIDS[rule]) > 1:
            continue
        best_c, best_worst = None, -np.inf

        def row(r: dict, c: float) -> dict | None:  # the row of constant c (grids may differ between runs)
            return next((x for x in r["rules"][rule] if math.isclose(x["c"], c, rel_tol=1e-9)), None)

        for c in GRIDS[rule]:
            if any(row(r, c) is None for r in results.values()):
                continue
            gaps = []
            for r in results.values():
                for m in ("1", "5"):
                    top = max(x[f"val_{m}"] for rr in r["rules"].values() for x in rr)
                    gaps.append(row(r, c)[f"val_{m}"] - top)
            if min(gaps) > best_worst:
                best_c, best_worst = c, min(gaps)
        if best_c is None:
            continue
        c = best_c
        per = {}
        for name, r in results.items():
            qtop1 = max(x["query_1"] for rr in r["rules"].values() for x in rr)
            qtop5 = max(x["query_5"] for rr in r["rules"].values() for x in rr)
            x = row(r, c)
            per[name] = {"query_1": x["query_1"], "query_5": x["query_5"],
                         "gap_1": x["query_1"] - qtop1, "gap_5": x["query_5"] - qtop5}
        out[rule] = {"c": c, "worst_val_gap": best_worst, "tasks": per,
                     "worst_query_gap": min(min(v["gap_1"], v["gap_5"]) for v in per.values())}
    return out


def main(argv=None) -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(S.TASKS))
    p.add_argument("--rules", default=",".join(GRIDS))
    p.add_argument("--out", default=str(OUT), help="results JSON (merged per task and rule)")
    p.add_argument("--baseline", default=None,
                   help="another results JSON whose rules this file lacks are added for --baseline-tasks "
                        "(only for runs with byte-identical stored rows and kernels)")
    p.add_argument("--baseline-tasks", default="")
    p.add_argument("--procedures-only-c1", action="store_true",
                   help="evaluate the per-slice procedures at c = 1 only (the procedure without a constant)")
    p.add_argument("--profiles", action="store_true",
                   help="write each task's slice profiles (for the one-ratio procedures) beside --out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    OUT = path = Path(a.out)
    if a.procedures_only_c1:
        for proc in PROCEDURES:
            GRIDS[proc] = [1.0]
    results = json.loads(path.read_text()) if path.exists() else {}
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if a.profiles:
        for name in a.tasks.split(","):
            print(f"[{name}] profiles: {dump_profiles(name)}", flush=True)
    for name in a.tasks.split(",") if a.rules else []:
        t0 = time.perf_counter()
        res = run_task(name, a.rules.split(","))
        res["seconds"] = time.perf_counter() - t0
        save(name, res)
    results = json.loads(path.read_text()) if path.exists() else {}
    if a.baseline:  # rules measured before on runs whose stored rows and kernels are the same files' bytes
        base = json.loads(Path(a.baseline).read_text())
        for name in a.baseline_tasks.split(","):
            if name in base:
                results.setdefault(name, base[name])
                for rule, rows in base[name]["rules"].items():
                    results[name]["rules"].setdefault(rule, rows)
    results = add_ratio_procedures({k: results[k] for k in S.TASKS if k in results})
    if not results:
        return
    chosen = choose(results)
    path.with_name(path.stem + "_chosen.json").write_text(json.dumps(chosen, indent=1))
    names = list(results)
    print(f"\nQuery-split LDS (1 / 5 models) with each rule's constant chosen on val over "
          f"{', '.join(names)}; "
          f"gap = LDS − the task's best over every rule and constant. {up}\n")
    print("| rule | c | " + " | ".join(names) + " | worst gap |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for rule, ch in chosen.items():
        cells = [f"{ch['tasks'][n]['query_1']:.3f} / {ch['tasks'][n]['query_5']:.3f}"
                 if n in ch["tasks"] else "–" for n in names]
        star = "" if len(ch["tasks"]) == len(names) else " (measured tasks)"
        print(f"| {rule} | {ch['c']:.3g} | " + " | ".join(cells) + f" | {ch['worst_query_gap']:.3f}{star} |")
    tops = [" / ".join(f"{max(x[f'query_{m}'] for rr in results[n]['rules'].values() for x in rr):.3f}"
                       for m in "15") for n in names]
    print("| best of every rule and constant | – | " + " | ".join(tops) + " | 0 |")
    ratios = {rule: [results[n]["rules"][rule][0]["rho"] for n in names] for rule in RATIO_PROCEDURES
              if all(rule in results[n]["rules"] for n in names)}
    if ratios:
        print("\nρ chosen by the one-ratio procedures (slices of all runs pooled; per run in the JSON):\n")
        print("| procedure | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for rule, v in ratios.items():
            print(f"| {rule} | " + " | ".join(f"{x:.3g}" for x in v) + " |")


if __name__ == "__main__":
    main()
