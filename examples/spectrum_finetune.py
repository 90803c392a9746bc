"""Track the Hessian spectrum while training the digits MLP, then save the trajectory plot.

Trains the bundled digits classifier (64 -> 128 -> 10, N = 9,610 parameters) for 300 SGD steps
with :class:`~lightning_sketch.callbacks.HessianSpectrum`: at the paper's steps {0, 10, 50, 100,
150, 200, 250} and every 100 steps, Lanczos with full re-orthogonalisation runs on the sketched
operator v ↦ Φ H Φᵀ v (AFFD, D = 1024) over a fixed probe set of 256 training images. It prints
the top eigenvalues, RNEG, the outlier count and the gradient–outlier alignment per snapshot,
and writes ``spectrum.png`` (trajectories and SLQ densities) beside the snapshot files.

Run (about 1-3 minutes on 2 CPU cores)::

    .venv/bin/python examples/spectrum_finetune.py [--out runs/spectrum_example] [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch

from lightning_sketch.callbacks import HessianSpectrum, SpectrumNumerics
from lightning_sketch.demo import DigitsClassifier, DigitsDataModule
from lightning_sketch.spectrum import load_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/spectrum_example")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()
    spectrum = HessianSpectrum(
        k=10, sketch_kind="affd", sketch_dim=1024, seed=0, every_n_steps=100, probe_batches=4, density=True,
        trace=True, numerics=SpectrumNumerics(num_iter=30, density_runs=2, density_iter=20, trace_matvecs=12),
    )
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", default_root_dir=args.out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[spectrum], limit_val_batches=0,
    )
    trainer.fit(DigitsClassifier(hidden=128, lr=0.05), DigitsDataModule(batch_size=64, n_train=1000))
    print(f"{'step':>5} {'λ1':>8} {'λ2':>8} {'λ10':>8} {'RNEG':>6} {'outl.':>5} {'align':>6} {'trace':>8} {'HVPs':>5}")
    for entry in spectrum.history:
        ev, sc = entry["eigenvalues"], entry["scalars"]
        print(f"{entry['step']:5d} {ev[0]:8.3f} {ev[1]:8.3f} {ev[-1]:8.3f} {sc['rneg']:6.3f} "
              f"{int(sc['outliers']):5d} {sc['alignment']:6.2f} {sc['trace']:8.2f} {int(sc['matvecs']):5d}")
    print(f"{len(load_index(spectrum._dir))} snapshots in {spectrum._dir}; plot: {spectrum._dir / 'spectrum.png'}")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
