"""Hostile run directories: path traversal, symlinks, devices, FIFOs, swapped and foreign files,
pickle payloads and NaN queries (issue 11, findings 2, 3, 4 and 8). Each gets a typed error,
within a second where a naive reader would hang."""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import runkit
import torch

from lightning_sketch.io import safeio as sio
from lightning_sketch.attribution import Attributor
from lightning_sketch.exceptions import (
    CheckpointLoadError,
    LightningSketchError,
    SketchInputError,
    StoreCorruptError,
    UnsafeFileError,
)
from lightning_sketch.spectrum.snapshot import load_snapshot
from lightning_sketch.store import SketchStore, inspect_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return runkit.build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def run(pristine, tmp_path):
    return runkit.copy_run(pristine, tmp_path / "run")


def _manifest(run):
    return json.loads((run / "store" / "manifest.json").read_text())


def _rewrite(run, data):
    """Write a manifest with a *valid* checksum: an attacker can recompute it, so every other check must hold."""
    sio.write_checked_json(run / "store" / "manifest.json", data)


def _fast(action, error=LightningSketchError, match=None):
    start = time.monotonic()
    with pytest.raises(error, match=match):
        action()
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("path", ["/etc/hostname", "../../outside.npy", "sub/../../x.npy", "./seg.npy"])
def test_manifest_paths_outside_the_store_are_refused(run, path):
    (run.parent / "outside.npy").write_bytes((run / "store" / _manifest(run)["segments"][0]["vectors"]["file"]).read_bytes())
    data = _manifest(run)
    data["segments"][0]["vectors"]["file"] = path
    _rewrite(run, data)
    _fast(lambda: SketchStore.open(run / "store"), StoreCorruptError, "malformed")
    _fast(lambda: Attributor(run, runkit.Net(), method="tracin"), StoreCorruptError)


def test_symlinks_out_of_the_run_and_fifos_are_refused_at_once(run, tmp_path):
    seg = run / "store" / _manifest(run)["segments"][0]["vectors"]["file"]
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(seg, outside)
    seg.unlink()
    os.symlink(outside, seg)  # same bytes, but outside the run directory
    _fast(lambda: SketchStore.open(run / "store"), UnsafeFileError, "outside the run directory")
    seg.unlink()
    os.symlink("/dev/zero", seg)
    _fast(lambda: SketchStore.open(run / "store"), UnsafeFileError)
    seg.unlink()
    os.mkfifo(seg)  # a FIFO inside the store: opening it for reading would block forever
    _fast(lambda: SketchStore.open(run / "store"), UnsafeFileError, "a FIFO")
    _fast(lambda: inspect_store(run / "store")["health"]["ok"] or (_ for _ in ()).throw(StoreCorruptError("x")))
    info = inspect_store(run / "store")
    assert not info["health"]["ok"] and "FIFO" in info["health"]["error"]
    manifest = run / "store" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    _fast(lambda: SketchStore.open(run / "store"), UnsafeFileError, "a FIFO")


def test_weights_swapped_between_slices_or_from_another_run_are_refused(run, pristine, tmp_path):
    w = run / "weights"
    a, b = (w / "step-1.pt").read_bytes(), (w / "step-2.pt").read_bytes()
    (w / "step-1.pt").write_bytes(b)
    (w / "step-2.pt").write_bytes(a)
    store = SketchStore.open(run / "store")
    _fast(lambda: store.load_weights("step-1"), StoreCorruptError, "another checkpoint or run")
    _fast(lambda: Attributor(run, runkit.Net(), method="tracin").scores(runkit.data(2, 3)), StoreCorruptError)
    net = runkit.Net()  # a foreign file: well-formed weights, right names, not this run's
    torch.save({n: p.detach() + 1 for n, p in net.named_parameters()}, w / "step-1.pt")
    _fast(lambda: store.load_weights("step-1"), StoreCorruptError, "checksum")
    (w / "step-1.pt").write_bytes(b"")
    _fast(lambda: store.load_weights("step-1"), StoreCorruptError)


def test_unrecorded_weights_file_is_refused_not_used(run):
    data = _manifest(run)
    data.pop("sha256")
    del data["weights"]["step-2"]
    _rewrite(run, data)
    # single checkpoint: would fall back silently; refused when the Attributor checks the probe examples
    # against the slice's weights, or else when it scores
    _fast(lambda: Attributor(run, runkit.Net(), method="grad_dot").scores(runkit.data(2, 3)),
          StoreCorruptError, "not recorded in the store's manifest")


