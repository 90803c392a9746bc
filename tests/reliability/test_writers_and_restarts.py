"""Writers of a run directory (issue 11, findings 5, 6, 9, 10): one writer per directory for the
store and for each callback, a generation check before every publish, unique temporary files
never followed through symlinks, disk full as a typed error without debris, a clean restart after
a run that died before its first checkpoint, and ``hessian_eigs`` seeded through ``derive_seed``."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _common import Data, Tiny, loader, trainer  # tests/reliability/scripts is on pytest's pythonpath
from lightning.pytorch import Callback

from lightning_sketch.io import safeio as sio
from lightning_sketch.callbacks import GradientSketch, HessianSpectrum, IntrinsicDimension, SearchCriteria
from lightning_sketch.exceptions import StoreConflictError, StoreWriteError
from lightning_sketch.spectrum.snapshot import SnapshotWriter, load_index, load_snapshot
from lightning_sketch.store import SketchStore

SPEC = {"kind": "dense", "dim": 64, "sketch_dim": 4, "seed": 0}


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _no_debris(d: Path) -> None:
    assert not [p.name for p in d.rglob("*") if ".tmp" in p.name], list(d.rglob("*.tmp*"))


# ---------------------------------------------------------------------------- the store
@pytest.mark.parametrize("first", ["stale", "new"])
def test_deleting_the_store_lock_never_loses_committed_rows(tmp_path, first):
    path = tmp_path / "s"
    a = SketchStore.create(path, SPEC)
    a.add_checkpoint("c", step=0, lr=0.1)
    a.commit()
    (path / ".writer.lock").unlink()  # the finding: a second writer gets in
    b = SketchStore.open(path, mode="a")
    a.append([0, 1], _rows(2, 0), checkpoint="c")
    b.append([2, 3, 4], _rows(3, 1), checkpoint="c")
    if first == "new":
        b.commit()
    with pytest.raises(StoreConflictError, match="deleted or replaced"):
        a.commit()  # the writer whose lock was deleted never publishes again
    if first == "stale":
        b.commit()
    reread = SketchStore.open(path)
    reread.verify()
    assert reread.ids("c").tolist() == [2, 3, 4]  # b's committed rows are all there, nothing of a mixed in
    a.close(), b.close()
    _no_debris(path)


def test_generation_check_without_deleting_the_lock(tmp_path):
    """The lock file replaced (not deleted): the old holder sees it, and a moved generation alone also stops it."""
    path = tmp_path / "s"
    a = SketchStore.create(path, SPEC)
    a.add_checkpoint("c", step=0, lr=0.1)
    a.commit()
    os.replace(path / ".writer.lock", tmp_path / "old.lock")
    b = SketchStore.open(path, mode="a")
    b.append([5], _rows(1, 2), checkpoint="c")
    b.commit()
    a.append([0], _rows(1, 3), checkpoint="c")
    with pytest.raises(StoreConflictError):
        a.commit()
    assert SketchStore.open(path).ids("c").tolist() == [5]
    _no_debris(path)


@pytest.mark.slow  # whole training runs
def test_gradient_sketch_refuses_a_directory_another_writer_holds(tmp_path):
    from lightning_sketch.gradients import ParamLayout
    from lightning_sketch.sketches import make

    layout = ParamLayout.from_module(Tiny())
    held = SketchStore.create(tmp_path / "run" / "store", make("affd", layout.dim, 8, seed=0), layout=layout)
    held.add_checkpoint("other", step=0, lr=1.0)
    held.append([0], np.ones((1, 8), np.float32), checkpoint="other")
    held.commit()
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=8)
    with pytest.raises(StoreWriteError, match="writer lock"):
        trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(), loader(16, 8))
    held.append([1], np.ones((1, 8), np.float32), checkpoint="other")
    held.commit()
    held.close()
    assert sorted(SketchStore.open(tmp_path / "run" / "store").ids("other").tolist()) == [0, 1]


# ---------------------------------------------------------------------------- spectrum
def _snap(v: float) -> dict:
    return {"eigenvalues": torch.tensor([v, 1.0], dtype=torch.float64), "eigenvectors": torch.eye(2, 4)}


def test_two_spectrum_writers_never_mix_or_overwrite(tmp_path):
    a = SnapshotWriter(tmp_path)
    a.write(0, _snap(5.0), {})
    with pytest.raises(StoreWriteError, match="writer lock"):
        SnapshotWriter(tmp_path)
    (tmp_path / ".writer.lock").unlink()  # the finding: two runs into one directory
    b = SnapshotWriter(tmp_path)
    b.write(10, _snap(7.0), {})
    with pytest.raises(StoreConflictError):
        a.write(10, _snap(99.0), {})  # would have overwritten b's snapshot at step 10
    assert [e["step"] for e in load_index(tmp_path)] == [0, 10]
    assert load_snapshot(tmp_path / "step_00000010.npz")["eigenvalues"][0] == 7.0
    a.close(), b.close()
    _no_debris(tmp_path)


def _hs(d: Path) -> HessianSpectrum:
    return HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=8, at_steps=[0, 2], every_n_steps=None,
                           density=False, plot=False, probe_batches=1, dirpath=str(d), budget=None)


@pytest.mark.slow  # whole training runs
def test_hessian_spectrum_refuses_a_directory_another_run_writes(tmp_path):
    d = tmp_path / "spec"
    other = SnapshotWriter(d)
    other.write(0, _snap(5.0), {"by": "other"})
    with pytest.raises(StoreWriteError, match="writer lock"):
        trainer(tmp_path, [_hs(d)], max_steps=3).fit(Tiny(), loader(16, 8))
    other.write(2, _snap(6.0), {"by": "other"})
    other.close()
    assert [load_snapshot(d / e["file"])["meta"]["by"] for e in load_index(d)] == ["other", "other"]
    trainer(tmp_path, [_hs(d)], max_steps=3).fit(Tiny(), loader(16, 8))  # once released, a run may write
    assert [e["step"] for e in load_index(d)] == [0, 2]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow  # whole training runs
def test_disk_full_in_the_spectrum_callback_is_typed_and_leaves_no_debris(tmp_path, monkeypatch):
    d = tmp_path / "spec"
    trainer(tmp_path, [_hs(d)], max_steps=1).fit(Tiny(), loader(16, 8))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    monkeypatch.setattr(sio.os, "write", _enospc)
    with pytest.raises(StoreWriteError, match="disk full"):
        trainer(tmp_path, [_hs(d)], max_steps=3).fit(Tiny(), loader(16, 8))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the last good state, nothing added
    _no_debris(d)


# ---------------------------------------------------------------------------- intrinsic dimension
def _idim(d: Path) -> IntrinsicDimension:
    return IntrinsicDimension(sketch_kind="dense", sketch_dim=16, monitor="val_acc",
                              criteria=SearchCriteria(d_min=4, target=2.0), plot=False,
                              stop_when_done=False, dirpath=str(d))


def _fit_idim(root: Path, cb: IntrinsicDimension, steps: int = 4) -> None:
    trainer(root, [cb], max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None,
            num_sanity_val_steps=0).fit(Tiny(), datamodule=Data(16, 8))


@pytest.mark.slow  # whole training runs
def test_intrinsic_dimension_refuses_a_directory_another_run_writes(tmp_path):
    d = tmp_path / "idim"
    d.mkdir()
    other = sio.DirLock(d, ".intrinsic_dimension.lock")
    with pytest.raises(StoreWriteError, match="writer lock"):
        _fit_idim(tmp_path, _idim(d))
    other.release()
    cb = _idim(d)
    _fit_idim(tmp_path, cb)
    assert json.loads((d / "intrinsic_dimension.json").read_text())["history"] == cb.history


@pytest.mark.slow  # whole training runs
def test_intrinsic_dimension_stops_when_its_file_changes_behind_it(tmp_path):
    d = tmp_path / "idim"

    class Intruder(Callback):  # another run (lock deleted) rewrites the state file mid-fit
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                (d / ".intrinsic_dimension.lock").unlink(missing_ok=True)
                sio.write_checked_json(d / "intrinsic_dimension.json", {"by": "other run"})

    with pytest.raises(StoreConflictError):
        trainer(tmp_path, [_idim(d), Intruder()], max_steps=6, val_check_interval=2, check_val_every_n_epoch=None,
                num_sanity_val_steps=0).fit(Tiny(), datamodule=Data(16, 8))
    assert sio.load_checked_json(d / "intrinsic_dimension.json", what="state") == {"by": "other run"}


@pytest.mark.slow  # whole training runs
def test_planted_symlinks_are_replaced_never_written_through(tmp_path):
    d = tmp_path / "idim"
    d.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, d / "intrinsic_dimension.json.tmp")  # the old fixed temporary name
    os.symlink(victim, d / "intrinsic_dimension.json")
    os.symlink(victim, d / "intrinsic_dimension.png")
    cb = _idim(d)
    cb.plot = True
    _fit_idim(tmp_path, cb)
    assert victim.read_text() == "precious"
    assert not (d / "intrinsic_dimension.json").is_symlink() and not (d / "intrinsic_dimension.png").is_symlink()
    assert (d / "intrinsic_dimension.png").read_bytes()[:4] == b"\x89PNG"
    hs = _hs(tmp_path / "spec")
    hs.history = [{"step": 0, "eigenvalues": [2.0, 1.0], "file": None}]
    os.symlink(victim, tmp_path / "spectrum.png")
    hs.plot_history(tmp_path / "spectrum.png")
    assert victim.read_text() == "precious" and (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((d / "intrinsic_dimension.json").read_text())["history"] == cb.history


def test_disk_full_writing_json_state_is_typed_and_leaves_no_debris(tmp_path, monkeypatch):
    sio.write_checked_json(tmp_path / "state.json", {"v": 1})
    monkeypatch.setattr(sio.os, "write", _enospc)
    with pytest.raises(StoreWriteError, match="disk full"):
        sio.write_checked_json(tmp_path / "state.json", {"v": 2})
    monkeypatch.undo()
    assert sio.load_checked_json(tmp_path / "state.json", what="state") == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ---------------------------------------------------------------------------- restart after an early kill
class DieAt(Callback):
    """Raise at a step, before any Lightning checkpoint exists (as a kill would stop the run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def _gs(d: Path) -> GradientSketch:
    return GradientSketch(dirpath=str(d), sketch_kind="affd", sketch_dim=8, every_n_steps=2)


@pytest.mark.slow  # whole training runs
def test_restart_after_a_kill_before_the_first_checkpoint_discards_orphans(tmp_path):
    ref = _gs(tmp_path / "ref")
    trainer(tmp_path, [ref], max_steps=5).fit(Tiny(), loader(16, 8))
    killed = _gs(tmp_path / "run")
    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path, [killed, DieAt(3)], max_steps=5).fit(Tiny(), loader(16, 8))
    orphans = SketchStore.open(tmp_path / "run" / "store").num_rows
    assert orphans >= 16  # at least the slice at step 0 was committed before the kill
    with pytest.warns(UserWarning, match=f"discarded {orphans} orphan rows"):
        trainer(tmp_path, [_gs(tmp_path / "run")], max_steps=5).fit(Tiny(), loader(16, 8))
    a, b = SketchStore.open(tmp_path / "ref" / "store"), SketchStore.open(tmp_path / "run" / "store")
    assert a.checkpoints == b.checkpoints == ["step-2", "step-4"]
    for c in a.checkpoints:  # the restarted run equals an uninterrupted one
        assert np.array_equal(a.ids(c), b.ids(c)) and np.array_equal(np.asarray(a.vectors(c)), np.asarray(b.vectors(c)))
    # rows that a checkpoint (or a finished fit) references are never discarded: that still needs ckpt_path
    with pytest.raises(StoreWriteError, match="ckpt_path"):
        trainer(tmp_path, [_gs(tmp_path / "run")], max_steps=5).fit(Tiny(), loader(16, 8))


