"""LDS of the library's default attribution, its damping, Kronfluence and exact TRAK on the task suite.

Tasks: ``benchmarks/_suite_tasks.py`` (binary_small, digits10, regression, large_T, label_noise,
sequence, causal_lm), each with a retraining ground truth (100 half subsets × 2 seeds) on a query
and a validation split, and ``--runs`` Lightning runs with ``callbacks=[GradientSketch(dirpath=run)]``
and nothing else. Per task, for 1 model (mean of the single-run LDS) and the ``--runs``-model ensemble:

(a) ``default``: ``Attributor(run, model)`` / ``Attributor(runs, model)`` with no other argument;
    records ``method``, ``kernel``, ``damping_ratio`` and the warnings of the fits and the queries;
(b) ``trak``: ``Attributor(..., method="trak")``, the LDS-vs-ratio curve over ``DAMPING_RATIO_GRID``
    on both splits (through ``tune_damping``'s objective hook); the ratio ``tune_damping`` picks on
    val LDS (each single run tuned on its own val LDS), its query LDS, and the oracle (best query LDS);
(c) ``kronfluence``: EK-FAC, heuristic damping (``damping_factor=None``: 0.1 × mean eigenvalue), at the
    final weights of each run; measurement = the task's, train loss = summed per-example loss (sampled
    targets for the factors); nn.Embedding is not tracked by kronfluence, the Conv1d of ``sequence`` is
    given to it as the equivalent Conv2d(1×3);
(d) ``exact``: unprojected TRAK at each run's final weights (float64 per-example gradients): score(z, t)
    = −q_zᵀ(ΦᵀΦ + λI)⁻¹ g_t with φ_t the training measurement gradients (the prediction f for
    regression), g_t the loss gradients (TRAK's out-to-loss weighting), λ = ρ · tr(ΦᵀΦ)/T tuned on val.

Sign convention: positive = training on the example raises the query's measurement.

Run (from the repository root)::

    nice .venv/bin/python benchmarks/attr_suite.py --tasks binary_small --runs 2 --subsets 10   # smoke
    nice .venv/bin/python benchmarks/attr_suite.py                                             # full

Writes ``benchmarks/.cache/suite/results.json`` (merged per task and part) and ``results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _suite_tasks as S  # noqa: E402

ALL_TASKS = list(S.TASKS)
PARTS = ("default", "trak", "kf", "exact")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _import_library(tries: int = 6):
    """The library may be mid-edit by another developer: retry the import for a few minutes."""
    for i in range(tries):
        try:
            from lightning_sketch.attribution import DAMPING_RATIO_GRID, Attributor  # noqa: F401
            import lightning_sketch.callbacks  # noqa: F401

            return
        except Exception:  # noqa: BLE001 - any import-time error of a half-edited file
            if i == tries - 1:
                raise
            print(f"import of lightning_sketch failed (try {i + 1}), retrying in 60 s:\n{traceback.format_exc(limit=1)}",
                  flush=True)
            for m in [m for m in sys.modules if m.startswith("lightning_sketch")]:
                del sys.modules[m]
            time.sleep(60)


# ---------------------------------------------------------------------- helpers
def _check_ids(att, T: int) -> None:
    ids = att.ids
    if len(ids) != T or not bool((ids == torch.arange(T)).all()):
        raise RuntimeError(f"Attributor ids are not 0..{T - 1}: {len(ids)} ids, first {ids[:5].tolist()}")


def _curve(att, batch, gt, split: str) -> tuple[list[float], float]:
    """LDS on ``batch`` for every ratio of the grid via tune_damping's objective; (curve, chosen ratio)."""
    from lightning_sketch.attribution import DAMPING_RATIO_GRID

    values: list[float] = []

    def record(s):
        values.append(S.lds_of(s, gt, split))
        return values[-1]

    chosen = att.tune_damping([batch], candidates=DAMPING_RATIO_GRID, objective=record)
    return values, chosen