def test_checkpoint_names_and_lr_in_the_manifest_are_checked(run):
    original = (run / "store" / "manifest.json").read_text()
    for edit, match in (
        (lambda d: d["checkpoints"][0].update(name="../../weights/x"), "malformed"),
        (lambda d: d["segments"][0].update(checkpoint="step-9"), "does not declare"),
        (lambda d: d["checkpoints"][1].update(lr=float("nan")), "malformed|not valid JSON"),
        (lambda d: d["checkpoints"][1].update(lr="0.25"), "malformed"),
        (lambda d: d["weights"]["step-1"].update(file="../../../etc/passwd"), "malformed"),
    ):
        data = json.loads(original)
        data.pop("sha256")
        edit(data)
        try:
            sio.write_checked_json(run / "store" / "manifest.json", data)
        except ValueError:  # NaN cannot even be written as JSON by the library; write it by hand
            (run / "store" / "manifest.json").write_text(json.dumps(data))
        _fast(lambda: SketchStore.open(run / "store"), StoreCorruptError, match)
        _fast(lambda: Attributor(run, runkit.Net(), method="tracin"), StoreCorruptError)
    # a hand edit that keeps the file well-formed but forgets the checksum (the old finding: lr changed)
    data = json.loads(original)
    data["checkpoints"][1]["lr"] = 0.5
    (run / "store" / "manifest.json").write_text(json.dumps(data))
    _fast(lambda: Attributor(run, runkit.Net(), method="tracin"), StoreCorruptError, "checksum")


def test_pickle_payloads_in_every_loadable_file_never_run(run, payload):
    obj, marker = payload
    store = SketchStore.open(run / "store")
    # weights: the manifest record is rewritten to match the planted file, so only the loader stands guard
    buf = io.BytesIO()
    torch.save({"a.weight": torch.zeros(3, 4), "evil": obj}, buf)
    (run / "weights" / "step-1.pt").write_bytes(buf.getvalue())
    data = _manifest(run)
    data["weights"]["step-1"].update(bytes=len(buf.getvalue()), sha256=sio.sha256_bytes(buf.getvalue()))
    _rewrite(run, data)
    _fast(lambda: SketchStore.open(run / "store").load_weights("step-1"), CheckpointLoadError, "arbitrary code")
    # a segment replaced by an object array (np.save pickles it), checksum updated
    seg = data["segments"][0]["ids"]
    buf = io.BytesIO()
    np.save(buf, np.array([obj] * store.checkpoint_info("step-1")["rows"], dtype=object), allow_pickle=True)
    (run / "store" / seg["file"]).write_bytes(buf.getvalue())
    seg.update(bytes=len(buf.getvalue()), sha256=sio.sha256_bytes(buf.getvalue()))
    _rewrite(run, data)
    _fast(lambda: SketchStore.open(run / "store").ids("step-1"), StoreCorruptError)
    # a spectrum snapshot holding a pickled object array, index updated to match
    snap = run / "spectrum" / "step_00000005.npz"
    buf = io.BytesIO()
    np.savez(buf, eigenvalues=np.array([obj], dtype=object), meta=np.array(json.dumps({"step": 5})))
    snap.write_bytes(buf.getvalue())
    index = json.loads((run / "spectrum" / "index.json").read_text())
    index["snapshots"][1].update(bytes=len(buf.getvalue()), sha256=sio.sha256_bytes(buf.getvalue()))
    index.pop("sha256")
    sio.write_checked_json(run / "spectrum" / "index.json", index)
    _fast(lambda: load_snapshot(snap), StoreCorruptError)
    assert not marker.exists()


def test_snapshot_swapped_from_another_step_is_refused(run):
    d = run / "spectrum"
    a, b = (d / "step_00000000.npz").read_bytes(), (d / "step_00000005.npz").read_bytes()
    (d / "step_00000000.npz").write_bytes(b)
    _fast(lambda: load_snapshot(d / "step_00000000.npz"), StoreCorruptError, "swapped")
    index = json.loads((d / "index.json").read_text())  # even with the index rewritten to match it
    index["snapshots"][0].update(bytes=len(b), sha256=sio.sha256_bytes(b))
    index.pop("sha256")
    sio.write_checked_json(d / "index.json", index)
    _fast(lambda: load_snapshot(d / "step_00000000.npz"), StoreCorruptError, "records step 5")
    assert a != b


@pytest.mark.parametrize("method", ["tracin", "grad_cos", "trak", "grad_dot"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_queries_give_a_typed_error(pristine, method, bad):
    att = Attributor(pristine, runkit.Net(), method=method, damping=1.0 if method == "trak" else None)
    batch = runkit.data(2, 3)
    batch["x"][1, 0] = bad
    _fast(lambda: att.top_k(batch, k=3), SketchInputError, "NaN/inf")
    ids, scores = att.top_k(runkit.data(2, 3), k=3)  # finite queries still work
    assert ids.shape == (2, 3) and torch.isfinite(scores).all()
