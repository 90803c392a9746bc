"""Inline GradientSketch under 2-process DDP (gloo, CPU) with a first step that overflows on rank 0 only.

    python ddp_overflow_run.py OUT_DIR

A stand-in for the 16-mixed GradScaler (scale 1) makes the callback treat non-finite rows as an
overflowing step. At step 0 rank 0's loss is infinite, rank 1's finite; the optimizer skips that
step on both ranks (as a GradScaler does after an overflow) by zeroing the gradients. The first-step
check of the rows against ``.grad`` runs collectives, so both ranks must put it off to step 1
together; a rank that entered it alone would wait forever. Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import Tiny, loader, trainer

from lightning_sketch.callbacks import GradientSketch


class UnitScaler:
    """What the callback reads of a GradScaler: its scale."""

    def get_scale(self) -> float:
        return 1.0


class ScaledSketch(GradientSketch):
    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self._mode_impl._scaler = UnitScaler()


class OverflowOnRank0(Tiny):
    def training_step(self, batch, batch_idx):
        loss = self.per_example_loss(batch).mean()
        if self.trainer.global_rank == 0 and batch_idx == 0:
            loss = loss * float("inf")
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        def closure():
            loss = optimizer_closure()
            if batch_idx == 0:  # the step a GradScaler skips: no change to the weights or momentum
                for p in self.parameters():
                    p.grad.zero_()
            return loss

        optimizer.step(closure=closure)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    cb = ScaledSketch(str(out / "attr"), mode="inline", sketch_dim=8, save_weights=False, curvature="none")
    t = trainer(out, [cb], max_steps=4, strategy="ddp", devices=2, use_distributed_sampler=True)
    t.fit(OverflowOnRank0(), loader(32, 4))
    (out / f"rank{t.global_rank}.json").write_text(json.dumps({
        "checked_sum": cb._mode_impl._checked_sum, "skipped_overflow_steps": cb.skipped_overflow_steps,
    }))
