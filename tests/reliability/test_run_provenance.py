"""Files from another run or an older generation, and damaged checkpoints.

Every file a writer publishes records its ``run_id``; the Lightning checkpoint records the run id and
generation of the store and of the spectrum index it was saved with, and the digest of its weights and
optimizer states. A resume and the CLI's checkpoint loader refuse an intact but older or foreign
directory, and a damaged checkpoint, with typed errors before any training step or answer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _common import Tiny, loader, trainer  # tests/reliability/scripts is on pytest's pythonpath
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sketch.io import safeio as sio
from lightning_sketch.callbacks import GradientSketch, HessianSpectrum
from lightning_sketch.cli.commands import _check_runs, load_checkpoint_into
from lightning_sketch.exceptions import (
    CheckpointLoadError,
    RunMismatchError,
    SketchConfigError,
)
from lightning_sketch.spectrum.snapshot import SnapshotWriter, index_run, load_index, load_snapshot
from lightning_sketch.store import SketchStore
from lightning_sketch.store.provenance import check_checkpoint_store


class CopyAt(Callback):
    """Copy the store manifest and the spectrum index aside after the checkpoint at ``step``."""

    def __init__(self, run: Path, step: int) -> None:
        self.run, self.step = run, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            shutil.copy(self.run / "store" / "manifest.json", self.run / "old-manifest.json")
            shutil.copy(self.run / "spectrum" / "index.json", self.run / "old-index.json")


def _callbacks(run: Path, ckpt_every: int = 2) -> list:
    return [GradientSketch(dirpath=str(run), sketch_kind="affd", sketch_dim=8, every_n_steps=2),
            HessianSpectrum(dirpath=str(run / "spectrum"), every_n_steps=2, k=2, sketch_dim=16,
                            probe_batches=1, budget=None),  # every snapshot: the index generations are fixed
            ModelCheckpoint(dirpath=str(run / "ckpt"), save_last=True, every_n_train_steps=ckpt_every,
                            save_top_k=0)]


def _fit(root: Path, run: Path, max_steps: int, extra: list | None = None,
         ckpt_path: str | None = None) -> None:
    trainer(root, _callbacks(run) + (extra or []), max_steps=max_steps, enable_checkpointing=True).fit(
        Tiny(), loader(16, 8), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run ``a`` (6 steps, manifest and index copied aside after step 2) and run ``b`` (4 steps)."""
    root = tmp_path_factory.mktemp("prov")
    a, b = root / "a", root / "b"
    _fit(root, a, 6, [CopyAt(a, 2)])
    _fit(root, b, 4)
    return {"root": root, "a": a, "b": b}


def _copy(runs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs["a"], tmp_path / "a"))


def _resume(tmp_path: Path, run: Path) -> None:
    _fit(tmp_path, run, 8, ckpt_path=str(run / "ckpt" / "last.ckpt"))


# ---------------------------------------------------------------------------- resume
@pytest.mark.slow  # whole training runs
def test_resume_refuses_an_older_store_manifest(runs, tmp_path):
    run = _copy(runs, tmp_path)
    old = SketchStore.open(run / "store").generation
    shutil.copy(run / "old-manifest.json", run / "store" / "manifest.json")
    SketchStore.open(run / "store").verify()  # the older manifest is intact: only the generation tells
    assert SketchStore.open(run / "store").generation < old
    with pytest.raises(RunMismatchError, match="older than generation"):
        _resume(tmp_path, run)


@pytest.mark.slow
def test_resume_refuses_another_runs_store(runs, tmp_path):
    run = _copy(runs, tmp_path)
    shutil.rmtree(run / "store")
    shutil.copytree(runs["b"] / "store", run / "store")
    with pytest.raises(RunMismatchError, match="belongs to run"):
        _resume(tmp_path, run)


