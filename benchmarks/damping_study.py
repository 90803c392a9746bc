"""LDS against damping for ``trak`` and ``fisher_if``: where the optimum sits, and the automatic rule.

For each task of ``_attr_tasks`` (digits MLP, digits CNN) and sketch dimension D, trains 5 runs
with the callback's **defaults** (``GradientSketch(dirpath, sketch_kind="affd", sketch_dim=D)``:
a slice every epoch, sampled-label curvature on), then, through the public API only:

- the LDS-versus-ratio curve, ρ = λ / (tr(K)/T) over ``DAMPING_RATIO_GRID``, on the 200 queries,
  for 1 model (mean over the 5 single runs) and the 5-run ensemble (``Attributor([runs], model)``);
- the ratio a user with a ground truth would pick on the *validation* split
  (``tune_damping(objective=validation LDS)``) and its LDS on the queries;
- the default (``Attributor(run, model)``, no argument) and the automatic ratio of each method;

Run: ``python benchmarks/damping_study.py [--tasks digits_mlp,digits_cnn] [--dims 256,1024]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _attr_tasks as T  # noqa: E402

from lightning_sketch.attribution import DAMPING_RATIO_GRID, Attributor  # noqa: E402
from lightning_sketch.exceptions import StoreNotFoundError  # noqa: E402


def curve(att: Attributor, batch, masks, outputs) -> list[float]:
    """LDS on ``batch`` for every ratio of the grid, through ``tune_damping``'s objective hook."""
    values: list[float] = []

    def record(s):
        values.append(T.lds_ci(s, masks, outputs, n_boot=1)[0])
        return values[-1]

    att.tune_damping([batch], candidates=DAMPING_RATIO_GRID, objective=record)
    return values


CURVATURE = "auto"  # GradientSketch(curvature=...) of the runs; --curvature sets it


def _setup(task_name: str, D: int, n_runs: int, out: Path):
    """``(splits, ground truth, runs)``: n_runs default-callback runs of the task at D (reused if present)."""
    task = T.get_task(task_name)
    kw = {} if CURVATURE == "auto" else {"curvature": CURVATURE}
    folder = out / (f"{task_name}_D{D}" + ("" if CURVATURE == "auto" else f"_{CURVATURE}"))
    runs = T.fit_runs(task, n_runs, folder, callback_kwargs=kw, sketch_dim=D, reuse=True)
    return T.splits(task), T.ground_truth(task), runs


def study(task_name: str, D: int, n_runs: int, out: Path) -> dict:
    sp, gt, runs = _setup(task_name, D, n_runs, out)
    qb, vb = T.dict_batch(*sp.query), T.dict_batch(*sp.val)
    res: dict = {"task": task_name, "D": D, "grid": list(DAMPING_RATIO_GRID), "curvature": CURVATURE}
    default_att = Attributor(runs[0][0], runs[0][1])
    res["default_method"] = default_att.method
    res["default_lds_1"] = T.lds_ci(default_att.scores(qb), gt.masks, gt.query_outputs, n_boot=1)[0]
    for method in ("trak", "fisher_if"):
        try:
            Attributor(runs[0][0], runs[0][1], method=method)
        except StoreNotFoundError:  # fisher_if needs curvature="fisher" runs
            print(f"{task_name} D={D} {method}: not available on these runs (curvature={CURVATURE})")
            continue
        singles_q, singles_v = [], []
        for run_dir, module in runs:
            att = Attributor(run_dir, module, method=method)
            singles_q.append(curve(att, qb, gt.masks, gt.query_outputs))
            singles_v.append(curve(att, vb, gt.masks, gt.val_outputs))
        ens = Attributor([r for r, _ in runs], runs[0][1], method=method)
        ens_q = curve(ens, qb, gt.masks, gt.query_outputs)
        ens_v = curve(ens, vb, gt.masks, gt.val_outputs)
        auto_ratio = Attributor(runs[0][0], runs[0][1], method=method).damping_ratio  # the automatic ρ
        auto_i = int(np.argmin([abs(np.log10(g / auto_ratio)) for g in DAMPING_RATIO_GRID]))
        one_q, one_v = np.mean(singles_q, 0), np.mean(singles_v, 0)
        tuned1, tuned5 = int(np.argmax(one_v)), int(np.argmax(ens_v))
        res[method] = {
            "kernel": ens.kernel, "auto_ratio": auto_ratio,
            "curve_1": one_q.tolist(), "curve_5": list(ens_q),
            "auto_1": float(one_q[auto_i]), "auto_5": float(ens_q[auto_i]),
            "val_tuned_ratio_1": DAMPING_RATIO_GRID[tuned1], "val_tuned_1": float(one_q[tuned1]),
            "val_tuned_ratio_5": DAMPING_RATIO_GRID[tuned5], "val_tuned_5": float(ens_q[tuned5]),
            "best_1": float(one_q.max()), "best_5": float(max(ens_q)),
        }
        print(f"{task_name} D={D} {method:9s} [{ens.kernel} kernel] auto(ρ={auto_ratio:.3g}) 1: {one_q[auto_i]:.3f} 5: "
              f"{ens_q[auto_i]:.3f} | val-tuned 1: {one_q[tuned1]:.3f} (ρ={DAMPING_RATIO_GRID[tuned1]:.3g}) "
              f"5: {ens_q[tuned5]:.3f} (ρ={DAMPING_RATIO_GRID[tuned5]:.3g})", flush=True)
        print("   curve 1:", " ".join(f"{v:.3f}" for v in one_q), flush=True)
        print("   curve 5:", " ".join(f"{v:.3f}" for v in ens_q), flush=True)
    return res


