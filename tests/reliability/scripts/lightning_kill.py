"""Lightning-level SIGKILL sweep: a training run killed at the N-th event of one kind, then continued.

    python lightning_kill.py fork DIR:CONFIG:KIND:N ...  # fork one child per job (imports paid once)

A CONFIG is ``<callbacks>-<schedule>``:

- callbacks ``ckpt``: GradientSketch(mode="checkpoint", a slice every 2 steps, weights, curvature)
  with HessianSpectrum (snapshots at steps 0, 3, 6, 9, 12); ``inline``: GradientSketch(mode="inline")
  with HessianSpectrum; ``intrinsic``: IntrinsicDimension in search mode (validation every 2 steps);
- schedule ``epoch``: a Lightning checkpoint at every epoch end; ``mid``: one every 3 training steps
  (4 steps per epoch, so most are mid-epoch) with a train loader Lightning can resume mid-epoch
  (:class:`ResumableLoader`); ``midplain``: every 3 steps with a plain ``DataLoader``, which
  Lightning re-iterates from its first batch when it resumes mid-epoch.

Kill events (``os.kill(os.getpid(), SIGKILL)``: no ``finally``, no ``on_exception``, no flush), the N-th
occurrence of KIND:

- ``batch_start``, ``batch_end``, ``epoch_end``, ``val_end``: after every callback's hook;
- ``save_before``: inside a Lightning checkpoint save, before the library callbacks' ``on_save_checkpoint``;
- ``save_after``: after them, before Lightning writes the checkpoint file;
- ``publish``: inside a store commit, segment files written, manifest not yet published;
- ``tmp``: inside any atomic write of the library (store, weights, curvature, spectrum, intrinsic
  state), the temporary file written and before its rename (it is left behind).

:func:`run` returns the run's outcome (final store rows per slice, spectrum index, intrinsic history)
and, with ``count=True``, how many events of each kind it saw (an uninterrupted run's counts are the
range the sweep draws N from). :func:`continue_run` is what a user does after a kill: resume from
``ckpt/last.ckpt`` when it exists, else start the fit afresh.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Tiny, dataset, trainer
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_sketch.io.safeio as sio
import lightning_sketch.store.snapshot as store_snapshot
from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)

MAX_STEPS = 12
KINDS = ("batch_start", "batch_end", "epoch_end", "val_end", "save_before", "save_after", "publish", "tmp")
CONFIGS = tuple(f"{c}-{s}" for c in ("ckpt", "inline", "intrinsic") for s in ("epoch", "mid", "midplain"))


class ResumableLoader(DataLoader):
    """An unshuffled DataLoader that Lightning resumes mid-epoch: its state is the number of batches
    the trainer has taken from it in the current epoch, and after ``load_state_dict`` the next
    iteration skips those (Lightning's fetcher prefetches a batch, so the loader's own count would
    be one ahead)."""

    trainer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"ready": int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["ready"]) % len(self)

    def __iter__(self):  # type: ignore[override]
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(it)
        return it


class Data(LightningDataModule):
    def __init__(self, resumable: bool) -> None:
        super().__init__()
        self.resumable = resumable

    def train_dataloader(self) -> DataLoader:
        if not self.resumable:
            return DataLoader(dataset(32, 1), batch_size=8, shuffle=False)
        loader = ResumableLoader(dataset(32, 1), batch_size=8, shuffle=False)
        loader.trainer = self.trainer
        return loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(16, 2), batch_size=8, shuffle=False)


class Events:
    """Counts events; SIGKILLs the process at the ``n``-th one of ``kind``; arms the I/O patches."""

    def __init__(self, kind: str | None, n: int) -> None:
        self.kind, self.n, self.counts = kind, n, Counter()
        original_json = store_snapshot.write_json_atomic

        def write_json_atomic(path, obj, **kw):
            if Path(path).name == "manifest.json" and Path(path).exists():
                self.hit("publish")
            return original_json(path, obj, **kw)

        store_snapshot.write_json_atomic = write_json_atomic
        real_os = os
        proxy = types.ModuleType("os_proxy")
        proxy.__dict__.update(real_os.__dict__)

        def replace(src, dst, *a, **kw):  # sio.atomic_write's rename of its mkstemp file
            if ".tmp-" in os.fspath(src):
                self.hit("tmp")
            return real_os.replace(src, dst, *a, **kw)

        proxy.replace = replace
        sio.os = proxy  # only the library's atomic writes go through it

    def hit(self, kind: str) -> None:
        self.counts[kind] += 1
        if kind == self.kind and self.counts[kind] == self.n:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class Hooks(Callback):
    """Reports hook events to ``events``; ``first`` is placed before the library callbacks, else after."""

    def __init__(self, events: Events, first: bool) -> None:
        self.events, self.first = events, first

    @property
    def state_key(self) -> str:
        return f"Hooks{{first={self.first}}}"

    def on_train_batch_start(self, trainer, *args):
        if not self.first:
            self.events.hit("batch_start")

    def on_train_batch_end(self, trainer, *args):
        if not self.first:
            self.events.hit("batch_end")

    def on_train_epoch_end(self, trainer, *args):
        if not self.first:
            self.events.hit("epoch_end")

    def on_validation_end(self, trainer, *args):
        if not self.first and not trainer.sanity_checking:
            self.events.hit("val_end")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.events.hit("save_before" if self.first else "save_after")


def callbacks(root: Path, which: str) -> list:
    if which == "intrinsic":
        return [IntrinsicDimension(sketch_kind="affd", sketch_dim=64, seed=4, monitor="val_acc",
                                   criteria=SearchCriteria(d_min=4, delta=0.05, target=1.5),
                                   dirpath=str(root / "intrinsic"), stop_when_done=False)]
    if which == "ckpt":
        gs = GradientSketch(dirpath=str(root / "gs"), sketch_kind="affd", sketch_dim=16, seed=1,
                            every_n_steps=2)
    else:
        gs = GradientSketch(dirpath=str(root / "gs"), sketch_kind="per_layer", sketch_dim=24, seed=2,
                            mode="inline")
    return [gs, HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=16, seed=3, at_steps=[0, 3, 6, 9, 12],
                                every_n_steps=None, numerics=SpectrumNumerics(num_iter=8), probe_batches=1,
                                density=False, plot=False, dirpath=str(root / "spectrum"),
                                budget=None)]  # every snapshot in full: a resumed run must equal the reference


def run(root: Path, config: str, kill: tuple[str, int] | None = None, resume_from: Path | None = None,
        count: bool = False) -> dict[str, Any]:
    """One fit of ``config`` in ``root`` (see the module docstring); SIGKILLed at ``kill``."""
    torch.set_num_threads(1)
    which, schedule = config.split("-")
    root.mkdir(parents=True, exist_ok=True)
    events = Events(*(kill or (None, 0)))
    cbs = [Hooks(events, first=True), *callbacks(root, which), Hooks(events, first=False)]
    if schedule == "epoch":
        cbs.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1,
                                   save_on_train_epoch_end=True))
    else:
        cbs.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1,
                                   every_n_train_steps=3))
    kw: dict[str, Any] = dict(max_steps=MAX_STEPS, enable_checkpointing=True)
    if which == "intrinsic":
        kw.update(val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=-1)
    else:
        kw.update(limit_val_batches=0)
    tr = trainer(root / "lightning", cbs, **kw)
    tr.fit(Tiny(), datamodule=Data(resumable=schedule == "mid"),
           ckpt_path=None if resume_from is None else str(resume_from))
    out = outcome(root, which)
    if count:
        out["counts"] = dict(events.counts)
    return out


def latest_checkpoint(root: Path) -> Path | None:
    """``ckpt/last.ckpt``, else the checkpoint of the highest step (a kill can land between the two saves)."""
    if (root / "ckpt" / "last.ckpt").exists():
        return root / "ckpt" / "last.ckpt"
    saved = sorted(root.glob("ckpt/epoch=*-step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    return saved[-1] if saved else None


def acknowledged(root: Path, ckpt: Path | None) -> dict[str, dict[int, list[float]]]:
    """Rows the store committed at or before the generation ``ckpt`` records (none without a checkpoint)."""
    if ckpt is None or not (root / "gs" / "store" / "manifest.json").exists():
        return {}
    state = next((v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                  if k.startswith("GradientSketch")), None)
    if state is None or state["generation"] is None:
        return {}
    manifest = json.loads((root / "gs" / "store" / "manifest.json").read_text())
    rows: dict[str, dict[int, list[float]]] = {}
    for seg in manifest["segments"]:
        if seg["generation"] <= state["generation"]:
            ids = np.load(root / "gs" / "store" / seg["ids"]["file"])
            vec = np.load(root / "gs" / "store" / seg["vectors"]["file"])
            rows.setdefault(seg["checkpoint"], {}).update(zip(ids.tolist(), vec.tolist()))
    return rows


def continue_run(root: Path, config: str) -> dict[str, Any]:
    """What a user does after the kill: resume from the latest checkpoint when there is one, else fit
    afresh. The outcome also holds the rows the resumed checkpoint acknowledged (``acked``)."""
    ckpt = latest_checkpoint(root)
    acked = acknowledged(root, ckpt)
    out = run(root, config, resume_from=ckpt)
    out["acked"] = {k: [[i, r] for i, r in v.items()] for k, v in acked.items()}
    out["resumed"] = ckpt is not None
    return out


def outcome(root: Path, which: str) -> dict[str, Any]:
    """The run's written results: store rows per slice, spectrum index, intrinsic history; temp files."""
    from lightning_sketch.spectrum import load_index
    from lightning_sketch.store import SketchStore

    out: dict[str, Any] = {"tmp_files": sorted(str(p.relative_to(root)) for p in root.rglob("*")
                                               if ".tmp-" in p.name)}
    if which == "intrinsic":
        state = json.loads((root / "intrinsic" / "intrinsic_dimension.json").read_text())
        out["history"] = state["history"]
        return out
    store = SketchStore.open(root / "gs" / "store", verify="full")
    store.verify()
    out["slices"] = {c: {"ids": store.ids(c).tolist(), "rows": np.asarray(store.vectors(c)).tolist(),
                         "skipped_duplicates": store.checkpoint_info(c)["skipped_duplicates"]}
                     for c in store.checkpoints}
    out["spectrum"] = [{"step": e["step"], "sha256": e["sha256"]} for e in load_index(root / "spectrum")]
    return out


