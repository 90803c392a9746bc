"""Run the three callbacks under 2-process FSDP2 (ModelParallelStrategy + fully_shard, gloo, CPU).

    python fsdp_run.py OUT_DIR

The model is ``_common.Tiny`` in float64 with ``fully_shard`` applied in ``configure_model`` to both
linear layers and the root, so every parameter is a DTensor sharded over the 2 ranks (dimension 0 of
the [3, 12] weight does not split evenly). The data are ``_common.Data`` (global batch 8, rank r gets
ids r, r+2, ...), so ``ddp_run.main(out, 1)`` (one process, batch 8) trains on the same examples in
the same steps and is the reference.

Fit A: GradientSketch in checkpoint mode (affd) and in inline mode (per_layer, the hook fast path),
and HessianSpectrum twice (snapshots at steps 0 and 5): ``double_backward`` (k=4, as in
``ddp_run``) and ``fwd_rev`` (k=3). Fit B: IntrinsicDimension, which must be refused at setup.
Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _common import Data, Tiny, trainer
from ddp_run import GLOBAL_BATCH, SNAP_STEPS, CountingLoss
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)


class ShardedTiny(Tiny):
    """``Tiny`` with FSDP2 applied to each linear layer and to the root."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def strategy() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _spectrum(out: Path, method: str, k: int, counting: CountingLoss) -> HessianSpectrum:
    return HessianSpectrum(
        k=k, sketch_kind="affd", sketch_dim=32, seed=3, at_steps=SNAP_STEPS, every_n_steps=None,
        probe_batches=2, density=False, trace=False, plot=False, dirpath=str(out / f"spectrum_{method}"),
        budget=None,  # no time budget: every snapshot in full, comparable with the single-process run
        loss_fn=counting,
        numerics=SpectrumNumerics(tol=1e-8, hvp_method=method),
    )


def fit_a(out: Path) -> dict:
    counting = CountingLoss()
    spectra = {"double_backward": _spectrum(out, "double_backward", 4, counting),
               "fwd_rev": _spectrum(out, "fwd_rev", 3, CountingLoss())}
    ckpt_cb = GradientSketch(dirpath=str(out / "attr_ckpt"), sketch_kind="affd", sketch_dim=24, seed=1,
                             every_n_steps=3, save_weights=False)
    inline_cb = GradientSketch(dirpath=str(out / "attr_inline"), sketch_kind="per_layer", sketch_dim=40,
                               seed=2, mode="inline", save_weights=False)
    tr = trainer(out / "root_a", [*spectra.values(), ckpt_cb, inline_cb], max_epochs=2, devices=2,
                 strategy=strategy(), use_distributed_sampler=False)
    tr.fit(ShardedTiny(dtype=torch.float64), datamodule=Data(32, 16, GLOBAL_BATCH, torch.float64))
    return {
        "rank": tr.global_rank,
        "world": tr.world_size,
        "inline_fast": inline_cb._mode_impl._inline_fast,
        "loss_calls": counting.calls,
        "spectrum": {m: [{"step": e["step"], "eigenvalues": e["eigenvalues"]} for e in cb.history]
                     for m, cb in spectra.items()},
    }


def fit_b(out: Path) -> str:
    cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=64, seed=4, monitor="val_acc",
                            criteria=SearchCriteria(d_min=4, delta=0.5, target=1.5),
                            dirpath=str(out / "intrinsic"))
    tr = trainer(out / "root_b", [cb], max_steps=2, devices=2, strategy=strategy(),
                 use_distributed_sampler=False)
    try:
        tr.fit(ShardedTiny(dtype=torch.float64), datamodule=Data(32, 16, GLOBAL_BATCH, torch.float64))
    except Exception as err:  # noqa: BLE001 (recorded for the test)
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(out: Path) -> dict:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    result = fit_a(out)
    path = out / f"rank{result['rank']}.json"
    path.write_text(json.dumps(result))
    result["intrinsic"] = fit_b(out)  # last: on an error Lightning's rank 0 kills the other ranks
    path.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # after the refused fit B, gloo's threads can abort the interpreter's exit on a loaded machine
    # ("terminate called without an active exception"): both documents are written, so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
