"""Views over many segments: row sources read like the joined rows, searches give the one-segment
answer without a joined copy, and every file is hashed once per process yet damage is still found."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pytest
from store_helpers import clustered

from lightning_sketch.exceptions import StoreCorruptError
from lightning_sketch.store import SketchStore
from lightning_sketch.store import index as ix
from lightning_sketch.store import manifest as mf
from lightning_sketch.store.rows import SegmentedRows


def _store(path, spec, n: int, segments: int, D: int = 16, seed: int = 0):
    """Two checkpoints of the same ``n`` rows per checkpoint (shuffled ids), in ``segments`` commits each."""
    spec = dict(spec, sketch_dim=D)
    store = SketchStore.create(path, spec)
    rng = np.random.default_rng(seed)
    for c, lr in (("a", 0.1), ("b", 0.4)):
        ids, rows = rng.permutation(n), clustered(n, D, seed=seed + len(c) + int(lr * 10))
        store.add_checkpoint(c, step=int(lr * 10), lr=lr)
        bounds = np.linspace(0, n, segments + 1).astype(int)
        for s, e in zip(bounds[:-1], bounds[1:]):
            store.append(ids[s:e], rows[s:e], checkpoint=c)
            store.commit()
    store.close()
    return SketchStore.open(path)


def test_segmented_rows_read_like_the_joined_rows():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((m, 3)).astype(np.float32) for m in (5, 1, 0, 7, 4)]
    joined = np.concatenate(parts)
    rows = SegmentedRows(parts, 3, np.float32)
    assert rows.shape == joined.shape and len(rows) == 17
    for s in range(18):
        for e in range(s, 19):
            np.testing.assert_array_equal(rows[s:e], joined[s:e])
    pos = rng.integers(-17, 17, size=40)
    np.testing.assert_array_equal(rows[pos], joined[pos])
    np.testing.assert_array_equal(np.asarray(rows), joined)
    assert rows[2:4].base is not None  # inside one segment: a view of it, not a copy
    with pytest.raises(IndexError):
        rows[[17]]


def test_many_segments_search_like_one(tmp_path, spec, monkeypatch):
    monkeypatch.setattr(ix, "BLOCK_BYTES", 4 * 16 * 23)  # blocks straddle segment ends
    one = _store(tmp_path / "one", spec, 500, 1)
    many = _store(tmp_path / "many", spec, 500, 9)
    q = clustered(6, 16, seed=9)
    for c in ("a", "b"):
        np.testing.assert_array_equal(one.ids(c), many.ids(c))
        np.testing.assert_array_equal(one.vectors(c), many.vectors(c))
        for fn in (one.search_exact, one.search):
            s1, i1 = fn(q, 10, checkpoint=c)
            s2, i2 = getattr(many, fn.__name__)(q, 10, checkpoint=c)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)
        ref_s, ref_i = one.search_exact(q, 10, checkpoint=c)  # float64 reference
        s, i = many.search(q, 10, checkpoint=c)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    qt = one.concat_queries({"a": q, "b": 2 * q})
    np.testing.assert_array_equal(one.concat_vectors()[1], many.concat_vectors()[1])
    for kind in ("flat", "ivf"):
        s1, i1 = one.search(qt, 8, checkpoint="tracin", index=kind)
        s2, i2 = many.search(qt, 8, checkpoint="tracin", index=kind)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
    # an in-memory FAISS flat index (build_index) and the streamed rows agree
    many.build_index("flat", checkpoint="a", persist=False)
    s3, i3 = many.search(q, 10, checkpoint="a")
    s4, i4 = one.search(q, 10, checkpoint="a")
    np.testing.assert_array_equal(i3, i4)
    np.testing.assert_allclose(s3, s4, rtol=1e-5, atol=1e-5)


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("view", ["a", "tracin"])
def test_searches_over_many_segments_hold_no_joined_copy(tmp_path, spec, monkeypatch, view):
    # the joined rows would be one numpy allocation of n·D·4 bytes per slice (traced); ids, their
    # argsort and the TracIn positions are int64 arrays of n entries (8 bytes per row against 4·D)
    n, D = 10_000, 256
    monkeypatch.setattr(ix, "BLOCK_BYTES", 256 * 4 * D)
    store = _store(tmp_path / "s", spec, n, 10, D=D)
    q = clustered(3, D, seed=9)
    if view == "tracin":
        q = store.concat_queries({"a": q, "b": q})
    slice_bytes = n * D * 4

    def search():
        store.search(q, 5, checkpoint=view)
        store.search_exact(q, 5, checkpoint=view)

    peak = _traced_peak(search)
    assert peak < slice_bytes / 4, f"{peak} bytes traced against {slice_bytes} bytes per slice"


# ---------------------------------------------------------------- hashing once per process
@pytest.fixture
def hashes(monkeypatch):
    """Count sha256 passes per store file name."""
    counts: dict[str, int] = {}
    real = mf.file_sha256

    def counting(path):
        name = os.path.basename(path)
        counts[name] = counts.get(name, 0) + 1
        return real(path)

    monkeypatch.setattr(mf, "file_sha256", counting)
    monkeypatch.setattr(mf, "_HASHED", {})
    return counts


def _data_files(store):
    return [e["file"] for s in store.manifest["segments"] for e in (s["vectors"], s["ids"])]


def test_a_file_is_hashed_once_per_process_and_damage_is_still_found(tmp_path, spec, hashes, monkeypatch):
    store = _store(tmp_path / "s", spec, 300, 3)
    hashes.clear()
    monkeypatch.setattr(mf, "RACY_NS", -(10**12))  # treat the files as written long ago
    for verify in ("full", "lazy", "full"):
        SketchStore.open(tmp_path / "s", verify=verify).search(clustered(2, 16, seed=1), 3, checkpoint="b")
    files = _data_files(store)
    assert {f: hashes.get(f) for f in files} == {f: 1 for f in files}
    # explicit verify() always hashes
    SketchStore.open(tmp_path / "s").verify()
    assert {f: hashes.get(f) for f in files} == {f: 2 for f in files}
    # an in-place write moves the file's ctime, so the next open hashes it again and finds the damage
    victim = tmp_path / "s" / store.manifest["segments"][-1]["vectors"]["file"]
    before = os.stat(victim).st_ctime_ns
    time.sleep(0.05)
    with open(victim, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    assert os.stat(victim).st_ctime_ns != before  # the premise: this file system moves ctime
    with pytest.raises(StoreCorruptError, match=victim.name):
        SketchStore.open(tmp_path / "s", verify="full")


def test_recently_written_files_are_hashed_at_every_open(tmp_path, spec, hashes):
    store = _store(tmp_path / "s", spec, 120, 2)
    hashes.clear()
    for _ in range(2):
        SketchStore.open(tmp_path / "s", verify="full")
    files = _data_files(store)
    assert {f: hashes.get(f) for f in files} == {f: 2 for f in files}


def test_lazy_open_finds_a_damaged_segment_before_any_answer(tmp_path, spec):
    store = _store(tmp_path / "s", spec, 300, 5)
    victim = tmp_path / "s" / store.manifest["segments"][4]["vectors"]["file"]  # the last of slice "a"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x20
    victim.write_bytes(bytes(data))
    q = clustered(2, 16, seed=1)
    for read in (lambda s: s.search(q, 3, checkpoint="a"), lambda s: s.rows("a")[0:2],
                 lambda s: s.search(s.concat_queries({"a": q, "b": q}), 3, checkpoint="tracin")):
        with pytest.raises(StoreCorruptError, match=victim.name):
            read(SketchStore.open(tmp_path / "s", verify="lazy"))
