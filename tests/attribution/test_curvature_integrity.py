"""Curvature files are part of the store's integrity layer: recorded with their sha256 in the manifest,
refused when edited, swapped or deleted (a typed error naming the file, and ``inspect`` says so),
ignored when present on disk but never committed, and never written through a symlinked folder or
after the store's lock was taken by another writer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from attr_helpers import TinyClassifier

from lightning_sketch.attribution import Attributor
from lightning_sketch.attribution.curvature import (
    curvature_estimator,
    curvature_slices,
    read_curvature,
    write_curvature,
)
from lightning_sketch.exceptions import (
    StoreConflictError,
    StoreCorruptError,
    StoreNotFoundError,
    UnsafeFileError,
)
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore, inspect_store

D, T = 8, 12


def _kernel(seed: int) -> torch.Tensor:
    a = torch.randn(D, 2 * D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


def _file(root, name, part="sidecar"):
    """The run file the store's manifest records for slice ``name``'s curvature ``part``."""
    return root / SketchStore.open(root / "store").manifest["curvature"][name][part]["file"]


def _run(root, names=("s0", "s1"), estimator="margin", curvature=True):
    """A run directory with stored rows, weights and a committed margin kernel per slice."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=3)
    store = SketchStore.create(root / "store", sketch.spec, layout=layout)
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(names):
        store.add_checkpoint(name, step=i, lr=0.1)
        store.append(torch.arange(T), torch.randn(T, D, generator=g, dtype=torch.float64), checkpoint=name)
        store.save_weights(name, {n: t.detach().clone() for n, t in layout.params(model).items()},
                           root / "weights", layout.fingerprint())
        if curvature:
            write_curvature(root, name, _kernel(i), T, sketch.spec, estimator, store=store)
        store.commit()
    store.close()
    return model, sketch.spec


def test_curvature_files_are_recorded_in_the_manifest_and_read_back(tmp_path):
    model, spec = _run(tmp_path)
    manifest = SketchStore.open(tmp_path / "store").manifest
    rec = manifest["curvature"]["s1"]
    assert rec["matrix"]["file"].startswith("curvature/s1-") and rec["sidecar"]["file"].endswith(".json")
    for part in ("matrix", "sidecar"):
        assert rec[part]["sha256"] == hashlib.sha256(_file(tmp_path, "s1", part).read_bytes()).hexdigest()
    assert curvature_slices(tmp_path) == ["s0", "s1"]
    K, meta = read_curvature(tmp_path, "s1", spec)
    torch.testing.assert_close(K, _kernel(1))
    assert meta["estimator"] == "margin" and inspect_store(tmp_path / "store")["health"]["ok"]
    assert Attributor(tmp_path, model).kernel == "margin"


def test_an_edited_sidecar_is_refused_and_inspect_reports_it(tmp_path):
    """The finding: editing the estimator silently switched the kernel while inspect said OK."""
    model, spec = _run(tmp_path)
    side = _file(tmp_path, "s0")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "estimator": "sampled"}, sort_keys=True))  # still valid JSON
    with pytest.raises(StoreCorruptError, match=r"curvature/s0-\w+\.json.*SHA-256"):
        curvature_estimator(tmp_path, "s0")
    with pytest.raises(StoreCorruptError, match=r"curvature/s0-\w+\.json"):
        read_curvature(tmp_path, "s0", spec)
    with pytest.raises(StoreCorruptError, match=r"curvature/s0-\w+\.json"):
        Attributor(tmp_path, model)
    health = inspect_store(tmp_path / "store")["health"]
    assert not health["ok"] and str(side.relative_to(tmp_path)) in health["error"]


def test_a_swapped_matrix_is_refused(tmp_path):
    _, spec = _run(tmp_path)
    os.replace(_file(tmp_path, "s1", "matrix"), _file(tmp_path, "s0", "matrix"))  # another slice's matrix
    with pytest.raises(StoreCorruptError, match=r"s0-\w+\.npy.*SHA-256"):
        read_curvature(tmp_path, "s0", spec)
    assert not inspect_store(tmp_path / "store")["health"]["ok"]


@pytest.mark.parametrize("part", ["matrix", "sidecar"])
def test_a_listed_but_missing_file_is_refused_naming_it(tmp_path, part):
    _, spec = _run(tmp_path)
    gone = _file(tmp_path, "s1", part)
    gone.unlink()
    with pytest.raises(StoreCorruptError, match=rf"{gone.name}.*missing"):
        read_curvature(tmp_path, "s1", spec)
    health = inspect_store(tmp_path / "store")["health"]
    assert not health["ok"] and f"curvature/{gone.name}" in health["error"] and "missing" in health["error"]