# ---------------------------------------------------------------------------- seeding (finding 10)
def test_hessian_eigs_start_vector_has_its_own_stream(monkeypatch):
    from lightning_sketch.sketches import derive_seed
    from lightning_sketch.spectrum import hessian

    seen = {}
    real = hessian.lanczos

    def spy(op, **kw):
        seen["seed"] = kw["generator"].initial_seed()
        seen["n"] = op.shape[0]
        return real(op, **kw)

    monkeypatch.setattr(hessian, "lanczos", spy)
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    hessian.hessian_eigs(model, loss, [batch], k=2, seed=5, num_iter=6)
    assert seen["seed"] == derive_seed(5, "hessian_eigs", "start") != 5
    start = torch.randn(seen["n"], generator=torch.Generator().manual_seed(seen["seed"]))
    torch.manual_seed(5)
    assert not torch.allclose(start, torch.randn(seen["n"]))  # no longer the user's own first draw


# ---------------------------------------------------------------------------- lock stolen right before a publish
def _steal_at(monkeypatch, prefix: str, thief) -> list:
    """Run ``thief()`` (another writer getting in) when the next temporary file named ``prefix...`` is
    created: after this writer's checks at the start of its write, before its rename."""
    real, done = sio.tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        if not done and str(kwargs.get("prefix", "")).startswith(prefix):
            done.append(True)
            thief()
        return real(*args, **kwargs)

    monkeypatch.setattr(sio.tempfile, "mkstemp", mkstemp)
    return done


