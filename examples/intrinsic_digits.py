"""Intrinsic dimension of the digits MLP with the paper's single-run doubling search (arXiv 2402.03994, Listing 9).

Three Lightning runs on the bundled digits (a few minutes on 2 CPU cores):

1. the reference: ordinary full training, its validation accuracy (``measure_reference_score``);
2. the search: ``IntrinsicDimension`` reparametrises the model as θ = θ0 + Φᵀω (AFFD, D_max = 4096)
   and doubles the active size d whenever a round of ``c`` steps gains less than ``delta``, until
   the validation accuracy reaches 90% of the reference: D*;
3. the verification run at D*/2 (fixed mode, as many steps as the search took): if it misses the
   target, D_int lies in (D*/2, D*].

It prints D* and saves ``intrinsic_curve.png`` (accuracy against steps, coloured by d, and the best
accuracy reached at each d) and the callback's ``intrinsic_dimension.json`` under ``--out``.
The same search runs through the CLI: ``lightning-sketch fit --config configs/intrinsic.yaml``.

Usage:
    python examples/intrinsic_digits.py [--out runs/intrinsic_digits] [--sketch-kind qk]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_sketch.callbacks import IntrinsicDimension, SearchCriteria
from lightning_sketch.callbacks.intrinsic_dimension import measure_reference_score
from lightning_sketch.demo import DigitsClassifier, DigitsDataModule
from lightning_sketch.report.plots import plot_search


def trainer(out: Path, max_steps: int, callbacks: list, c: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, max_epochs=-1, val_check_interval=c, check_val_every_n_epoch=None,
        num_sanity_val_steps=-1, logger=pl.loggers.CSVLogger(out, name="logs"), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, accelerator="cpu", default_root_dir=out,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/intrinsic_digits")
    p.add_argument("--sketch-kind", default="qk")
    p.add_argument("--sketch-dim", type=int, default=4096)
    p.add_argument("--d-min", type=int, default=16)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--c", type=int, default=50, help="steps per round (validation every c steps)")
    p.add_argument("--full-steps", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    pl.seed_everything(0, verbose=False)

    ref = measure_reference_score(
        trainer(out / "reference", args.full_steps, [], args.c), DigitsClassifier(), monitor="val_acc",
        datamodule=DigitsDataModule(),
    )
    print(f"reference (full training, {args.full_steps} steps): val_acc = {ref:.3f}")

    pl.seed_everything(0, verbose=False)
    search = IntrinsicDimension(
        sketch_kind=args.sketch_kind, sketch_dim=args.sketch_dim, seed=0, mode="search", monitor="val_acc",
        criteria=SearchCriteria(d_min=args.d_min, delta=args.delta, reference_score=ref, target_fraction=0.9),
        dirpath=str(out / "search"),
    )
    t = trainer(out / "search", args.max_steps, [search], args.c)
    t.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    steps = t.global_step
    print(f"search: status={search.status}, D* = {search.d_star}, {steps} steps "
          f"({steps / args.full_steps:.2f}x one full training), target {search.target:.3f}")

    verify = None
    if search.d_star and search.d_star >= 2:
        pl.seed_everything(0, verbose=False)
        check = IntrinsicDimension(
            sketch_kind=args.sketch_kind, sketch_dim=args.sketch_dim, seed=0, mode="fixed", d=search.d_star // 2,
            monitor="val_acc", criteria=SearchCriteria(target=search.target), dirpath=str(out / "verify"),
        )
        trainer(out / "verify", steps, [check], args.c).fit(DigitsClassifier(), datamodule=DigitsDataModule())
        best = max(h["metric"] for h in check.history)
        verify = {"d": search.d_star // 2, "metric": best, "reached": bool(check.reached)}
        verdict = "reached: D_int <= D*/2" if check.reached else "missed: D_int in (D*/2, D*]"
        print(f"verification at d = {search.d_star // 2}: best val_acc {best:.3f} -> target {verdict}")

    plot_search(search.history, search.target, out / "intrinsic_curve.png", verify=verify)
    (out / "summary.json").write_text(json.dumps({"reference": ref, "search": search.summary(), "verify": verify}, indent=1))
    print(f"saved {out / 'intrinsic_curve.png'} and {out / 'search' / 'intrinsic_dimension.json'}")


if __name__ == "__main__":
    main()
