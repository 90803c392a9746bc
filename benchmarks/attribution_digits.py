"""Attribution benchmark: LDS of our methods and the peers on a task of ``benchmarks/_attr_tasks.py``.

Task ``digits_mlp`` (default here; the protocol is defined in ``_attr_tasks.py``): sklearn digits,
1000 train / 200 queries / 200 validation (validation only tunes λ), MLP 64→128→10, SGD momentum 0.9,
lr 0.1, wd 1e-4, batch 64, 20 epochs. ``benchmarks/attribution_cnn.py`` runs the same harness on the
second task, ``digits_cnn`` (a small CNN on the 8×8 images). LDS ground truth: 100 random half
subsets × 2 seeds retrained with :func:`lightning_sketch.evaluation.subset_retraining`, output = the
margin, cached under ``benchmarks/.cache/`` (``_attr_tasks.ground_truth``).

Ours: every method of ``lightning_sketch.attribution.METHODS`` at run time, read from the stores
written during ``--runs`` Lightning runs by ``GradientSketch(sketch_kind="affd", sketch_dim=D)``
(callback defaults otherwise), queried with default arguments (``Attributor(run_dir, model,
method=m)``) and, where the method has a damping, with λ tuned on the validation split's LDS
(``tune_damping(objective=...)``, each run tuned on its own validation LDS); 1 model and the
``--runs``-model ensemble (scores averaged over runs). Peers (traker, dattri, captum, kronfluence)
see the same final weights, with their default settings and with λ tuned on validation LDS; their
rows are cached in ``benchmarks/.cache/peers_<task>_<hash>.json``.
Sign convention everywhere: positive = training on the example raises the query's margin.

Run: ``python benchmarks/attribution_digits.py`` (``--quick`` for a smoke run, ``--peers ""`` for
ours only, ``--no-ours`` for the peers only; peers need the ``bench`` extra and kronfluence, see
pyproject.toml).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _attr_tasks as tasks
from _attr_tasks import CACHE, dict_batch, fit_one, fit_runs, get_task, ground_truth, lds_ci, margin, splits


# ---------------------------------------------------------------------- ours
def _ensemble_api() -> bool:
    """Whether Attributor takes a list of runs (one call for an ensemble)."""
    import inspect

    from lightning_sketch.attribution import Attributor

    return "damping_ratio" in inspect.signature(Attributor).parameters


def our_scores(runs, method, qb, tune_vb=None, val_objective=None):
    """Scores [Q, T] (columns = training rows 0..T-1) of ``method`` over ``runs`` [(run_dir, module)].

    An ensemble goes through the public API in one call (``Attributor([run dirs], [models])``) when
    the library offers it, else the per-run scores are averaged here. With ``tune_vb`` the damping is
    tuned with ``tune_damping(objective=val LDS)`` (on the ensemble's scores, or per run without the
    ensemble API). ``method=None`` = ``Attributor``'s default. Returns (scores, [dampings] or None,
    the method the Attributor resolved to). Raises the library's error when the method cannot run.
    """
    from lightning_sketch.attribution import Attributor

    kw = {} if method is None else {"method": method}
    groups = [runs] if (len(runs) > 1 and _ensemble_api()) else [[r] for r in runs]
    total, lams, resolved = 0, [], None
    for group in groups:
        dirs, mods = [r[0] for r in group], [r[1] for r in group]
        att = Attributor(dirs if len(group) > 1 else dirs[0], mods if len(group) > 1 else mods[0], **kw)
        resolved = att.method
        if tune_vb is not None:
            lams.append(att.tune_damping([tune_vb], objective=val_objective))
        s = att.scores(qb)
        order = torch.argsort(att.ids)
        if not torch.equal(att.ids[order], torch.arange(len(order))):
            raise RuntimeError(f"{method}: stored ids are not the training rows 0..T-1")
        total = total + s[:, order]
    return total / len(groups), (lams or None), resolved


def arnoldi_scores(runs, train, qb, k=50):
    """arnoldi_if with probe batches (its default needs eigenpairs it cannot find alone on this branch)."""
    from lightning_sketch.attribution import Attributor

    total = 0
    n = len(train[1])
    for run_dir, module in runs:
        probe = [dict_batch(train[0][i : i + 250], train[1][i : i + 250]) for i in range(0, n, 250)]
        att = Attributor(run_dir, module, method="arnoldi_if", hessian_batches=probe, arnoldi_k=k)
        total = total + att.scores(qb)[:, torch.argsort(att.ids)]
    return total / len(runs)


# ---------------------------------------------------------------------- main
def main(argv=None, default_task: str = "digits_mlp"):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default=default_task, choices=sorted(tasks.TASKS))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (not a result)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sketch-dim", type=int, default=1024)
    p.add_argument("--every-n-epochs", type=int, default=None, help="callback slices (default: the callback's)")
    p.add_argument("--peers", default="traker,dattri,captum,kronfluence")
    p.add_argument("--no-ours", action="store_true", help="skip our methods (peers only)")
    p.add_argument("--methods", default=None, help="comma-separated subset of METHODS (default: all)")
    p.add_argument("--no-mislabel", action="store_true")
    p.add_argument("--runs-dir", default=None, help="keep the Lightning runs here and reuse them (default: temp)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--dampings", default=None, help="comma-separated λ grid for the peers (default 1e-8..1e6)")
    p.add_argument("--refresh-peers", action="store_true", help="ignore the cached peer rows")
    p.add_argument("--overhead-only", action="store_true", help="only time the callback against a plain fit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small models)")
    a = p.parse_args(argv)
    task = get_task(a.task)
    if a.quick:
        task = replace(task, epochs=4, n_subsets=20, n_seeds=1)
        a.runs = min(a.runs, 2)
    torch.set_num_threads(a.threads)
    if a.dampings:
        DAMPINGS[:] = [float(v) for v in a.dampings.split(",")]
    results: dict = {"config": {**vars(a), "task": asdict(task)}}
    sp = splits(task)
    cb_kw = {} if a.every_n_epochs is None else {"every_n_epochs": a.every_n_epochs}
    if a.overhead_only:
        results["overhead"] = overhead(a, task, sp.train)
        _dump(a, results)
        return results
    gt = ground_truth(task)
    masks, gt_q, gt_v = gt.masks, gt.query_outputs, gt.val_outputs
    print(f"[{task.name}] ground truth: {task.n_subsets} subsets x {task.n_seeds} seeds, {task.epochs} epochs "
          f"({'cached' if gt.seconds == 0 else f'{gt.seconds:.1f} s'}: {gt.path.name})", flush=True)
    qb, vb = dict_batch(*sp.query), dict_batch(*sp.val)
    work = Path(a.runs_dir) if a.runs_dir else Path(tempfile.mkdtemp(prefix=f"attr_{task.name}_"))
    rows = []

    def report(name, models, scores_q, extra=""):
        m, lo, hi = lds_ci(scores_q, masks, gt_q)
        rows.append({"method": name, "models": models, "lds": m, "ci": [lo, hi], "note": extra})
        print(f"  {name:<44} models={models}  LDS {m:.3f} [{lo:.3f}, {hi:.3f}] {extra}", flush=True)

    def val_objective(s):
        return lds_ci(s, masks, gt_v, n_boot=1)[0]

    try:
        t0 = time.perf_counter()
        # peers only: train without the callback (the callback leaves training bit-identical)
        runs = fit_runs(task, a.runs, work / "runs", cb_kw, sketch_dim=a.sketch_dim, callback=not a.no_ours,
                        reuse=a.runs_dir is not None)
        acc = [float((m(sp.query[0]).argmax(1) == sp.query[1]).float().mean()) for _, m in runs]
        how = "no callback" if a.no_ours else f"GradientSketch(affd, D={a.sketch_dim}, {cb_kw or 'defaults'})"
        print(f"{a.runs} runs ({how}) in "
              f"{time.perf_counter() - t0:.0f} s; query accuracy {np.mean(acc):.3f}", flush=True)
        results["query_accuracy"] = float(np.mean(acc))
        print("LDS on the 200 queries (95% bootstrap interval over queries):", flush=True)
        if not a.no_ours:
            from lightning_sketch.attribution import METHODS
            from lightning_sketch.exceptions import LightningSketchError, SketchConfigError

            methods = list(METHODS) if not a.methods else [m for m in a.methods.split(",") if m]
            results["methods"] = methods
            def lam_note(lams):
                name = "ρ" if _ensemble_api() else "λ"
                return f"{name}=" + ",".join(f"{v:.3g}" for v in lams)

            for nm in sorted({1, a.runs}):  # Attributor(run_dir, model): nothing else set
                try:
                    s, _, resolved = our_scores(runs[:nm], None, qb)
                    report(f"ours Attributor defaults (method → {resolved})", nm, s)
                except LightningSketchError as err:
                    print(f"  ours Attributor defaults: cannot run ({type(err).__name__}: {err})"[:200])
            for method in methods:
                damped = True
                for nm in sorted({1, a.runs}):
                    sub = runs[:nm]
                    try:
                        s, _, _ = our_scores(sub, method, qb)
                        report(f"ours {method} (defaults)", nm, s)
                    except LightningSketchError as err:
                        msg = f"{type(err).__name__}: {err}".splitlines()[0][:160]
                        print(f"  ours {method} (defaults): cannot run ({msg})")
                        rows.append({"method": f"ours {method} (defaults)", "models": nm, "error": msg})
                        if method == "arnoldi_if":
                            report("ours arnoldi_if (top-50 eigenpairs from probe batches)", nm,
                                   arnoldi_scores(sub, sp.train, qb))
                        continue
                    if damped:
                        try:
                            s, lams, _ = our_scores(sub, method, qb, tune_vb=vb, val_objective=val_objective)
                        except SketchConfigError:  # tune_damping does not apply: no damping to tune
                            damped = False
                            continue
                        report(f"ours {method} (damping tuned on val LDS)", nm, s, lam_note(lams))

        finals = [copy.deepcopy(m.net).eval() for _, m in runs]
        for peer in [x for x in a.peers.split(",") if x]:
            for nm in sorted({1, a.runs}):
                for row in peer_rows(peer, task, finals[:nm], sp, masks, gt_q, gt_v, a):
                    rows.append(row)
                    if "error" in row:
                        print(f"  peer {peer}: could not run ({row['error']})", flush=True)
                    else:
                        lo, hi = row["ci"]
                        print(f"  {row['method']:<44} models={nm}  LDS {row['lds']:.3f} [{lo:.3f}, {hi:.3f}] "
                              f"{row['note']}{' (cached)' if row.get('cached') else ''}", flush=True)
        results["lds"] = rows
        print(markdown_table(rows, a.runs), flush=True)

        if not (a.no_mislabel or a.no_ours):
            results["mislabel"] = mislabel(task, work, cb_kw, a)
    finally:
        if not a.runs_dir:
            shutil.rmtree(work, ignore_errors=True)
        _dump(a, results)
    return results


def markdown_table(rows, n_runs):
    """Rows as a Markdown table: one line per method, columns 1 model and ``n_runs`` models."""
    table: dict[str, dict] = {}
    for r in rows:
        cell = r["error"][:60] if "error" in r else f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        if r.get("note"):
            cell += f" {r['note']}"
        table.setdefault(r["method"], {})[r["models"]] = cell
    lines = [f"| Method | 1 model | {n_runs} models |", "|---|---|---|"]
    lines += [f"| {m} | {c.get(1, '–')} | {c.get(n_runs, '–')} |" for m, c in table.items()]
    return "\n".join(lines)


def _dump(a, results):
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=float))


def mislabel(task, work, cb_kw, a):
    """10% flipped labels, one run with the callback: AUROC and found-in-top-10% of self-influence."""
    from lightning_sketch.attribution import METHODS, Attributor
    from lightning_sketch.evaluation import mislabel_auroc, mislabel_detection_curve
    from lightning_sketch.exceptions import LightningSketchError

    sp = splits(task, flip=0.1)
    mod, _ = fit_one(task, 0, sp.train, work / "flip", {"sketch_kind": "affd", "sketch_dim": a.sketch_dim, **cb_kw})
    mod.eval()
    out = {}
    for method in METHODS:
        try:
            ids, si = Attributor(work / "flip", mod, method=method).self_influence()
        except LightningSketchError as err:
            print(f"  mislabel {method}: cannot run with defaults ({type(err).__name__})")
            continue
        auc = float(mislabel_auroc(si, sp.flipped[ids]))
        top10 = float(mislabel_detection_curve(si, sp.flipped[ids], fractions=(0.1,))[0])
        out[method] = {"auroc": auc, "found_top10pct": top10}
    print("mislabel detection (10% flipped labels, self-influence, 1 run): "
          + ", ".join(f"{k} AUROC {v['auroc']:.3f} / top-10% {v['found_top10pct']:.2f}" for k, v in out.items()))
    return out


def overhead(a, task, train, repeats: int = 3):
    """Median-of-``repeats`` fit times: plain, checkpoint mode, inline per_layer, inline fallback."""
    work = Path(tempfile.mkdtemp(prefix="attr_overhead_"))
    configs = {
        "plain": None,
        "checkpoint": {"sketch_kind": "affd", "sketch_dim": a.sketch_dim, "every_n_epochs": a.every_n_epochs or 1},
        "inline_per_layer": {"sketch_kind": "per_layer", "sketch_dim": a.sketch_dim, "mode": "inline"},
        "inline_affd_fallback": {"sketch_kind": "affd", "sketch_dim": a.sketch_dim, "mode": "inline"},
    }
    times = {k: [] for k in configs}
    try:
        fit_one(replace(task, epochs=1), 0, train, work / "warm", configs["inline_per_layer"])  # first-call costs
        for _ in range(repeats):  # interleaved, so load changes on the shared machine hit all alike
            for name, kw in configs.items():
                shutil.rmtree(work / name, ignore_errors=True)
                times[name].append(fit_one(task, 0, train, work / name, kw)[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in configs if k != "plain"}
    print(f"fit time ratio to a plain fit (median of {repeats}, interleaved): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f"  (plain fit {med['plain']:.2f} s)")
    return ratios


# ---------------------------------------------------------------------- peers
DAMPINGS = [10.0**e for e in range(-8, 7)]


def peer_rows(peer, task, models, sp, masks, gt_q, gt_v, a):
    """LDS rows of one peer on ``len(models)`` models, from the cache when the configuration matches."""
    cfg = {"v": 1, "peer": peer, "task": asdict(task), "models": len(models), "k": a.sketch_dim,
           "dampings": DAMPINGS, "weights": float(sum(float(p.double().sum()) for m in models for p in m.parameters())),
           "gt": float(gt_q.double().sum())}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"peers_{task.name}_{peer}_{key}.json"
    if path.exists() and not a.refresh_peers:
        try:
            cached = json.loads(path.read_text())
            if cached.get("config") == json.loads(json.dumps(cfg)):
                return [{**r, "cached": True} for r in cached["rows"]]
        except (OSError, ValueError):
            pass
    rows = []
    t0 = time.perf_counter()
    try:
        fn = globals()[f"peer_{peer}"]
        for name, s, note in fn(models, sp.train, sp.query, sp.val, masks, gt_v, a):
            m, lo, hi = lds_ci(s, masks, gt_q)
            rows.append({"method": name, "models": len(models), "lds": m, "ci": [lo, hi], "note": note})
    except Exception as err:  # noqa: BLE001  (a peer failing must not stop the others; reported plainly)
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        traceback.print_exc(limit=3, file=sys.stderr)
        return [{"method": f"peer {peer}", "models": len(models), "error": msg}]
    secs = time.perf_counter() - t0
    for r in rows:
        r["seconds"] = secs
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": cfg, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                               indent=1))
    return rows


def _best(cands, fn, masks, gt_v):
    """Evaluate fn(param) -> (val_scores, query_scores) for each candidate; keep the best val LDS."""
    best = None
    for c in cands:
        sv, sq = fn(c)
        v = lds_ci(sv, masks, gt_v, n_boot=1)[0]
        if best is None or v > best[0]:
            best = (v, c, sq)
    return best


def _edge(lam):
    return " (grid edge)" if lam in (DAMPINGS[0], DAMPINGS[-1]) else ""


def peer_traker(models, train, query, val, masks, gt_v, a):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    save = Path(tempfile.mkdtemp(prefix="traker_"))
    try:
        net = copy.deepcopy(models[0])
        n_params = sum(p.numel() for p in net.parameters())
        proj = BasicProjector(grad_dim=n_params, proj_dim=a.sketch_dim, seed=0, proj_type=ProjectionType.rademacher,
                              device="cpu", dtype=torch.float32)
        n = len(train[1])
        tk = TRAKer(model=net, task="image_classification", train_set_size=n, projector=proj,
                    proj_dim=a.sketch_dim, save_dir=str(save), device="cpu", use_half_precision=False)
        for mid, m in enumerate(models):
            tk.load_checkpoint(m.state_dict(), model_id=mid)
            for i in range(0, n, 100):
                tk.featurize(batch=(train[0][i : i + 100], train[1][i : i + 100]), num_samples=100)

        def run(lam):
            # featurize once; re-finalize (Φ(ΦᵀΦ + λI)⁻¹) and re-score for every λ
            tk.score_computer.lambda_reg = lam
            for mid in range(len(models)):
                tk.saver.model_ids[mid]["is_finalized"] = 0
            tk.finalize_features()
            out = {}
            for split, (xq, yq) in (("v", val), ("q", query)):
                name = f"{split}{lam:g}".replace(".", "p").replace("-", "m").replace("+", "")
                for mid, m in enumerate(models):
                    tk.start_scoring_checkpoint(exp_name=name, checkpoint=m.state_dict(), model_id=mid,
                                                num_targets=len(yq))
                    tk.score(batch=(xq, yq), num_samples=len(yq))
                out[split] = torch.as_tensor(np.asarray(tk.finalize_scores(exp_name=name))).T.double()  # [Q, T]
            return out["v"], out["q"]

        _v, lam, sq = _best(DAMPINGS, run, masks, gt_v)
        yield f"traker TRAK (k={a.sketch_dim}, λ tuned)", sq, f"λ={lam:.0e}{_edge(lam)}"
        _, sq0 = run(0.0)
        yield f"traker TRAK (k={a.sketch_dim}, default λ=0)", sq0, ""
    finally:
        shutil.rmtree(save, ignore_errors=True)


def peer_kronfluence(models, train, query, val, masks, gt_v, a):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class DigitsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return margin(model(x), y).sum()

    train_ds = TensorDataset(*train)
    total = {}
    for mid, m in enumerate(models):
        net = prepare_model(copy.deepcopy(m), DigitsTask())
        out = Path(tempfile.mkdtemp(prefix="kf_"))
        try:
            an = Analyzer(analysis_name=f"digits{mid}", model=net, task=DigitsTask(), cpu=True, output_dir=str(out),
                          disable_tqdm=True)
            an.fit_all_factors(factors_name="ekfac", dataset=train_ds, per_device_batch_size=250,
                               factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            for lam in [*DAMPINGS, None]:  # None: kronfluence's heuristic 0.1 x mean eigenvalue
                sa = ScoreArguments(damping_factor=lam)
                for split, (xq, yq) in (("v", val), ("q", query)):
                    name = (f"s_{split}_heur" if lam is None
                            else f"s_{split}_{lam:g}".replace(".", "p").replace("-", "m").replace("+", ""))
                    an.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=TensorDataset(xq, yq),
                                               train_dataset=train_ds, per_device_query_batch_size=200,
                                               per_device_train_batch_size=250, score_args=sa, overwrite_output_dir=True)
                    s = an.load_pairwise_scores(name)["all_modules"].double()  # [Q, T]
                    # kronfluence scores are for the measurement's *increase* when up-weighting with the
                    # loss gradient sign: positive = helpful for the margin after negation
                    total.setdefault((split, lam), 0)
                    total[(split, lam)] = total[(split, lam)] - s / len(models)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    _v, lam, sq = _best(DAMPINGS, lambda l: (total[("v", l)], total[("q", l)]), masks, gt_v)
    yield "kronfluence EK-FAC (λ tuned)", sq, f"λ={lam:.0e}{_edge(lam)}"
    default = ScoreArguments().damping_factor
    if ("q", default) in total:
        yield f"kronfluence EK-FAC (default λ={default:g})", total[("q", default)], ""
    yield "kronfluence EK-FAC (heuristic λ = 0.1 mean eig.)", total[("q", None)], ""


def peer_captum(models, train, query, val, masks, gt_v, a):
    from captum.influence import TracInCP

    net = copy.deepcopy(models[0])
    ckpt_dir = Path(tempfile.mkdtemp(prefix="captum_"))
    try:
        paths = []
        for i, m in enumerate(models):
            pth = ckpt_dir / f"m{i}.pt"
            torch.save(m.state_dict(), pth)
            paths.append(str(pth))

        def load(model, path):
            model.load_state_dict(torch.load(path, weights_only=True))
            return 1.0

        tr = TracInCP(net, TensorDataset(*train), checkpoints=paths, checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=250, sample_wise_grads_per_batch=True)
        s = tr.influence((query[0], query[1]), show_progress=False)
        yield "captum TracInCP (final weights of each run)", torch.as_tensor(s).double(), "no damping"
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def peer_dattri(models, train, query, val, masks, gt_v, a):
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def loss_func(params, data):
        x, y = data
        logits = torch.func.functional_call(net, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    def correct_prob(params, data):
        x, y = data
        logits = torch.func.functional_call(net, params, (x.unsqueeze(0),))
        return logits.softmax(-1)[0, y]

    net = copy.deepcopy(models[0])
    ckpts = [m.state_dict() for m in models]
    task = AttributionTask(loss_func=loss_func, model=net, checkpoints=ckpts)
    tl = DataLoader(TensorDataset(*train), batch_size=100)

    def run(lam):
        att = TRAKAttributor(task=task, correct_probability_func=correct_prob, device="cpu",
                             projector_kwargs={"proj_dim": a.sketch_dim, "device": "cpu"}, regularization=lam)
        att.cache(tl)
        out = []
        for split in (val, query):
            s = att.attribute(DataLoader(TensorDataset(*split), batch_size=200))  # [T, Q]
            out.append(torch.as_tensor(s).T.double())
        return out[0], out[1]

    _v, lam, sq = _best(DAMPINGS, run, masks, gt_v)
    yield f"dattri TRAK (k={a.sketch_dim}, λ tuned)", sq, f"λ={lam:.0e}{_edge(lam)}"
    _, sq0 = run(0.0)
    yield f"dattri TRAK (k={a.sketch_dim}, default λ=0)", sq0, ""




if __name__ == "__main__":
    main()
