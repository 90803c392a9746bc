"""Run the three callbacks under 2-process DDP (gloo, CPU), or single-process as the reference.

    python ddp_run.py OUT_DIR DEVICES
    python ddp_run.py OUT_DIR 2 padded

Fit A (float64 model, 32 examples, 2 epochs): GradientSketch in checkpoint mode (affd) and in inline
mode (per_layer, the hook fast path) plus HessianSpectrum (affd, snapshots at steps 0 and 5). The
global batch is 8 in both runs: batch 8 on one process, batch 4 on each of 2 ranks (a
DistributedSampler with shuffle=False gives rank r the ids r, r+2, ..., so both runs train on the
same examples in the same steps; Lightning's own training sampler would shuffle, see ``_common.Data``).
Fit B: IntrinsicDimension (search mode, a target it cannot reach, so d doubles every round).
Fit C (``padded``, DDP only, a job of its own): inline GradientSketch with Lightning's padding
DistributedSampler (33 examples on 2 ranks): it must be refused at train start, before any training.
Rank 0 writes the error to ``OUT_DIR/padded.json`` and leaves with ``os._exit``: after a fit that
raised under DDP, the process group's gloo threads can abort the interpreter's exit ("terminate
called without an active exception", seen on a loaded 2-core CI machine), which says nothing about
the refusal under test.

Each rank writes ``OUT_DIR/rank<r>.json`` (spectrum history and loss-call counts, ω after every
validation, projection checksum, search history); rank 0 saves the weights at the snapshot steps to
``OUT_DIR/weights_step<s>.pt``. The script is also imported by the tests (``main(out, 1)``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _common import Data, Tiny, loader, trainer
from lightning.pytorch import Callback

from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)
from lightning_sketch.intrinsic import Subspace

SNAP_STEPS = [0, 5]
GLOBAL_BATCH = 8


class CountingLoss:
    """``loss_fn(module, batch)`` for HessianSpectrum that counts its calls (one per HVP per batch)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, batch):
        self.calls += 1
        return module.per_example_loss(batch)


class SaveWeights(Callback):
    """Rank 0 saves the parameters at the snapshot steps (before HessianSpectrum runs)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in SNAP_STEPS and trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                       self.out / f"weights_step{trainer.global_step}.pt")


class OmegaTrace(Callback):
    """Records ω and the active size after every validation (runs after IntrinsicDimension's hook)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        sub = Subspace.of(pl_module)
        if sub is not None and not trainer.sanity_checking:
            self.records.append({"step": trainer.global_step, "active": sub.active,
                                 "omega": sub.omega.detach().double().tolist()})


def fit_a(out: Path, devices: int) -> dict:
    kw = dict(max_epochs=2, devices=devices)
    if devices > 1:
        kw.update(strategy="ddp", use_distributed_sampler=False)
    counting = CountingLoss()
    spec_cb = HessianSpectrum(k=4, sketch_kind="affd", sketch_dim=32, seed=3, at_steps=SNAP_STEPS, every_n_steps=None,
                              probe_batches=2, density=False, trace=False, plot=False, dirpath=str(out / "spectrum"),
                              budget=None,  # no time budget: every rank runs every snapshot in full
                              loss_fn=counting,
                              # early stopping on, tight enough for the exact-eigenvalue check (rtol 1e-6)
                              numerics=SpectrumNumerics(tol=1e-8))
    ckpt_cb = GradientSketch(dirpath=str(out / "attr_ckpt"), sketch_kind="affd", sketch_dim=24, seed=1,
                             every_n_steps=3, save_weights=False)
    inline_cb = GradientSketch(dirpath=str(out / "attr_inline"), sketch_kind="per_layer", sketch_dim=40, seed=2,
                               mode="inline", save_weights=False)
    model = Tiny(dtype=torch.float64)
    tr = trainer(out / "root_a", [SaveWeights(out), spec_cb, ckpt_cb, inline_cb], **kw)
    tr.fit(model, datamodule=Data(32, 16, GLOBAL_BATCH, torch.float64))
    return {
        "rank": tr.global_rank,
        "world": tr.world_size,
        "inline_fast": inline_cb._mode_impl._inline_fast,
        "loss_calls": counting.calls,
        "spectrum": [{"step": e["step"], "eigenvalues": e["eigenvalues"], "matvecs": e["scalars"].get("matvecs")}
                     for e in spec_cb.history],
        "final": {k: v.tolist() for k, v in model.state_dict().items()},
    }


def fit_b(out: Path, devices: int) -> dict:
    kw = dict(max_steps=8, devices=devices, val_check_interval=2, check_val_every_n_epoch=None,
              num_sanity_val_steps=-1)
    if devices > 1:
        kw.update(strategy="ddp", use_distributed_sampler=False)
    cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=64, seed=4, monitor="val_acc",
                            criteria=SearchCriteria(d_min=4, delta=0.5, target=1.5),
                            dirpath=str(out / "intrinsic"), stop_when_done=False)
    trace = OmegaTrace()
    model = Tiny(dtype=torch.float64)
    tr = trainer(out / "root_b", [cb, trace], **kw)
    tr.fit(model, datamodule=Data(32, 16, GLOBAL_BATCH, torch.float64))
    return {"checksum": cb.subspace.projection_checksum(), "spec": cb.subspace.spec, "trace": trace.records,
            "history": cb.history, "status": cb.status}


def fit_c(out: Path) -> str:
    """Inline GradientSketch with Lightning's own DistributedSampler, which pads 33 examples to 34."""
    cb = GradientSketch(dirpath=str(out / "attr_padded"), sketch_kind="per_layer", sketch_dim=16, mode="inline")
    tr = trainer(out / "root_c", [cb], max_epochs=1, devices=2, strategy="ddp")
    try:
        tr.fit(Tiny(), loader(33, 4))
    except Exception as err:  # noqa: BLE001 (recorded for the test)
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(out: Path, devices: int) -> dict:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    result = fit_a(out, devices)
    result["intrinsic"] = fit_b(out, devices)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    return result


def padded(out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    error = fit_c(out)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
        (out / "padded.json").write_text(json.dumps({"error": error}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[3:] == ["padded"]:
        padded(Path(sys.argv[1]))
    main(Path(sys.argv[1]), int(sys.argv[2]))