def test_an_uncommitted_curvature_file_is_ignored(tmp_path):
    """Files of a write killed before its commit are on disk but not in the manifest: not used."""
    model, spec = _run(tmp_path, names=("s0",))
    store = SketchStore.open(tmp_path / "store", mode="a")
    store.add_checkpoint("s1", step=1, lr=0.1)
    store.append(torch.arange(T), torch.ones(T, D), checkpoint="s1")
    store.commit()
    write_curvature(tmp_path, "s1", _kernel(5), T, spec, "sampled", store=store)
    store.close()  # killed: the record of s1's curvature is never committed
    assert len(list((tmp_path / "curvature").glob("s1-*.json"))) == 1
    assert curvature_slices(tmp_path) == ["s0"]
    assert curvature_estimator(tmp_path, "s1") is None
    with pytest.raises(StoreNotFoundError, match="records no curvature"):
        read_curvature(tmp_path, "s1", spec)
    assert inspect_store(tmp_path / "store")["health"]["ok"]
    # a curvature file with no store record never decides the kernel
    assert Attributor(tmp_path, model).kernel == "gradients"


def test_curvature_files_no_manifest_records_are_ignored_with_a_warning(tmp_path):
    """A run whose manifest records no curvature at all, but whose folder holds curvature files (copied
    in, or written by an earlier version): trak falls back to GᵀG and says why."""
    _run(tmp_path / "a", names=("s0",))
    model, _ = _run(tmp_path / "b", names=("s0",), curvature=False)
    shutil.copytree(tmp_path / "a" / "curvature", tmp_path / "b" / "curvature")
    with pytest.warns(UserWarning, match="do not record"):
        att = Attributor(tmp_path / "b", model)
    assert att.kernel == "gradients"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Attributor(tmp_path / "a", model)  # recorded: no warning


def test_rollback_forgets_the_curvature_of_rolled_back_slices(tmp_path):
    _, spec = _run(tmp_path)
    store = SketchStore.open(tmp_path / "store", mode="a")
    store.rollback(1)
    store.close()
    assert curvature_slices(tmp_path) == ["s0"]
    with pytest.raises(StoreNotFoundError):
        read_curvature(tmp_path, "s1", spec)


def test_write_curvature_without_a_store_records_and_commits(tmp_path):
    _, spec = _run(tmp_path, names=("s0",))
    write_curvature(tmp_path, "s0", _kernel(7), T, spec, "sampled")  # opens and commits the run's store
    K, meta = read_curvature(tmp_path, "s0", spec)
    torch.testing.assert_close(K, _kernel(7))
    assert meta["estimator"] == "sampled"


def test_a_symlinked_curvature_folder_is_refused_for_writes(tmp_path):
    _, spec = _run(tmp_path / "run", names=("s0",))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(tmp_path / "run" / "curvature", tmp_path / "old")
    os.symlink(elsewhere, tmp_path / "run" / "curvature")
    store = SketchStore.open(tmp_path / "run" / "store", mode="a")
    with pytest.raises(UnsafeFileError, match="symlink"):
        write_curvature(tmp_path / "run", "s0", _kernel(2), T, spec, "sampled", store=store)
    store.close()
    assert list(elsewhere.iterdir()) == []


def test_a_stolen_lock_stops_the_curvature_write_before_its_rename(tmp_path, monkeypatch):
    """Another writer takes the store between writing the sidecar and renaming it: it is not renamed into
    place, nothing is recorded, and the committed curvature and the other writer's commit are intact."""
    _, spec = _run(tmp_path, names=("s0",))
    files = sorted(p.name for p in (tmp_path / "curvature").iterdir())
    store = SketchStore.open(tmp_path / "store", mode="a")
    import lightning_sketch.io.safeio as sio

    real = sio.tempfile.mkstemp
    stolen = []

    def steal(*args, **kwargs):
        if kwargs.get("prefix", "").startswith("s0-") and ".json" in kwargs["prefix"] and not stolen:
            stolen.append(True)
            (tmp_path / "store" / ".writer.lock").unlink()
            other = SketchStore.open(tmp_path / "store", mode="a")
            other.add_checkpoint("other", step=9, lr=0.1)
            other.commit()
            other.close()
        return real(*args, **kwargs)

    monkeypatch.setattr(sio.tempfile, "mkstemp", steal)
    with pytest.raises(StoreConflictError):
        write_curvature(tmp_path, "s0", _kernel(3), T, spec, "sampled", store=store)
    monkeypatch.undo()
    with pytest.raises(StoreConflictError):
        store.check_writer()
    store.close()
    new = sorted(p.name for p in (tmp_path / "curvature").iterdir() if p.name not in files)
    assert stolen and len(new) == 1 and new[0].endswith(".npy")  # the matrix: unlisted, so ignored
    reread = SketchStore.open(tmp_path / "store")
    assert reread.checkpoints == ["s0", "other"] and reread.curvature_slices == ["s0"]
    assert np.isfinite(read_curvature(tmp_path, "s0", spec)[0].numpy()).all()
