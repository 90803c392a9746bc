"""A training run that SIGKILLs itself at a chosen point while the callbacks write; also resumes.

    python kill_run.py ROOT MODE KILL        # KILL = "<where>:<step>", "none", or "resume"
    python kill_run.py fork DIR:MODE:KILL ...  # import once, fork one child per job, report statuses

MODE ``attr``: Tiny model, 32 unshuffled examples, batch 8, 3 epochs (12 steps), with
GradientSketch in checkpoint mode (affd, a slice every 2 steps), GradientSketch in inline mode
(per_layer hooks), HessianSpectrum (dense, snapshots at steps 0, 3, 6, 9, 12) and ModelCheckpoint
(every 4 training steps, ``last.ckpt``).
MODE ``intrinsic``: IntrinsicDimension in search mode, validation every 2 steps, 12 steps, a
checkpoint after every validation round.

Kill points (``os.kill(os.getpid(), SIGKILL)``: no ``finally``, no ``on_exception``, no flush):

- ``batch_end:s``: after the callbacks' ``on_train_batch_end`` at global step s (rows buffered);
- ``commit:s``: inside a store commit at step >= s, after the segment files were written and
  before the new manifest is published;
- ``ckpt:s``: inside the first Lightning checkpoint save at step >= s, after the callbacks saved
  their state (the store is committed) and before the checkpoint file is written;
- ``snapshot:s``: while the HessianSpectrum snapshot file of step >= s is half written;
- ``val_end:s``: after IntrinsicDimension's ``on_validation_end`` at step s (search state and JSON
  updated).

``main(root, mode, kill=None, resume=False)`` is imported by the tests for the uninterrupted run and
the resumed run (``resume=True`` continues from ``ROOT/ckpt/last.ckpt``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from _common import Data, Tiny, trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_sketch.spectrum.snapshot as snapshot_mod
import lightning_sketch.store.snapshot as store_snapshot
from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)

MAX_STEPS = 12


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """Kills the process at ``where``/``step`` (see the module docstring); arms the I/O patches."""

    def __init__(self, where: str, step: int) -> None:
        self.where, self.step, self.current = where, step, -1
        if where == "commit":
            original = store_snapshot.write_json_atomic

            def write_json_atomic(path, obj, **kw):
                if self.current >= self.step:
                    die()
                return original(path, obj, **kw)

            store_snapshot.write_json_atomic = write_json_atomic
        elif where == "snapshot":
            original_write = snapshot_mod.sio.atomic_write

            def atomic_write(path, chunks, **kw):
                if self.current >= self.step and str(path).endswith(".npz"):
                    data = b"".join(bytes(c) for c in chunks)  # the temporary file half written, then killed
                    with open(Path(path).with_name(Path(path).name + f".tmp-{os.getpid()}"), "wb") as fh:
                        fh.write(data[: len(data) // 2])
                        fh.flush()
                    die()
                return original_write(path, chunks, **kw)

            snapshot_mod.sio.atomic_write = atomic_write

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.current = trainer.global_step
        if self.where == "batch_end" and trainer.global_step == self.step:
            die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.where == "ckpt" and trainer.global_step >= self.step:
            die()

    def on_validation_end(self, trainer, pl_module):
        if self.where == "val_end" and trainer.global_step == self.step and not trainer.sanity_checking:
            die()


def callbacks(root: Path, mode: str) -> list:
    if mode == "attr":
        return [
            GradientSketch(dirpath=str(root / "attr_ckpt"), sketch_kind="affd", sketch_dim=16, seed=1, every_n_steps=2),
            GradientSketch(dirpath=str(root / "attr_inline"), sketch_kind="per_layer", sketch_dim=24, seed=2,
                           mode="inline", save_weights=False),
            HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=16, seed=3, at_steps=[0, 3, 6, 9, 12],
                            every_n_steps=None, numerics=SpectrumNumerics(num_iter=8), probe_batches=1,
                            density=False, plot=False, dirpath=str(root / "spectrum"),
                            budget=None),  # every snapshot in full: a resumed run must equal the reference
        ]
    return [IntrinsicDimension(sketch_kind="affd", sketch_dim=64, seed=4, monitor="val_acc",
                               criteria=SearchCriteria(d_min=4, delta=0.05, target=1.5),
                               dirpath=str(root / "intrinsic"), stop_when_done=False)]


def main(root: Path, mode: str, kill: str | None = None, resume: bool = False) -> dict:
    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    cbs = callbacks(root, mode)
    if kill:
        where, step = kill.split(":")
        cbs.append(KillAt(where, int(step)))
    kw = dict(max_steps=MAX_STEPS, enable_checkpointing=True)
    if mode == "intrinsic":
        # Checkpoints after each validation round (ModelCheckpoint's hook runs after the other
        # callbacks'): a checkpoint saved at on_train_batch_end of a step whose validation has not
        # run yet would resume without that round (Lightning does not replay it).
        cbs.append(ModelCheckpoint(dirpath=root / "ckpt", save_on_train_epoch_end=False, save_last=True, save_top_k=-1))
        kw.update(val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=-1)
    else:
        cbs.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1))
        kw.update(limit_val_batches=0)
    tr = trainer(root / "lightning", cbs, **kw)
    model = Tiny()
    tr.fit(model, datamodule=Data(32, 16, 8), ckpt_path=str(root / "ckpt" / "last.ckpt") if resume else None)
    result = {"params": {k: v.tolist() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()}}
    if mode == "attr":
        spec = cbs[2]
        result["spectrum"] = [{"step": e["step"], "eigenvalues": e["eigenvalues"]} for e in spec.history]
        result["skipped"] = [cbs[0].skipped_nonfinite, cbs[1].skipped_nonfinite]
    else:
        cb = cbs[0]
        result["intrinsic"] = {"history": cb.history, "active": cb.active, "status": cb.status,
                               "omega": cb.subspace.omega.detach().tolist(),
                               "search": cb.search.state_dict() if cb.search is not None else None}
    (root / "result.json").write_text(json.dumps(result))
    return result


def fork_all(jobs: list[str]) -> dict[str, int]:
    """Fork one child per ``DIR:MODE:WHERE:STEP`` job (the imports are paid once); return their exit statuses.

    A child that dies by SIGKILL reports ``-9``; one that exits reports its exit code. Nothing
    computes in the parent before the forks, so the children start from a clean torch state.
    """
    pids = {}
    for job in jobs:
        root, mode, kill = job.split(":", 2)
        pid = os.fork()
        if pid == 0:
            try:
                main(Path(root), mode, kill)
            finally:
                os._exit(3)  # reaching here means the kill point was never hit
        pids[job] = pid
    status = {}
    for job, pid in pids.items():
        _, code = os.waitpid(pid, 0)
        status[job] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
    return status


if __name__ == "__main__":
    if sys.argv[1] == "fork":
        print(json.dumps(fork_all(sys.argv[2:])))
        sys.exit(0)
    kill_arg = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] not in ("none", "resume") else None
    main(Path(sys.argv[1]), sys.argv[2], kill_arg, resume=sys.argv[3:4] == ["resume"])