def _summ(one_q: list[list[float]], one_v: list[list[float]], ens_q: list[float], ens_v: list[float], grid):
    """Val-tuned (per run for 1 model) and oracle LDS on the query split from the curves."""
    one_q, one_v = np.asarray(one_q), np.asarray(one_v)
    per_run_i = [int(np.nanargmax(v)) for v in one_v]
    mean_q = np.nanmean(one_q, 0)
    ev = int(np.nanargmax(ens_v))
    return {
        "val_tuned_1": float(np.mean([one_q[r, i] for r, i in enumerate(per_run_i)])),
        "val_tuned_ratio_1": [grid[i] for i in per_run_i],
        "oracle_1": float(np.nanmax(mean_q)), "oracle_ratio_1": grid[int(np.nanargmax(mean_q))],
        "val_tuned_5": float(ens_q[ev]), "val_tuned_ratio_5": grid[ev],
        "oracle_5": float(np.nanmax(ens_q)), "oracle_ratio_5": grid[int(np.nanargmax(ens_q))],
        "curve_query_1": mean_q.tolist(), "curve_val_1": np.nanmean(one_v, 0).tolist(),
        "curve_query_5": list(map(float, ens_q)), "curve_val_5": list(map(float, ens_v)),
        "curve_query_runs": one_q.tolist(), "curve_val_runs": one_v.tolist(),
    }


# ---------------------------------------------------------------------- (a) the default
_SHARED: dict = {}  # the default's Attributors, reused by part_trak when the default is trak (eigh cache)


def part_default(t, sp, gt, runs) -> dict:
    from lightning_sketch.attribution import Attributor

    _SHARED.clear()

    qb = S.dict_batch(t, *sp.query)
    with S.capture_warnings() as cw:
        singles = [Attributor(r, m) for r, m in runs]
        s1 = [a.scores(qb) for a in singles]
        ens = Attributor([r for r, _ in runs], runs[0][1]) if len(runs) > 1 else None
        s5 = ens.scores(qb) if ens is not None else s1[0]
    _check_ids(singles[0], t.n_train)
    _SHARED.update({"task": t.name, "singles": singles, "ens": ens})
    # how sure the default says it is (Attributor.damping_info): run 0, the query split, k = 10
    info = singles[0].damping_info(qb, k=10) if hasattr(singles[0], "damping_info") else {}
    one = [S.lds_of(s, gt) for s in s1]
    five = S.evaluate(s5, None, gt)["query"]
    return {
        "lds_1": float(np.mean(one)), "lds_1_runs": one, "lds_5": five,
        "method": singles[0].method, "kernel": singles[0].kernel, "damping_ratio": singles[0].damping_ratio,
        "method_5": ens.method if ens else None, "kernel_5": ens.kernel if ens else None,
        "damping_ratio_5": ens.damping_ratio if ens else None,
        "n_checkpoints": len(singles[0].checkpoints),
        "top_k_overlap": info.get("top_k_overlap"), "d_eff_fraction": info.get("d_eff_fraction"),
        "residual_last": (info.get("slices") or [{}])[-1].get("residual"),
        "query_warnings": S.summarise_warnings(cw.items),
    }