def compare(got: dict[str, Any], want: dict[str, Any], exact: bool, atol: float = 1e-5) -> dict[str, int]:
    """What a continued run ``got`` lost or duplicated.

    ``lost``: acknowledged rows (committed at or before the resumed checkpoint's generation) missing
    from the final store or changed in it; ``duplicated``: ids stored twice in a slice; ``tmp_files``:
    temporary files left in the run directory. With ``exact`` (a run Lightning resumes exactly), also
    the rows (``ref_lost``, ``different``), slices, spectrum steps and search history (``other``)
    against the uninterrupted run ``want``.
    """
    res = {"lost": 0, "duplicated": 0, "ref_lost": 0, "different": 0, "other": 0,
           "tmp_files": len(got["tmp_files"])}
    for name, acked in got.get("acked", {}).items():
        mine = got["slices"].get(name, {"ids": [], "rows": []})
        rows = dict(zip(mine["ids"], mine["rows"]))
        res["lost"] += sum(i not in rows or not np.array_equal(rows[i], r) for i, r in acked)
    for s in got.get("slices", {}).values():
        res["duplicated"] += len(s["ids"]) - len(set(s["ids"]))
    if not exact:
        return res
    if "history" in want:
        res["other"] += int(got["history"] != want["history"])
        return res
    for name, ref in want["slices"].items():
        mine = got["slices"].get(name, {"ids": [], "rows": []})
        ids, ref_ids = mine["ids"], ref["ids"]
        res["ref_lost"] += len(set(ref_ids) - set(ids))
        rows = dict(zip(ids, mine["rows"]))
        res["different"] += sum(not np.allclose(rows[i], r, atol=atol, rtol=1e-4)
                                for i, r in zip(ref_ids, ref["rows"]) if i in rows)
    res["other"] += int(sorted(got["slices"]) != sorted(want["slices"]))
    res["other"] += int([e["step"] for e in got["spectrum"]] != [e["step"] for e in want["spectrum"]])
    return res