def test_store_lock_stolen_between_segments_and_manifest(tmp_path, monkeypatch):
    path = tmp_path / "s"
    a = SketchStore.create(path, SPEC)
    a.add_checkpoint("c", step=0, lr=0.1)
    a.commit()

    def thief():
        (path / ".writer.lock").unlink()
        b = SketchStore.open(path, mode="a")
        b.append([7, 8], _rows(2, 5), checkpoint="c")
        b.commit()  # acknowledged
        b.close()

    a.append([0, 1], _rows(2, 0), checkpoint="c")
    stolen = _steal_at(monkeypatch, "manifest.json.tmp-", thief)
    with pytest.raises(StoreConflictError):
        a.commit()
    monkeypatch.undo()
    a.close()
    assert stolen
    reread = SketchStore.open(path)
    reread.verify()
    assert reread.ids("c").tolist() == [7, 8]
    _no_debris(path)


@pytest.mark.parametrize("prefix", ["step_00000004.npz.tmp-", "index.json.tmp-"])
def test_spectrum_lock_stolen_right_before_a_publish(tmp_path, monkeypatch, prefix):
    """The writer checked its lock before the snapshot; another writer gets in before the snapshot's or
    the index's rename: neither is published and the other writer's snapshot stays listed and intact."""
    a = SnapshotWriter(tmp_path)
    a.write(0, _snap(5.0), {})

    def thief():
        (tmp_path / ".writer.lock").unlink()
        b = SnapshotWriter(tmp_path)
        b.write(4, _snap(7.0), {})  # acknowledged
        b.close()

    stolen = _steal_at(monkeypatch, prefix, thief)
    with pytest.raises(StoreConflictError):
        a.write(4, _snap(99.0), {})
    monkeypatch.undo()
    a.close()
    assert stolen and [e["step"] for e in load_index(tmp_path)] == [0, 4]
    assert load_snapshot(tmp_path / "step_00000004.npz")["eigenvalues"][0] == 7.0
    _no_debris(tmp_path)