# ---------------------------------------------------------------------- (b) trak with tuned damping
def part_trak(t, sp, gt, runs) -> dict:
    from lightning_sketch.attribution import DAMPING_RATIO_GRID, Attributor

    grid = list(DAMPING_RATIO_GRID)
    qb, vb = S.dict_batch(t, *sp.query), S.dict_batch(t, *sp.val)
    one_q, one_v, chosen = [], [], []
    # The default's objects when the default is trak (the same Attributor with its cached eigh; the
    # default's scores were taken before tune_damping moved its ratio).
    shared = _SHARED.get("task") == t.name and all(a.method == "trak" for a in _SHARED["singles"])
    with S.capture_warnings() as cw:
        for i, (r, m) in enumerate(runs):
            att = _SHARED["singles"][i] if shared else Attributor(r, m, method="trak")
            kernel = att.kernel
            cv, rho = _curve(att, vb, gt, "val")
            cq, _ = _curve(att, qb, gt, "query")
            one_v.append(cv), one_q.append(cq), chosen.append(rho)
        if len(runs) > 1:
            ens = (_SHARED["ens"] if shared and _SHARED["ens"] is not None and _SHARED["ens"].method == "trak"
                   else Attributor([r for r, _ in runs], runs[0][1], method="trak"))
            ens_v, rho5 = _curve(ens, vb, gt, "val")
            ens_q, _ = _curve(ens, qb, gt, "query")
        else:
            ens_v, ens_q, rho5 = one_v[0], one_q[0], chosen[0]
    out = _summ(one_q, one_v, ens_q, ens_v, grid)
    assert out["val_tuned_ratio_1"] == chosen and abs(out["val_tuned_ratio_5"] - rho5) < 1e-12 * rho5, (chosen, rho5)
    out.update({"grid": grid, "kernel": kernel, "reused_default_attributors": shared,
                "query_warnings": S.summarise_warnings(cw.items)})
    return out


# ---------------------------------------------------------------------- (c) kronfluence
def _kf_model(t, net):
    if t.kind == "sequence":
        kf = S.SeqNetConv2d(net)
        x = torch.randint(0, S.SEQ_VOCAB, (4, S.SEQ_LEN))
        with torch.no_grad():
            assert torch.allclose(kf(x), net(x), atol=1e-5)
        return kf
    return copy.deepcopy(net)


