"""Attribution on sklearn digits: LDS, mislabel AUC, overhead, bytes and latency (LDS after Park et al. 2023).

Protocol: ``load_digits`` (no download), fixed permutation (seed 0): 1000 train,
200 queries, 200 validation (used only to tune damping λ); MLP 64→128→10, SGD momentum 0.9,
lr 0.1, weight decay 1e-4, batch 64, 20 epochs. LDS ground truth: ``--subsets`` random half-size
subsets × ``--seeds`` seeds, trained batched with ``torch.func.stack_module_state`` + ``vmap``, output
= the margin; cached under ``benchmarks/.cache/`` keyed by a hash of the configuration.

Our methods read the stores written *during* 5 independent Lightning runs by the
:class:`~lightning_sketch.callbacks.GradientSketch` callback (checkpoint mode, sketch ``--kind`` at
``--sketch-dim``); peers (traker, dattri, captum, kronfluence) see the same final / epoch weights.
Sign convention everywhere: positive = training on the example raises the query's margin.

Run: ``.venv/bin/python benchmarks/attribution_digits.py`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"


# ---------------------------------------------------------------------- data and model
def load_split(flip: float = 0.0, seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(y)))
    tr, q, va = perm[:1000], perm[1000:1200], perm[1200:1400]
    ytr = y[tr].clone()
    flipped = torch.zeros(1000, dtype=torch.bool)
    if flip:
        g = torch.Generator().manual_seed(seed + 1)
        idx = torch.randperm(1000, generator=g)[: int(flip * 1000)]
        ytr[idx] = (ytr[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
        flipped[idx] = True
    return (X[tr], ytr), (X[q], y[q]), (X[va], y[va]), flipped


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from lightning_sketch.attribution import classification_margin

    return classification_margin(logits, y)


def lightning_module(seed: int, epochs: int):
    from lightning.pytorch import LightningModule

    class DigitsMLP(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp(seed)

        def forward(self, x):
            return self.net(x)

        def per_example_loss(self, batch):
            return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

        def per_example_margin(self, batch):
            return margin(self(batch["x"]), batch["y"])

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    return DigitsMLP()


def dict_batch(x, y, ids=None):
    return {"x": x, "y": y, "index": torch.arange(len(y)) if ids is None else ids}


# ---------------------------------------------------------------------- ground truth
def train_batched(X, Y, subsets: torch.Tensor, seeds: list[int], epochs=20, bs=64, lr=0.1, mom=0.9, wd=1e-4):
    """Train M MLPs at once, model m on rows ``subsets[m]`` (equal sizes): returns stacked params."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [make_mlp(s) for s in seeds]
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, x, y):
        return F.cross_entropy(functional_call(base, p, (x,)), y)

    g_fn = vmap(grad(loss))
    buf = {k: torch.zeros_like(v) for k, v in params.items()}
    M, n = subsets.shape
    gen = torch.Generator().manual_seed(12345)
    for _ in range(epochs):
        order = torch.argsort(torch.rand(M, n, generator=gen), dim=1)
        idx = subsets.gather(1, order)
        for s in range(0, n, bs):
            b = idx[:, s : s + bs]
            grads = g_fn(params, X[b], Y[b])
            for k in params:
                d = grads[k] + wd * params[k]
                buf[k].mul_(mom).add_(d)
                params[k].sub_(lr * buf[k])
    return params, base