def test_intrinsic_state_lock_stolen_right_before_its_rename(tmp_path, monkeypatch):
    from types import SimpleNamespace

    d = tmp_path / "idim"
    d.mkdir()
    cb = _idim(d)
    cb._lock = sio.DirLock(d, ".intrinsic_dimension.lock")
    cb._seen = None
    state = d / "intrinsic_dimension.json"

    def thief():
        (d / ".intrinsic_dimension.lock").unlink()
        sio.write_checked_json(state, {"by": "other run"})  # acknowledged

    stolen = _steal_at(monkeypatch, "intrinsic_dimension.json.tmp-", thief)
    with pytest.raises(StoreConflictError):
        cb._write(SimpleNamespace(is_global_zero=True))
    monkeypatch.undo()
    cb._release()
    assert stolen and sio.load_checked_json(state, what="state") == {"by": "other run"}
    _no_debris(d)


def test_a_symlinked_folder_in_the_run_is_refused_for_writes(tmp_path):
    """Readers refuse files reached through a link; writers refuse to write through one, even a link that
    stays inside the run directory."""
    from lightning_sketch.exceptions import UnsafeFileError

    run = tmp_path / "run"
    store = SketchStore.create(run / "store", SPEC)
    store.add_checkpoint("c", step=0, lr=0.1)
    (run / "real").mkdir()
    os.symlink(run / "real", run / "weights")
    with pytest.raises(UnsafeFileError, match="symlink"):
        store.save_weights("c", {"w": torch.ones(2)}, run / "weights")
    assert list((run / "real").iterdir()) == []
    store.save_weights("c", {"w": torch.ones(2)}, run / "real")  # a real folder is fine
    store.commit()
    store.close()