@pytest.mark.slow
def test_resume_refuses_an_older_or_foreign_spectrum_index(runs, tmp_path):
    run = _copy(runs, tmp_path)
    shutil.copy(run / "old-index.json", run / "spectrum" / "index.json")
    load_index(run / "spectrum")  # intact and self-consistent
    with pytest.raises(RunMismatchError, match="spectrum index .* older than generation"):
        _resume(tmp_path, run)
    run = Path(shutil.copytree(runs["a"], tmp_path / "a2"))
    shutil.rmtree(run / "spectrum")
    shutil.copytree(runs["b"] / "spectrum", run / "spectrum")
    gen_b = index_run(run / "spectrum")[0]
    assert gen_b >= index_run(runs["a"] / "spectrum")[0] - 1
    with pytest.raises(RunMismatchError, match="spectrum index"):
        _resume(tmp_path, run)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_resume_refuses_a_damaged_checkpoint_file(runs, tmp_path, damage):
    run = _copy(runs, tmp_path)
    ckpt = run / "ckpt" / "last.ckpt"
    data = bytearray(ckpt.read_bytes())
    if damage == "flip":
        pos = data.find(b"archive/data/0") + 200  # inside the first tensor's bytes
        data[pos] ^= 0x40
    else:
        del data[len(data) // 2:]
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError, match="damaged"):
        _resume(tmp_path, run)


@pytest.mark.slow
def test_resume_refuses_weights_rewritten_after_the_checkpoint_was_saved(runs, tmp_path):
    """A checkpoint re-saved with one weight changed (a valid archive): the recorded digest differs."""
    run = _copy(runs, tmp_path)
    ckpt = run / "ckpt" / "last.ckpt"
    loaded = torch.load(ckpt, weights_only=False)
    key = next(iter(loaded["state_dict"]))
    loaded["state_dict"][key].view(-1)[0] += 1.0
    torch.save(loaded, ckpt)
    with pytest.raises(CheckpointLoadError, match="not the ones it was saved with"):
        _resume(tmp_path, run)


# ---------------------------------------------------------------------------- the CLI's checkpoint loader
@pytest.mark.slow
def test_query_loader_refuses_a_flipped_checkpoint_before_any_answer(runs, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    data = bytearray((runs["a"] / "ckpt" / "last.ckpt").read_bytes())
    model = Tiny()
    loaded = load_checkpoint_into(model, runs["a"] / "ckpt" / "last.ckpt")  # intact: loads
    pos = data.find(b"archive/data/0") + 200
    data[pos] ^= 0x01  # a low mantissa bit of one weight: the prediction changed on main
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError, match="fails its CRC-32"):
        load_checkpoint_into(Tiny(), ckpt)
    # the store beside it is checked against the checkpoint: the current store passes, an older
    # manifest of the same run and another run's store are refused
    store = runs["a"] / "store"
    check_checkpoint_store(loaded, SketchStore.open(store).manifest, store=store, ckpt="last.ckpt")
    old = sio.read_json(runs["a"] / "old-manifest.json", what="manifest")
    with pytest.raises(RunMismatchError, match="older than generation"):
        check_checkpoint_store(loaded, old, store=store, ckpt="last.ckpt")
    other = SketchStore.open(runs["b"] / "store").manifest
    with pytest.raises(RunMismatchError, match="belongs to run"):
        check_checkpoint_store(loaded, other, store=runs["b"] / "store", ckpt="last.ckpt")
    # what `query` runs on the Attributor's stores before computing answers
    current = SketchStore.open(store).manifest
    assert _check_runs([current], [str(store)], ["last.ckpt"], [(model, None, loaded)]) == [
        {"run_id": current["run_id"], "generation": current["generation"]}]
    with pytest.raises(RunMismatchError, match="older than generation"):
        _check_runs([old], [str(store)], ["last.ckpt"], [(model, None, loaded)])
    # one --ckpt for an ensemble of two stores gives the architecture only: not compared
    assert len(_check_runs([old, other], ["s1", "s2"], ["last.ckpt"], [(model, None, loaded)])) == 2


