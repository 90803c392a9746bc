"""Append / commit / reopen round trips and every boundary error of the SketchStore API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from store_helpers import clustered

from lightning_sketch.exceptions import (
    DuplicateIdError,
    LayoutMismatchError,
    NonFiniteGradientError,
    SketchConfigError,
    SketchInputError,
    SketchMismatchError,
    StoreFormatError,
    StoreNotFoundError,
    StoreWriteError,
)
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore, inspect_store


def _filled(path, spec, n=300, chunks=3, dtype="float32"):
    store = SketchStore.create(path, spec, layout_fingerprint="fp-1", dtype=dtype)
    store.add_checkpoint("step-1", step=1, lr=0.5)
    x = clustered(n, spec["sketch_dim"], seed=0)
    for part in np.array_split(np.arange(n), chunks):
        store.append(part, x[part], checkpoint="step-1")
        store.commit()
    return store, x


def test_round_trip_reopen(tmp_path, spec):
    store, x = _filled(tmp_path / "s", spec)
    store.close()
    again = SketchStore.open(tmp_path / "s", spec=spec, layout_fingerprint="fp-1")
    assert again.checkpoints == ["step-1"]
    assert again.num_rows == 300 and again.generation == 3
    np.testing.assert_array_equal(again.ids("step-1"), np.arange(300))
    np.testing.assert_array_equal(again.vectors("step-1"), x)
    assert torch.equal(again.vectors(as_torch=True), torch.from_numpy(x))
    assert again.checkpoint_info("step-1")["lr"] == 0.5
    assert again.size_bytes > 300 * 16 * 4
    again.verify()


def test_sketch_object_spec_and_float16(tmp_path):
    sketch = make("dense", 50, 8, seed=3)
    store, x = _filled(tmp_path / "s", sketch.spec, n=40, dtype="float16")
    assert store.vectors().dtype == np.float16
    np.testing.assert_array_equal(store.vectors(), x.astype(np.float16))
    SketchStore.open(tmp_path / "s", spec=sketch).close()
    with pytest.raises(SketchInputError, match="float16 range"):
        store.append([1000], np.full((1, 8), 1e6, dtype=np.float32))


def test_uncommitted_buffer_is_lost_when_dropped(tmp_path, spec):
    store, x = _filled(tmp_path / "s", spec, n=100, chunks=1)
    store.append(np.arange(100, 150), x[:50])
    assert store.pending_rows == 50
    del store  # a "crash" without commit: the lock goes with the object
    reopened = SketchStore.open(tmp_path / "s", mode="a")
    assert reopened.num_rows == 100 and reopened.pending_rows == 0
    reopened.append(np.arange(100, 150), x[:50])  # the same ids are not duplicates: never committed
    reopened.commit()
    assert reopened.num_rows == 150


def test_writer_lock_and_read_only(tmp_path, spec):
    store, _ = _filled(tmp_path / "s", spec, n=10, chunks=1)
    with pytest.raises(StoreWriteError, match="writer lock"):
        SketchStore.open(tmp_path / "s", mode="a")
    reader = SketchStore.open(tmp_path / "s")
    with pytest.raises(StoreWriteError, match="read-only"):
        reader.append([99], np.zeros((1, 16), np.float32))
    with pytest.raises(StoreWriteError, match="already exists"):
        SketchStore.create(tmp_path / "s", spec)
    store.close()
    with SketchStore.create(tmp_path / "s", spec, exist_ok=True) as again:
        assert again.num_rows == 10


def test_spec_layout_and_format_mismatch(tmp_path, spec):
    _filled(tmp_path / "s", spec, n=10, chunks=1)[0].close()
    with pytest.raises(SketchMismatchError, match=r"seed: stored 0 vs given 7"):
        SketchStore.open(tmp_path / "s", spec={**spec, "seed": 7})
    with pytest.raises(LayoutMismatchError, match="another architecture"):
        SketchStore.open(tmp_path / "s", layout_fingerprint="fp-2")
    with pytest.raises(SketchMismatchError, match="kind: stored 'dense' vs given 'affd'"):
        SketchStore.create(tmp_path / "s", {**spec, "kind": "affd"}, exist_ok=True)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreFormatError, match="format_version 99"):
        SketchStore.open(tmp_path / "s")
    with pytest.raises(StoreNotFoundError, match="directory missing"):
        SketchStore.open(tmp_path / "nowhere")
    with pytest.raises(StoreFormatError, match="format_version 99"):
        inspect_store(tmp_path / "s")


def test_layout_object_is_recorded(tmp_path, spec):
    class Layout:
        def to_dict(self):
            return {"names": ["w"], "shapes": [[4, 250]]}

        def fingerprint(self):
            return "abc123"

    SketchStore.create(tmp_path / "s", spec, layout=Layout()).close()
    opened = SketchStore.open(tmp_path / "s", layout_fingerprint=Layout())
    assert opened.layout_fingerprint == "abc123" and opened.manifest["layout"]["names"] == ["w"]
    with pytest.raises(LayoutMismatchError, match="disagrees"):
        SketchStore.create(tmp_path / "t", spec, layout=Layout(), layout_fingerprint="zzz")


def test_bad_create_arguments(tmp_path, spec):
    with pytest.raises(SketchConfigError, match="`dtype` must be .float32. or .float16."):
        SketchStore.create(tmp_path / "a", spec, dtype="float64")
    with pytest.raises(SketchConfigError, match="`nan_policy`"):
        SketchStore.create(tmp_path / "a", spec, nan_policy="ignore")
    with pytest.raises(SketchConfigError, match="row width D"):
        SketchStore.create(tmp_path / "a", None)
    with pytest.raises(SketchConfigError, match="JSON-serialisable"):
        SketchStore.create(tmp_path / "a", {"kind": "dense", "sketch_dim": 4, "x": object()})
    with pytest.raises(SketchConfigError, match="`mode` must be"):
        SketchStore.open(tmp_path / "a", mode="w")


def test_duplicate_ids(tmp_path, spec):
    store = SketchStore.create(tmp_path / "s", spec)
    store.add_checkpoint("c", step=0, lr=1.0)
    x = clustered(6, 16, seed=1)
    store.append([0, 1, 2], x[:3])
    with pytest.raises(DuplicateIdError, match=r"\[2\] already appended"):
        store.append([2, 3], x[3:5])  # duplicate of a buffered id
    store.commit()
    with pytest.raises(DuplicateIdError, match=r"\[1\]"):
        store.append([1], x[:1])  # duplicate of a committed id
    with pytest.raises(DuplicateIdError, match=r"\[5\]"):
        store.append([5, 5], x[:2])  # duplicate inside one batch
    assert store.append([1, 4, 4, 5], x[:4], on_duplicate="skip") == 2
    store.commit()
    np.testing.assert_array_equal(store.ids(), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(store.vectors()[3:], x[[1, 3]])
    assert store.checkpoint_info("c")["skipped_duplicates"] == 2


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([0.5, 1.0], "integer example ids"),
        (np.array([1.0, 2.0]), "integer example ids"),
        (torch.tensor([1.0, 2.0]), "must hold integers"),
        ([True, False], "integer example ids"),
        (["a", "b"], "integer example ids"),
        ([2**63, 1], "int64"),
        ([2**64, 1], r"\[0, 2\*\*63 - 1\]"),
        (np.array([2**63, 1], dtype=np.uint64), "int64"),
        ([-1, 3], "FAISS reserves -1"),
        ([[1, 2]], "1-D"),
    ],
)
def test_bad_ids(tmp_path, spec, ids, match):
    store = SketchStore.create(tmp_path / "s", spec)
    store.add_checkpoint("c")
    with pytest.raises(SketchInputError, match=match):
        store.append(ids, np.zeros((2, 16), np.float32))


def test_bad_vectors_and_checkpoints(tmp_path, spec):
    store = SketchStore.create(tmp_path / "s", spec)
    with pytest.raises(SketchInputError, match="`checkpoint` is required"):
        store.append([0], np.zeros((1, 16), np.float32))
    store.add_checkpoint("a", step=1, lr=0.1)
    store.add_checkpoint("a", step=1, lr=0.1)  # same record again: a resume, no-op
    with pytest.raises(SketchInputError, match="already exists with step=1"):
        store.add_checkpoint("a", step=2, lr=0.1)
    with pytest.raises(SketchInputError, match="name must be"):
        store.add_checkpoint("../evil")
    with pytest.raises(SketchInputError, match="name must be"):
        store.add_checkpoint("tracin")
    with pytest.raises(SketchInputError, match="finite number"):
        store.add_checkpoint("b", lr=float("nan"))
    with pytest.raises(SketchInputError, match="Unknown checkpoint 'zz'"):
        store.append([0], np.zeros((1, 16), np.float32), checkpoint="zz")
    with pytest.raises(SketchInputError, match=r"shape \[B, 16\]"):
        store.append([0], np.zeros((1, 15), np.float32))
    with pytest.raises(SketchInputError, match="real floating"):
        store.append([0], np.zeros((1, 16), np.int64))
    with pytest.raises(SketchInputError, match="2 entries but `vectors` has 1"):
        store.append([0, 1], np.zeros((1, 16), np.float32))
    assert store.append([0], torch.zeros(16, dtype=torch.float64)) == 1


def test_nan_policy(tmp_path, spec):
    store = SketchStore.create(tmp_path / "s", spec)
    store.add_checkpoint("c", lr=1.0)
    x = clustered(4, 16, seed=2)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    with pytest.raises(NonFiniteGradientError, match=r"2 row\(s\).*ids \[1, 2\]"):
        store.append(np.arange(4), x)
    assert store.append(np.arange(4), x, nan_policy="skip") == 2
    store.commit()
    np.testing.assert_array_equal(store.ids(), [0, 3])
    info = inspect_store(tmp_path / "s")
    assert info["checkpoints"][0]["skipped_nonfinite"] == 2 and info["health"]["ok"]
    skipping = SketchStore.create(tmp_path / "t", spec, nan_policy="skip")
    skipping.add_checkpoint("c")
    assert skipping.append(np.arange(4), x) == 2


def test_empty_store_and_bad_queries(tmp_path, spec):
    store = SketchStore.create(tmp_path / "s", spec)
    with pytest.raises(SketchInputError, match="`checkpoint` is required"):
        store.search(np.zeros((1, 16), np.float32), 1)
    store.add_checkpoint("c")
    store.commit()
    with pytest.raises(SketchInputError, match="no committed rows"):
        store.search(np.zeros((1, 16), np.float32), 1)
    store.append([0, 1], clustered(2, 16, seed=3))
    store.commit()
    with pytest.raises(SketchInputError, match=r"`k` must be an int in \[1, 2\]"):
        store.search(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(SketchInputError, match="NaN/inf"):
        store.search(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(SketchInputError, match=r"shape \[B, 16\]"):
        store.search(np.zeros((1, 8), np.float32), 1)
    with pytest.raises(SketchConfigError, match="`index` must be one of"):
        store.search(np.zeros((1, 16), np.float32), 1, index="lsh")
    with pytest.raises(SketchConfigError, match="needs GPU FAISS"):
        store.search(np.zeros((1, 16), np.float32), 1, device="cuda")
    with pytest.raises(SketchInputError, match="Unknown checkpoint"):
        store.search(np.zeros((1, 16), np.float32), 1, checkpoint="nope")


def test_rollback_restores_generation(tmp_path, spec):
    store, x = _filled(tmp_path / "s", spec, n=90, chunks=3)
    store.add_checkpoint("late", step=9, lr=0.1)
    store.append(np.arange(5), x[:5], checkpoint="late")
    store.commit()
    store.rollback(2)
    assert store.checkpoints == ["step-1"] and store.num_rows == 60
    store.append(np.arange(60, 90), x[60:90], checkpoint="step-1")  # re-run after resume
    store.commit()
    np.testing.assert_array_equal(SketchStore.open(tmp_path / "s").vectors(), x)
    with pytest.raises(SketchInputError, match="`generation` must be an int"):
        store.rollback(99)


def test_inspect_reports(tmp_path, spec):
    store, _ = _filled(tmp_path / "s", spec, n=300)
    store.build_index("flat")
    info = inspect_store(tmp_path / "s")
    assert info["rows"] == 300 and info["sketch_dim"] == 16 and info["spec"] == spec
    assert info["indexes"][0]["kind"] == "flat" and info["indexes"][0]["current"]
    assert info["size_bytes"] == store.size_bytes and info["health"] == {"ok": True, "checksums": "ok", "error": None}
    json.dumps(info)


def test_prune_removes_only_unreferenced_files(tmp_path, spec):
    store, x = _filled(tmp_path / "s", spec, n=90, chunks=3)
    store.build_index("flat")
    store.build_index("flat")  # replaces the first index file
    store.rollback(2)  # the third segment is no longer referenced
    (tmp_path / "s" / "seg-c-r0-g000099.npy.tmp-1234").write_bytes(b"torn")
    removed = store.prune()
    assert "seg-c-r0-g000099.npy.tmp-1234" in removed and len(removed) == 5
    reopened = SketchStore.open(tmp_path / "s", verify="full")
    reopened.verify()
    np.testing.assert_array_equal(reopened.vectors(), x[:60])
    with pytest.raises(StoreWriteError, match="read-only"):
        reopened.prune()


def test_a_lock_that_could_not_be_created_is_collected_silently(tmp_path, monkeypatch):
    """``DirLock.__del__`` after a failed ``__init__`` (no lock file opened) reports nothing."""
    import gc
    import sys

    from lightning_sketch.io.safeio import DirLock

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    try:
        DirLock(tmp_path / "missing" / "dir")
    except StoreWriteError as err:
        assert "Cannot create the writer lock" in str(err)
    else:
        raise AssertionError("DirLock in a missing directory must fail")
    gc.collect()
    assert [str(s.exc_value) for s in seen] == []
