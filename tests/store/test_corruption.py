"""Truncated, bit-flipped and missing store files give typed errors naming the file; a failed
(disk-full) commit leaves the last committed state intact."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from store_helpers import clustered

from lightning_sketch.io import safeio as sio
from lightning_sketch.exceptions import StoreCorruptError, StoreNotFoundError, StoreWriteError
from lightning_sketch.store import SketchStore, inspect_store
from lightning_sketch.store import _io


@pytest.fixture
def built(tmp_path, spec):
    store = SketchStore.create(tmp_path / "s", spec)
    store.add_checkpoint("c", step=1, lr=0.1)
    x = clustered(400, 16, seed=0)
    store.append(np.arange(200), x[:200])
    store.commit()
    store.append(np.arange(200, 400), x[200:])
    store.commit()
    entry = store.build_index("flat")
    store.close()
    seg = SketchStore.open(tmp_path / "s").manifest["segments"][1]
    return tmp_path / "s", {"vectors": seg["vectors"]["file"], "ids": seg["ids"]["file"], "index": entry["file"]}, x


def _flip(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["vectors", "ids", "index"])
def test_bit_flip_is_named(built, which):
    root, files, _ = built
    _flip(root / files[which])
    with pytest.raises(StoreCorruptError, match=f"{files[which]}.*sha256"):
        SketchStore.open(root, verify="full")
    info = inspect_store(root)
    assert not info["health"]["ok"] and files[which] in info["health"]["error"]


def test_lazy_verification_catches_flip_on_first_read(built):
    root, files, _ = built
    _flip(root / files["vectors"])
    store = SketchStore.open(root, verify="lazy")  # sizes only on open
    with pytest.raises(StoreCorruptError, match=files["vectors"]):
        store.vectors("c")
    with pytest.raises(StoreCorruptError, match=files["vectors"]):
        store.verify()


def test_flipped_index_never_reaches_faiss(built):
    root, files, _ = built
    _flip(root / files["index"], offset=40)
    store = SketchStore.open(root, verify="size")
    with pytest.raises(StoreCorruptError, match=f"{files['index']}.*sha256"):
        store.search(np.ones((1, 16), np.float32), 3, index="flat")


@pytest.mark.parametrize("which", ["vectors", "ids", "index"])
def test_truncated_and_missing_files_are_named(built, which):
    root, files, _ = built
    path = root / files[which]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(StoreCorruptError, match=f"{files[which]}.*truncated"):
        SketchStore.open(root)
    path.unlink()
    with pytest.raises(StoreCorruptError, match=f"{files[which]}.*missing"):
        SketchStore.open(root)


def test_manifest_damage(built):
    root, _, _ = built
    manifest = root / "manifest.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text[: len(text) // 2])
    with pytest.raises(StoreCorruptError, match="manifest.json.*not valid JSON"):
        SketchStore.open(root)
    with pytest.raises(StoreCorruptError, match="manifest.json"):
        inspect_store(root)
    manifest.write_bytes(text.replace(b'"generation": 3', b'"generation": "3"'))
    with pytest.raises(StoreCorruptError, match="field 'generation' must be int"):
        SketchStore.open(root)
    manifest.unlink()
    with pytest.raises(StoreNotFoundError, match="'manifest.json' is missing"):
        SketchStore.open(root)


@pytest.mark.parametrize("number", [b"1e999", b"-1e400", b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_numbers_are_typed_corruption(built, number, tmp_path):
    """A number that parses to inf/nan would break the checksum's canonical JSON (a ValueError traceback
    in open, inspect, query and report): every reader refuses it as corruption."""
    root, _, _ = built
    manifest = root / "manifest.json"
    text = manifest.read_bytes()
    assert b'"meta": {}' in text
    manifest.write_bytes(text.replace(b'"meta": {}', b'"meta": {"epoch": ' + number + b"}"))
    with pytest.raises(StoreCorruptError, match="manifest.json.*non-finite"):
        SketchStore.open(root)
    with pytest.raises(StoreCorruptError, match="non-finite"):
        inspect_store(root)
    state = tmp_path / "state.json"
    sio.write_checked_json(state, {"metric": 0.5})
    state.write_bytes(state.read_bytes().replace(b"0.5", number))
    with pytest.raises(StoreCorruptError, match="state.json.*non-finite"):
        sio.load_checked_json(state, what="state")


def test_edited_row_count_is_inconsistent(built):
    root, _, _ = built
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 400', '"rows": 401'))
    with pytest.raises(StoreCorruptError, match="records 401 rows but its segments hold 400"):
        SketchStore.open(root).verify()
    assert not inspect_store(root)["health"]["ok"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["write", "fsync", "replace"])
def test_disk_full_during_commit_keeps_last_state(built, monkeypatch, target):
    root, _, x = built
    before = SketchStore.open(root).manifest
    store = SketchStore.open(root, mode="a")
    store.append(np.arange(400, 450), x[:50])
    calls = {"n": 0}
    real = getattr(os, target)

    def fail_late(*args, **kwargs):  # let the first segment file through, fail on a later write
        calls["n"] += 1
        if calls["n"] > 2:
            _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(_io.os, target, fail_late)
    with pytest.raises(StoreWriteError, match="disk full.*last committed state is intact"):
        store.commit()
    monkeypatch.undo()
    after = SketchStore.open(root, verify="full")
    after.verify()
    assert after.manifest == before and after.num_rows == 400
    np.testing.assert_array_equal(after.vectors("c"), x)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    assert store.pending_rows == 50  # the buffer is kept: commit can be retried
    assert store.commit() == before["generation"] + 1
    assert SketchStore.open(root).num_rows == 450


def test_disk_full_on_manifest_write(built, monkeypatch):
    root, _, x = built
    files_before = sorted(p.name for p in root.iterdir())
    store = SketchStore.open(root, mode="a")
    store.append(np.arange(400, 410), x[:10])
    real = os.replace

    def fail_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            _enospc()
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", fail_manifest)
    with pytest.raises(StoreWriteError, match="manifest.json.*disk full"):
        store.commit()
    monkeypatch.undo()
    assert SketchStore.open(root, verify="full").num_rows == 400
    assert sorted(p.name for p in root.iterdir()) == files_before  # new segments were removed again


def test_any_error_in_a_concurrent_commit_leaves_no_file_of_that_generation(built, monkeypatch):
    """Segment files are written on worker threads; an error that is not a disk error (here a ValueError
    from the serialiser on one of six files) must still remove every file the other workers wrote."""
    from lightning_sketch.store import writer as writer_mod

    root, _, x = built
    files_before = sorted(p.name for p in root.iterdir())
    store = SketchStore.open(root, mode="a")
    for name in ("d", "e", "f"):
        store.add_checkpoint(name, step=2, lr=0.1)
        store.append(np.arange(400, 410), x[:10], checkpoint=name)
    real, calls = writer_mod.npy_bytes, {"n": 0}

    def flaky(arr):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("serialiser failed (simulated)")
        return real(arr)

    monkeypatch.setattr(writer_mod, "npy_bytes", flaky)
    with pytest.raises(ValueError, match="simulated"):
        store.commit()
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == files_before
    assert store.commit() > 0 and SketchStore.open(root, verify="full").num_rows == 430