def fork_all(jobs: list[str]) -> dict[str, Any]:
    """Fork a child per ``DIR:CONFIG:KIND:N`` job; each is killed, then continued in a second child.

    Returns per job the killed child's exit status (``-9`` when the kill landed), the continued
    child's exit status and, when it succeeded, its outcome (``DIR/continued.json``).
    """
    status: dict[str, Any] = {}
    for job in jobs:
        root, config, kind, n = job.split(":")
        res: dict[str, Any] = {}
        for phase in ("killed", "continued"):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    if phase == "killed":
                        run(Path(root), config, (kind, int(n)))
                    else:
                        out = continue_run(Path(root), config)
                        (Path(root) / "continued.json").write_text(json.dumps(out))
                except BaseException as err:  # reported to the parent, which tells the test
                    (Path(root) / f"{phase}.error").write_text(f"{type(err).__name__}: {err}")
                    code = 4
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            _, code = os.waitpid(pid, 0)
            res[phase] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
        status[job] = res
    return status


if __name__ == "__main__":
    if sys.argv[1] == "fork":
        print(json.dumps(fork_all(sys.argv[2:])))
    elif sys.argv[1] == "ref":  # python lightning_kill.py ref DIR CONFIG: an uninterrupted run with counts
        print(json.dumps(run(Path(sys.argv[2]), sys.argv[3], count=True)))