def part_kf(t, sp, gt, runs) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class SuiteKFTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample:
                with torch.no_grad():
                    y = S.sample_targets(t, out, y)
            return S.per_example(t, out, y).sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return S.measurement(t, model(x), y).sum()

    train_ds = TensorDataset(*sp.train)
    singles, tracked = [], None
    torch.manual_seed(0)
    for r, (_, module) in enumerate(runs):
        net = prepare_model(_kf_model(t, module.net).eval(), SuiteKFTask())
        tracked = sorted({n.rsplit(".", 1)[0] for n, mod in net.named_modules() if type(mod).__name__.startswith("Tracked")}
                         or {type(mod).__name__ for _, mod in net.named_modules()})
        out = Path(tempfile.mkdtemp(prefix="kf_", dir=str(S.SUITE)))
        try:
            an = Analyzer(analysis_name=f"{t.name}{r}", model=net, task=SuiteKFTask(), cpu=True, output_dir=str(out),
                          disable_tqdm=True, disable_model_save=True)
            an.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=500,
                               factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            an.compute_pairwise_scores(scores_name="heur", factors_name="ekfac", query_dataset=TensorDataset(*sp.query),
                                       train_dataset=train_ds, per_device_query_batch_size=t.n_query,
                                       per_device_train_batch_size=500,
                                       score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
            s = an.load_pairwise_scores("heur")["all_modules"].double()  # [Q, T]
            # kronfluence: measurement gradᵀ H⁻¹ train-loss grad; up-weighting t moves θ by −H⁻¹g_t,
            # so the measurement changes by −score: negate (as benchmarks/attribution_digits.py).
            singles.append(-s)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    one = [S.lds_of(s, gt) for s in singles]
    five = S.evaluate(torch.stack(singles).mean(0), None, gt)["query"]
    return {"lds_1": float(np.mean(one)), "lds_1_runs": one, "lds_5": five, "tracked_modules": tracked,
            "damping": "kronfluence heuristic (damping_factor=None: 0.1 x mean eigenvalue)"}


# ---------------------------------------------------------------------- (d) exact TRAK
def _flat_grads(net64, params, fn, X, Y, chunk=250) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    names = list(params)

    def f(p, x, y):
        return fn(functional_call(net64, p, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    gf = vmap(grad(f), in_dims=(None, 0, 0))
    out = []
    for i in range(0, len(X), chunk):
        g = gf(params, X[i:i + chunk], Y[i:i + chunk])
        out.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1))
    return torch.cat(out)


def exact_trak_scores(t, sp, net, grid):
    """Per ratio ρ of ``grid``: (scores_q [Q, T], scores_v [V, T]) of unprojected TRAK at ``net``'s weights."""
    net64 = copy.deepcopy(net).double().eval()
    params = {k: v.detach() for k, v in net64.named_parameters()}

    def cast(x):
        return x.double() if x.is_floating_point() else x

    Xt, Yt = cast(sp.train[0]), cast(sp.train[1])
    Phi = _flat_grads(net64, params, lambda o, y: S.train_feature(t, o, y), Xt, Yt)  # [T, N]
    G = _flat_grads(net64, params, lambda o, y: S.per_example(t, o, y), Xt, Yt)  # [T, N]
    Qs = [_flat_grads(net64, params, lambda o, y: S.measurement(t, o, y), cast(x), cast(y))
          for x, y in (sp.query, sp.val)]
    T, N = Phi.shape
    scale = float((Phi * Phi).sum()) / T
    out = []
    if N <= T:  # primal: eigh of ΦᵀΦ [N, N]
        e, V = torch.linalg.eigh(Phi.T @ Phi)
        GV = G @ V
        QV = [q @ V for q in Qs]
        for rho in grid:
            lam = rho * scale
            out.append(tuple(-(qv / (e + lam)) @ GV.T for qv in QV))
    else:  # dual (Woodbury): (ΦᵀΦ+λI)⁻¹ = (I − Φᵀ(ΦΦᵀ+λI)⁻¹Φ)/λ, eigh of ΦΦᵀ [T, T]
        e, U = torch.linalg.eigh(Phi @ Phi.T)
        B = U.T @ (Phi @ G.T)  # [T, T]
        A = [(q @ Phi.T) @ U for q in Qs]
        QG = [q @ G.T for q in Qs]
        for rho in grid:
            lam = rho * scale
            out.append(tuple(-(qg - (a / (e + lam)) @ B) / lam for qg, a in zip(QG, A)))
    return out, {"N": N, "T": T, "mode": "primal" if N <= T else "dual", "trace_over_T": scale}


def part_exact(t, sp, gt, runs) -> dict:
    from lightning_sketch.attribution import DAMPING_RATIO_GRID

    grid = list(DAMPING_RATIO_GRID)
    one_q, one_v, info = [], [], None
    sum_q = sum_v = None
    for _, module in runs:
        per, info = exact_trak_scores(t, sp, module.net, grid)
        one_q.append([S.lds_of(sq, gt, "query") for sq, _ in per])
        one_v.append([S.lds_of(sv, gt, "val") for _, sv in per])
        sq = torch.stack([p[0] for p in per])
        sv = torch.stack([p[1] for p in per])
        sum_q = sq if sum_q is None else sum_q + sq
        sum_v = sv if sum_v is None else sum_v + sv
        del per
    ens_q = [S.lds_of(s, gt, "query") for s in sum_q]
    ens_v = [S.lds_of(s, gt, "val") for s in sum_v]
    out = _summ(one_q, one_v, ens_q, ens_v, grid)
    ev = int(np.nanargmax(ens_v))
    out["val_tuned_5_ci"] = S.evaluate(sum_q[ev] / len(runs), None, gt)["query"]
    out.update({"grid": grid, **info})
    return out


# ---------------------------------------------------------------------- driver
def run_task(name: str, a, parts) -> dict:
    t = S.get_task(name)
    sp = S.splits(t)
    res: dict = {"task": name, "config": asdict(t), "uptime_start": uptime(), "timings": {}}
    t0 = time.perf_counter()
    gt = S.ground_truth(t, a.subsets, a.seeds, threads=1)
    res["timings"]["ground_truth_compute_s"] = gt.seconds
    res["timings"]["ground_truth_wall_s"] = time.perf_counter() - t0
    res["gt"] = {"path": str(gt.path), "S": int(gt.masks.shape[0]),
                 "query_output_sd": float(gt.query_outputs.std(0).mean())}
    print(f"[{name}] ground truth: {gt.seconds:.0f} s compute ({gt.path.name})  | {uptime()}", flush=True)
    t0 = time.perf_counter()
    runs, finfo = S.fit_runs(t, a.runs, refit=a.refit)
    res["timings"]["fit_wall_s"] = time.perf_counter() - t0
    res["timings"]["fit_s_per_run"] = finfo["seconds"]
    res["fit"] = {"dir": finfo["dir"], "lib_hash": finfo["lib_hash"], "cached": finfo["cached"],
                  "callback_kwargs": finfo.get("callback_kwargs", {}), "default_error": finfo.get("default_error"),
                  "warnings": S.summarise_warnings(finfo["warnings"])}
    fw = res["fit"]["warnings"]
    print(f"[{name}] fits: {sum(finfo['seconds']):.0f} s ({'cached' if all(finfo['cached']) else 'trained'}), "
          f"{fw['total']} warnings ({fw['lightning_sketch']} from lightning_sketch)", flush=True)
    fns = {"default": part_default, "trak": part_trak, "kf": part_kf, "exact": part_exact}
    for p in parts:
        t0 = time.perf_counter()
        try:
            res[p] = fns[p](t, sp, gt, runs)
        except Exception as err:  # noqa: BLE001 - report and go on with the other parts
            res[p] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"[{name}] {p} FAILED: {type(err).__name__}: {err}", flush=True)
        res["timings"][f"{p}_s"] = time.perf_counter() - t0
        r = res[p]
        if "error" not in r:
            if p in ("default", "kf"):
                extra = (f"  method={r['method']} kernel={r['kernel']} ratio={r['damping_ratio']:.3g} "
                         f"query warnings={r['query_warnings']['total']} top-10 overlap at λ/√10, λ√10: "
                         f"{r.get('top_k_overlap')}") if p == "default" else ""
                print(f"[{name}] {p:8s} LDS 1 model {r['lds_1']:.3f}  {a.runs} models {r['lds_5'][0]:.3f} "
                      f"[{r['lds_5'][1]:.3f}, {r['lds_5'][2]:.3f}]{extra}  ({res['timings'][f'{p}_s']:.0f} s)",
                      flush=True)
            else:
                print(f"[{name}] {p:8s} val-tuned 1 {r['val_tuned_1']:.3f} 5 {r['val_tuned_5']:.3f} (ρ {r['val_tuned_ratio_5']:.3g})"
                      f" | oracle 1 {r['oracle_1']:.3f} (ρ {r['oracle_ratio_1']:.3g}) 5 {r['oracle_5']:.3f} "
                      f"(ρ {r['oracle_ratio_5']:.3g})  ({res['timings'][f'{p}_s']:.0f} s)", flush=True)
                print(f"          curve q5: {' '.join(f'{v:.3f}' for v in r['curve_query_5'])}", flush=True)
    res["uptime_end"] = uptime()
    return res