# ---------------------------------------------------------------------------- readers without a checkpoint
def _snap(writer: SnapshotWriter, step: int, v: float) -> None:
    writer.write(step, {"eigenvalues": torch.tensor([v], dtype=torch.float64)}, {"sketch_spec": None})


def test_snapshot_of_another_run_listed_in_the_index_is_refused(tmp_path):
    a, b = SnapshotWriter(tmp_path / "a"), SnapshotWriter(tmp_path / "b")
    _snap(a, 0, 1.0)
    _snap(b, 0, 2.0)
    a.close(), b.close()
    assert a.run_id != b.run_id and index_run(tmp_path / "a")[1] == a.run_id
    # b's snapshot copied over a's, and a's index entry re-pointed at its size and sha256
    shutil.copy(tmp_path / "b" / "step_00000000.npz", tmp_path / "a" / "step_00000000.npz")
    doc = sio.read_json(tmp_path / "a" / "index.json", what="index")
    sha, size = sio.file_sha256(tmp_path / "a" / "step_00000000.npz")
    doc["snapshots"][0].update(sha256=sha, bytes=size)
    sio.write_checked_json(tmp_path / "a" / "index.json", doc)
    with pytest.raises(RunMismatchError, match="swapped in from another run"):
        load_snapshot(tmp_path / "a" / "step_00000000.npz")
    assert load_snapshot(tmp_path / "b" / "step_00000000.npz")["eigenvalues"].tolist() == [2.0]


def test_attributor_refuses_wrongly_typed_arguments():
    from lightning_sketch.attribution import Attributor

    for kw in ({"damping": "1"}, {"damping_ratio": "0.3"}, {"arnoldi_k": 2.5}, {"chunk_size": "8"},
               {"verify": "yes"}):
        with pytest.raises(SketchConfigError, match=next(iter(kw))):
            Attributor("/nonexistent-run", torch.nn.Linear(2, 2), **kw)


@pytest.mark.slow
def test_intrinsic_dimension_resume_refuses_another_runs_state_file(tmp_path):
    from _common import Data

    from lightning_sketch.callbacks import IntrinsicDimension, SearchCriteria

    def idim(d: Path) -> IntrinsicDimension:
        return IntrinsicDimension(sketch_kind="dense", sketch_dim=16, monitor="val_acc",
                                  criteria=SearchCriteria(d_min=4, target=2.0), plot=False,
                                  stop_when_done=False, dirpath=str(d))

    def fit(d: Path, steps: int, ckpt_path: str | None = None) -> None:
        trainer(tmp_path, [idim(d), ModelCheckpoint(dirpath=str(d / "ckpt"), save_last=True, save_top_k=0,
                                                   every_n_train_steps=2)],
                max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                enable_checkpointing=True).fit(Tiny(), datamodule=Data(16, 8), ckpt_path=ckpt_path)

    a, b = tmp_path / "a", tmp_path / "b"
    fit(a, 4)
    fit(b, 4)
    state = sio.load_checked_json(a / "intrinsic_dimension.json", what="state")
    assert state["run_id"] != sio.load_checked_json(b / "intrinsic_dimension.json", what="state")["run_id"]
    shutil.copy(b / "intrinsic_dimension.json", a / "intrinsic_dimension.json")  # intact, another run's
    with pytest.raises(RunMismatchError, match="intrinsic-dimension directory is another run's"):
        fit(a, 6, ckpt_path=str(a / "ckpt" / "last.ckpt"))
    shutil.copy(b / "ckpt" / "last.ckpt", tmp_path / "b.ckpt")
    shutil.rmtree(b / "ckpt")
    fit(b, 6, ckpt_path=str(tmp_path / "b.ckpt"))  # its own directory: resumes
    assert sio.load_checked_json(b / "intrinsic_dimension.json", what="state")["run_id"] != state["run_id"]