def ground_truth(train, targets, n_subsets: int, n_seeds: int, epochs: int):
    """(masks [M, 1000] float, margins [M, Q_total]) averaged over seeds; cached by config hash."""
    X, Y = train
    Xt, Yt = targets
    cfg = {"v": 2, "n_subsets": n_subsets, "n_seeds": n_seeds, "epochs": epochs, "n": len(Y),
           "xsum": float(X.sum()), "tsum": float(Xt.sum())}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"lds_gt_{key}.npz"
    if path.exists():
        data = np.load(path)
        return torch.from_numpy(data["masks"]), torch.from_numpy(data["margins"]), 0.0
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(2024)
    subsets = torch.stack([torch.randperm(len(Y), generator=gen)[: len(Y) // 2] for _ in range(n_subsets)])
    masks = torch.zeros(n_subsets, len(Y))
    masks.scatter_(1, subsets, 1.0)
    outs = torch.zeros(n_subsets, len(Yt))
    from torch.func import functional_call, vmap

    for seed in range(n_seeds):
        params, base = train_batched(X, Y, subsets, [1000 * seed + m for m in range(n_subsets)], epochs=epochs)
        logits = vmap(lambda p: functional_call(base, p, (Xt,)))(params)  # [M, Q, 10]
        outs += torch.stack([margin(lg, Yt) for lg in logits]) / n_seeds
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, masks=masks.numpy(), margins=outs.numpy())
    return masks, outs, time.perf_counter() - t0


def lds_ci(scores, masks, outputs, n_boot=1000, seed=0):
    """Mean LDS over queries and a bootstrap 95% interval (queries resampled)."""
    from lightning_sketch.attribution import lds

    per_q = lds(scores, masks, outputs).numpy()
    per_q = per_q[np.isfinite(per_q)]
    rng = np.random.default_rng(seed)
    boots = [per_q[rng.integers(0, len(per_q), len(per_q))].mean() for _ in range(n_boot)]
    return float(per_q.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


# ---------------------------------------------------------------------- our runs
def fit_run(seed, train, root: Path, epochs: int, callback_kw: dict | None, progress=False):
    """One Lightning run on the full training set; returns (module, seconds)."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_sketch.callbacks import GradientSketch
    from lightning_sketch.data import IndexedDataset

    seed_everything(seed, verbose=False)
    module = lightning_module(seed, epochs)
    loader = DataLoader(IndexedDataset(TensorDataset(*train)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    cbs = [GradientSketch(dirpath=str(root), **callback_kw)] if callback_kw is not None else []
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=progress, enable_checkpointing=False,
                      enable_model_summary=False, deterministic=True, default_root_dir=str(root), accelerator="cpu",
                      callbacks=cbs)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return module, time.perf_counter() - t0


def our_scores(runs, method, queries, damping=None, tune=None, **kw):
    """Scores [Q, 1000] averaged over the given runs [(run_dir, module)]."""
    from lightning_sketch.attribution import Attributor

    total, lams = 0, []
    for run_dir, module in runs:
        att = Attributor(run_dir, module, method=method, damping=damping, **kw)
        if method == "trak" and damping is None and tune is not None:
            lams.append(tune(att))
        s = att.scores(queries)
        assert att.ids.tolist() == list(range(1000))
        total = total + s
    return total / len(runs), lams


def auc(flipped, scores):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped.numpy(), scores.numpy()))


# ---------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--kind", default="affd")
    p.add_argument("--sketch-dim", type=int, default=1024)
    p.add_argument("--every-n-epochs", type=int, default=4)
    p.add_argument("--peers", default="traker,dattri,captum,kronfluence")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--peers-only", action="store_true",
                   help="train the runs without the callback (bit-identical weights) and score only the peers")
    p.add_argument("--dampings", default=None, help="comma-separated damping grid for the peers (default 1e-4..1e6)")
    p.add_argument("--overhead-only", action="store_true", help="only time the callback against a plain fit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small MLP)")
    a = p.parse_args(argv)
    if a.quick:
        a.subsets, a.seeds, a.epochs, a.runs, a.every_n_epochs = 20, 1, 4, 2, 2
    torch.set_num_threads(a.threads)
    if a.dampings:
        DAMPINGS[:] = [float(v) for v in a.dampings.split(",")]
    results: dict = {"config": vars(a)}
    train, query, val, _ = load_split()
    if a.overhead_only:
        results["overhead"] = overhead(a, train)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=float))
        return results
    both = (torch.cat([query[0], val[0]]), torch.cat([query[1], val[1]]))
    masks, margins, gt_s = ground_truth(train, both, a.subsets, a.seeds, a.epochs)
    gt_q, gt_v = margins[:, :200], margins[:, 200:]
    print(f"ground truth: {a.subsets} subsets x {a.seeds} seeds, {a.epochs} epochs "
          f"({'cached' if gt_s == 0 else f'{gt_s:.1f} s'})")
    qb, vb = dict_batch(*query), dict_batch(*val)
    work = Path(tempfile.mkdtemp(prefix="attr_digits_"))
    rows = []

    def report(name, models, scores_q, extra=""):
        m, lo, hi = lds_ci(scores_q, masks, gt_q)
        rows.append({"method": name, "models": models, "lds": m, "ci": [lo, hi], "note": extra})
        print(f"  {name:<38} models={models}  LDS {m:.3f} [{lo:.3f}, {hi:.3f}] {extra}")

    try:
        # ---- our 5 runs with the callback (checkpoint mode)
        cb_kw = dict(sketch_kind=a.kind, sketch_dim=a.sketch_dim, every_n_epochs=a.every_n_epochs)
        runs, fit_times = [], []
        for r in range(a.runs):
            module, secs = fit_run(r, train, work / f"run{r}", a.epochs, None if a.peers_only else cb_kw)
            module.eval()
            runs.append((work / f"run{r}", module))
            fit_times.append(secs)
        acc = [float((m(query[0]).argmax(1) == query[1]).float().mean()) for _, m in runs]
        print(f"trained {a.runs} runs with GradientSketch({a.kind}, D={a.sketch_dim}); query accuracy "
              f"{np.mean(acc):.3f}")
        results["query_accuracy"] = float(np.mean(acc))

        def lds_objective(s):
            return lds_ci(s, masks, gt_v, n_boot=1)[0]

        def tune(att):
            return att.tune_damping([vb], objective=lds_objective)

        print("LDS on the 200 queries (95% bootstrap interval):")
        for nm in () if a.peers_only else (1, a.runs):
            sub = runs[:nm]
            s, _ = our_scores(sub, "grad_dot", qb)
            report("ours grad_dot (last ckpt)", nm, s)
            s, _ = our_scores(sub, "tracin", qb)
            report("ours tracin (epoch ckpts)", nm, s)
            s, _ = our_scores(sub, "grad_cos", qb)
            report("ours grad_cos", nm, s)
            s, lams = our_scores(sub, "trak", qb, tune=tune)
            report("ours trak (λ tuned on val LDS)", nm, s, f"λ={np.mean(lams):.3g}")
            s, lams = our_scores(sub, "trak", qb, tune=lambda att: att.tune_damping())
            report("ours trak (λ auto, LOO proxy)", nm, s, f"λ={np.mean(lams):.3g}")
        try:
            if a.peers_only:
                raise RuntimeError("skipped (--peers-only)")
            s = arnoldi_scores(runs[:1], train, qb)
            report("ours arnoldi_if (top-k of ΦHΦᵀ)", 1, s)
        except Exception as err:  # report plainly, keep going
            print(f"  ours arnoldi_if: could not run ({type(err).__name__}: {err})")

        # ---- peers on the same final weights
        finals = [copy.deepcopy(m.net).eval() for _, m in runs]
        for peer in [x for x in a.peers.split(",") if x]:
            try:
                fn = getattr(sys.modules[__name__], f"peer_{peer}")
                for nm in sorted({1, a.runs}):
                    for name, s, note in fn(finals[:nm], train, query, val, masks, gt_v, a):
                        report(name, nm, s, note)
            except Exception as err:
                msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                print(f"  peer {peer}: could not run ({msg})")
                rows.append({"method": f"peer {peer}", "error": msg})
                traceback.print_exc(limit=2, file=sys.stderr)
        results["lds"] = rows
        if a.peers_only:
            return results

        # ---- mislabel detection (10% flipped labels), one run with the callback
        trn_f, _, _, flipped = load_split(flip=0.1)
        mod_f, _ = fit_run(0, trn_f, work / "flip", a.epochs, cb_kw)
        mod_f.eval()
        from lightning_sketch.attribution import Attributor

        aucs = {}
        for method in ("grad_dot", "tracin", "trak"):
            att = Attributor(work / "flip", mod_f, method=method)
            ids, si = att.self_influence()
            aucs[method] = auc(flipped[ids], si)
        print("mislabel detection AUC (10% flipped, self-influence): "
              + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
        results["mislabel_auc"] = aucs

        # ---- overhead of the callback against a plain fit (same seed, same data)
        t_plain = min(fit_run(0, train, work / "plain", a.epochs, None)[1] for _ in range(2))
        t_ckpt = fit_times[0]
        shutil.rmtree(work / "inline", ignore_errors=True)
        _, t_inline = fit_run(0, train, work / "inline", a.epochs,
                              dict(sketch_kind="per_layer", sketch_dim=a.sketch_dim, mode="inline"))
        shutil.rmtree(work / "inline2", ignore_errors=True)
        _, t_inline_affd = fit_run(0, train, work / "inline2", a.epochs,
                                   dict(sketch_kind=a.kind, sketch_dim=a.sketch_dim, mode="inline"))
        ov = {"checkpoint": t_ckpt / t_plain, "inline_per_layer": t_inline / t_plain,
              "inline_" + a.kind + "_fallback": t_inline_affd / t_plain}
        print("fit time ratio to a plain fit: " + ", ".join(f"{k} {v:.2f}x" for k, v in ov.items())
              + f"  (plain fit {t_plain:.2f} s)")
        results["overhead"] = ov

        # ---- bytes per example and query latency
        from lightning_sketch.store import SketchStore

        st = SketchStore.open(work / "run0" / "store")
        per_ex_ckpt = st.size_bytes / st.num_rows
        print(f"bytes stored per example per checkpoint: {per_ex_ckpt:.0f} (D={a.sketch_dim}, float32; "
              f"{len(st.checkpoints)} checkpoints)")
        results["bytes_per_example_per_checkpoint"] = per_ex_ckpt
        att = Attributor(work / "run0", runs[0][1], method="grad_dot")
        one = dict_batch(query[0][:1], query[1][:1])
        att.top_k(one, 10)
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            att.top_k(one, 10)
            lat.append(time.perf_counter() - t0)
        print(f"query latency (top-10, one query incl. its gradient sketch, flat index): "
              f"median {1000 * np.median(lat):.1f} ms")
        results["query_latency_ms"] = float(1000 * np.median(lat))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=float))
    return results


def overhead(a, train, repeats: int = 3):
    """Median-of-``repeats`` fit times: plain, checkpoint mode, inline per_layer, inline fallback."""
    work = Path(tempfile.mkdtemp(prefix="attr_overhead_"))
    configs = {
        "plain": None,
        "checkpoint": dict(sketch_kind=a.kind, sketch_dim=a.sketch_dim, every_n_epochs=a.every_n_epochs),
        "inline_per_layer": dict(sketch_kind="per_layer", sketch_dim=a.sketch_dim, mode="inline"),
        "inline_" + a.kind + "_fallback": dict(sketch_kind=a.kind, sketch_dim=a.sketch_dim, mode="inline"),
    }
    times = {k: [] for k in configs}
    try:
        fit_run(0, train, work / "warm", 1, configs["inline_per_layer"])  # imports and first-call costs
        for r in range(repeats):  # interleaved, so load changes on the shared machine hit all alike
            for name, kw in configs.items():
                shutil.rmtree(work / name, ignore_errors=True)
                times[name].append(fit_run(0, train, work / name, a.epochs, kw)[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in configs if k != "plain"}
    print("fit time ratio to a plain fit (median of %d, interleaved): " % repeats
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f"  (plain fit {med['plain']:.2f} s)")
    return ratios


def arnoldi_scores(runs, train, qb, k=50):
    from lightning_sketch.attribution import Attributor

    total = 0
    for run_dir, module in runs:
        probe = [dict_batch(train[0][i : i + 250], train[1][i : i + 250]) for i in range(0, 1000, 250)]
        att = Attributor(run_dir, module, method="arnoldi_if", hessian_batches=probe, arnoldi_k=k)
        total = total + att.scores(qb)
    return total / len(runs)


# ---------------------------------------------------------------------- peers
DAMPINGS = [10.0**e for e in range(-4, 7)]


def _best(cands, fn, masks, gt_v):
    """Evaluate fn(param) -> (val_scores, query_scores) for each candidate; keep the best val LDS."""
    best = None
    for c in cands:
        sv, sq = fn(c)
        v = lds_ci(sv, masks, gt_v, n_boot=1)[0]
        if best is None or v > best[0]:
            best = (v, c, sq)
    return best


def peer_traker(models, train, query, val, masks, gt_v, a):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    save = Path(tempfile.mkdtemp(prefix="traker_"))
    try:
        net = copy.deepcopy(models[0])
        n_params = sum(p.numel() for p in net.parameters())
        proj = BasicProjector(grad_dim=n_params, proj_dim=a.sketch_dim, seed=0, proj_type=ProjectionType.rademacher,
                              device="cpu", dtype=torch.float32)
        tk = TRAKer(model=net, task="image_classification", train_set_size=1000, projector=proj,
                    proj_dim=a.sketch_dim, save_dir=str(save), device="cpu", use_half_precision=False)
        for mid, m in enumerate(models):
            tk.load_checkpoint(m.state_dict(), model_id=mid)
            for i in range(0, 1000, 100):
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
                                                num_targets=200)
                    tk.score(batch=(xq, yq), num_samples=200)
                out[split] = torch.as_tensor(np.asarray(tk.finalize_scores(exp_name=name))).T.double()  # [Q, T]
            return out["v"], out["q"]

        v, lam, sq = _best(DAMPINGS, run, masks, gt_v)
        yield f"traker TRAK (k={a.sketch_dim}, λ tuned)", sq, f"λ={lam:.0e}"
        _, sq0 = run(0.0)
        yield f"traker TRAK (k={a.sketch_dim}, λ=0 default)", sq0, ""
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
            for lam in DAMPINGS:
                sa = ScoreArguments(damping_factor=lam)
                for split, (xq, yq) in (("v", val), ("q", query)):
                    name = f"s_{split}_{lam:g}".replace(".", "p").replace("-", "m")
                    an.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=TensorDataset(xq, yq),
                                               train_dataset=train_ds, per_device_query_batch_size=200,
                                               per_device_train_batch_size=250, score_args=sa, overwrite_output_dir=True)
                    s = an.load_pairwise_scores(name)["all_modules"].double()  # [Q, T]
                    # kronfluence scores are for the measurement's *increase* when up-weighting with the
                    # loss gradient sign: positive = helpful for the margin after negation (positive = including the example raises the query margin)
                    total.setdefault((split, lam), 0)
                    total[(split, lam)] = total[(split, lam)] - s / len(models)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    v, lam, sq = _best(DAMPINGS, lambda l: (total[("v", l)], total[("q", l)]), masks, gt_v)
    yield "kronfluence EK-FAC (λ tuned)", sq, f"λ={lam:.0e}"


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

    v, lam, sq = _best(DAMPINGS, run, masks, gt_v)
    yield f"dattri TRAK (k={a.sketch_dim}, λ tuned)", sq, f"λ={lam:.0e}"


if __name__ == "__main__":
    main()