def _f(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def markdown(results: dict, n_runs: int) -> str:
    lines = [
        f"LDS on the query split (1 model = mean of the single-run LDS; {n_runs} = ensemble). "
        "trak: ratio chosen by `tune_damping` on val LDS (1 model: each run on its own val) / oracle on the query split.",
        "",
        "| task | T | default 1 / 5 | default method, kernel, ρ | warnings fit (lib) / query | trak val-tuned 1 / 5 (ρ₅) "
        "| trak oracle 1 / 5 | kronfluence 1 / 5 | exact TRAK val-tuned 1 / 5 (ρ₅) | exact oracle 1 / 5 | time GT / fit / a,b,c,d s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r and "fit" not in r:
            lines.append(f"| {name} | FAILED: {r['error'][:200]} |" + " |" * 9)
            continue
        d, b, k, e = (r.get(p, {}) for p in PARTS)
        tm = r.get("timings", {})

        def ok(x):
            return x and "error" not in x

        row = [name, str(r.get("config", {}).get("n_train", "?"))]
        row.append(f"{_f(d['lds_1'])} / {_f(d['lds_5'][0])}" if ok(d) else ("ERROR" if d else ""))
        cbk = r.get("fit", {}).get("callback_kwargs") or {}
        note = (" (default GradientSketch crashed; runs with " + ", ".join(f"{k}={v}" for k, v in cbk.items()) + ")"
                if r.get("fit", {}).get("default_error") else "")
        row.append((f"{d['method']}, {d['kernel']}, {d['damping_ratio']:.3g}" if ok(d) else "") + note)
        fw = r.get("fit", {}).get("warnings", {})
        qw = d.get("query_warnings", {}).get("total", "?") if ok(d) else "?"
        row.append(f"{fw.get('total', '?')} ({fw.get('lightning_sketch', '?')}) / {qw}")
        row.append(f"{_f(b['val_tuned_1'])} / {_f(b['val_tuned_5'])} ({b['val_tuned_ratio_5']:.3g})" if ok(b) else ("ERROR" if b else ""))
        row.append(f"{_f(b['oracle_1'])} / {_f(b['oracle_5'])}" if ok(b) else "")
        row.append(f"{_f(k['lds_1'])} / {_f(k['lds_5'][0])}" if ok(k) else ("ERROR" if k else ""))
        row.append(f"{_f(e['val_tuned_1'])} / {_f(e['val_tuned_5'])} ({e['val_tuned_ratio_5']:.3g})" if ok(e) else ("ERROR" if e else ""))
        row.append(f"{_f(e['oracle_1'])} / {_f(e['oracle_5'])}" if ok(e) else "")
        row.append(" / ".join(f"{tm[x]:.0f}" if x in tm else "–" for x in
                              ("ground_truth_compute_s", "fit_wall_s")) + " / " +
                   ",".join(f"{tm[p + '_s']:.0f}" if p + "_s" in tm else "–" for p in PARTS))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(ALL_TASKS))
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--subsets", type=int, default=None, help="ground-truth subsets (default 100)")
    p.add_argument("--seeds", type=int, default=None, help="ground-truth seeds per subset (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refit", action="store_true", help="retrain the Lightning runs even if cached")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/.cache/suite/results.json; "
                                               "results_smoke.json when --subsets/--runs differ from the defaults)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    _import_library()
    parts = [x for x in a.parts.split(",") if x]
    smoke = a.runs != 5 or (a.subsets not in (None, 100)) or (a.seeds not in (None, 2))
    out = Path(a.out) if a.out else S.SUITE / ("results_smoke.json" if smoke else "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    print(f"attr_suite: tasks {a.tasks} parts {parts} runs {a.runs} | lib hash {S.library_hash()} | {uptime()}",
          flush=True)
    t_all = time.perf_counter()
    for name in a.tasks.split(","):
        t0 = time.perf_counter()
        try:
            res = run_task(name, a, parts)
        except Exception as err:  # noqa: BLE001 - e.g. a fit that crashed: record it, go on with the next task
            print(f"[{name}] FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}", flush=True)
            results[name] = {"task": name, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            out.write_text(json.dumps(results, indent=1))
            continue
        res["timings"]["task_wall_s"] = time.perf_counter() - t0
        prev = results.get(name, {})
        if prev.get("fit", {}).get("lib_hash") == res["fit"]["lib_hash"]:  # keep parts not rerun now
            for p in PARTS:
                if p not in res and p in prev:
                    res[p] = prev[p]
                    if prev.get("timings", {}).get(f"{p}_s") is not None:
                        res["timings"].setdefault(f"{p}_s", prev["timings"][f"{p}_s"])
        results[name] = res
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(markdown(results, a.runs))
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(markdown(results, a.runs))
    print(f"total {time.perf_counter() - t_all:.0f} s | {uptime()} | wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