def arnoldi_rows(task_name: str, D: int, n_runs: int, out: Path, k: int = 50, probe: int = 256,
                 split: str = "query", ranks: tuple[int | None, ...] = (50, 100, None)) -> dict:
    """Why ``arnoldi_if`` scores lower, and the λ-curves of ``fisher_if(rank=r)`` (on ``split``)."""
    sp, gt, runs = _setup(task_name, D, n_runs, out)
    qb = T.dict_batch(*(sp.query if split == "query" else sp.val))
    outputs = gt.query_outputs if split == "query" else gt.val_outputs
    probe_batch = T.dict_batch(sp.train[0][:probe], sp.train[1][:probe])
    rows: dict[str, list[float]] = {}

    def add(name, att):
        rows.setdefault(name, []).append(T.lds_ci(att.scores(qb), gt.masks, outputs, n_boot=1)[0])

    for run_dir, module in runs:
        fis = Attributor(run_dir, module, method="fisher_if")
        last = fis.checkpoints[-1]
        add("fisher_if, all slices (default)", fis)
        add("fisher_if, last slice", Attributor(run_dir, module, method="fisher_if", checkpoints=[last]))
        s, U, _ = Attributor(run_dir, module, method="fisher_if", checkpoints=[last])._engine._eigh(0, last)
        top = s.argsort(descending=True)[:k]
        add(f"arnoldi_if on the sampled Fisher, top {k}, last slice",
            Attributor(run_dir, module, method="arnoldi_if", eigenpairs=(s[top], U[:, top])))
        add(f"arnoldi_if on the Hessian (Lanczos, top {k}, {probe} probe examples), last slice",
            Attributor(run_dir, module, method="arnoldi_if", hessian_batches=[probe_batch], arnoldi_k=k))
        for rank in ranks:  # λ-sensitivity of projected top-r inverses against the full one
            att = Attributor(run_dir, module, method="fisher_if", rank=rank)
            rows.setdefault(f"curve fisher_if rank={rank}", []).append(curve(att, qb, gt.masks, outputs))
    for rank in [r for r in ranks if r is not None]:
        ens = Attributor([r for r, _ in runs], runs[0][1], method="fisher_if", rank=rank)
        rows[f"curve fisher_if rank={rank}, {n_runs}-run ensemble"] = [curve(ens, qb, gt.masks, outputs)]
    curves = {n: np.mean(v, 0).tolist() for n, v in rows.items() if n.startswith("curve")}
    for n, c in curves.items():
        print(f"{task_name} D={D} [{split}] {n} over ρ {' '.join(f'{g:.3g}' for g in DAMPING_RATIO_GRID)}:\n   "
              + " ".join(f"{v:.3f}" for v in c), flush=True)
    rows = {n: v for n, v in rows.items() if not n.startswith("curve")}
    res = {name: float(np.mean(v)) for name, v in rows.items()}
    res.update(curves)
    for name, v in rows.items():
        print(f"{task_name} D={D} {name:<72} LDS {np.mean(v):.3f} (mean of {n_runs} single runs)", flush=True)
    return res


def defaults(task_name: str, D: int, n_runs: int, out: Path) -> dict:
    """LDS of the defaults as a user gets them: ``Attributor(run, model)`` and the ``trak`` automatic ratio."""
    sp, gt, runs = _setup(task_name, D, n_runs, out)
    qb = T.dict_batch(*sp.query)
    res: dict = {"task": task_name, "D": D}
    for method in (None, "trak"):
        kw = {} if method is None else {"method": method}
        singles = [Attributor(r, m, **kw) for r, m in runs]
        one = [T.lds_ci(a.scores(qb), gt.masks, gt.query_outputs, n_boot=1)[0] for a in singles]
        ens = Attributor([r for r, _ in runs], runs[0][1], **kw)
        five = T.lds_ci(ens.scores(qb), gt.masks, gt.query_outputs)
        name = f"default ({singles[0].method})" if method is None else "trak, automatic damping"
        res[name] = {"lds_1": float(np.mean(one)), "lds_1_runs": one, "lds_5": five}
        print(f"{task_name} D={D} {name:<28} 1 model {np.mean(one):.3f} (runs {' '.join(f'{v:.3f}' for v in one)})"
              f"  {n_runs} models {five[0]:.3f} [{five[1]:.3f}, {five[2]:.3f}]", flush=True)
    return res


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="digits_mlp,digits_cnn")
    p.add_argument("--dims", default="256,1024")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(T.CACHE / "damping_study"))
    p.add_argument("--json", default=None)
    p.add_argument("--arnoldi", action="store_true", help="only the arnoldi_if diagnosis (reuses the runs)")
    p.add_argument("--defaults", action="store_true", help="only the defaults' LDS (reuses the runs)")
    p.add_argument("--split", choices=("query", "val"), default="query", help="--arnoldi: split scored")
    p.add_argument("--ranks", default="50,100,none", help="--arnoldi: ranks of the fisher_if λ-curves")
    p.add_argument("--curvature", default="auto", choices=("auto", "margin", "fisher", "none"),
                   help="GradientSketch(curvature=...) of the runs (auto: the callback's default)")
    a = p.parse_args(argv)
    global CURVATURE
    CURVATURE = a.curvature
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.arnoldi:
        ranks = tuple(None if r == "none" else int(r) for r in a.ranks.split(","))
        results = [arnoldi_rows(t, int(d), a.runs, Path(a.out), split=a.split, ranks=ranks)
                   for t in a.tasks.split(",") for d in a.dims.split(",")]
    else:
        fn = defaults if a.defaults else study
        results = [fn(t, int(d), a.runs, Path(a.out)) for t in a.tasks.split(",") for d in a.dims.split(",")]
    print(f"total {time.time() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
