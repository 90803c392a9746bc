"""SIGKILL during training while the callbacks write, then resume from the last Lightning checkpoint.

Each killed run is a child forked by one subprocess (``scripts/kill_run.py fork``, so the imports
are paid once) that kills itself with SIGKILL at a point
drawn from a fixed seed: after a batch, inside a store commit (segments written, manifest not yet
published), inside a Lightning checkpoint save, or while a spectrum snapshot file is half written.
Right after the kill the stores must open and pass ``inspect_store``/``verify``; after resuming
from ``last.ckpt`` (in this process) the stores, the HessianSpectrum history and the
IntrinsicDimension search state must equal an uninterrupted run's, row for row and bit for bit.

Exactness needs the resumed run to replay the same batches: the data are not shuffled (a
``RandomSampler`` drawing from the global RNG would give other permutations after a restart). The
intrinsic-dimension run checkpoints after each validation round: a checkpoint that
``every_n_train_steps`` writes at a validating step precedes that step's validation, which Lightning
does not replay on resume (that search round would be lost).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _common import HERE, clean_env

from lightning_sketch.spectrum import load_index, load_snapshot
from lightning_sketch.store import SketchStore, inspect_store

pytestmark = pytest.mark.slow  # subprocesses and whole training runs

TIMEOUT_S = 240
WHERES = ("batch_end", "commit", "ckpt", "snapshot")
ATTR_SEEDS = (0, 1, 2, 3, 4)
INTRINSIC_SEEDS = (0, 1)


def attr_kill(seed: int) -> str:
    """Kill point of seed ``seed``: the kind cycles over WHERES, the step is drawn after the first checkpoint (4)."""
    step = random.Random(seed).randint(5, 11)
    return f"{WHERES[seed % len(WHERES)]}:{step}"


def intrinsic_kill(seed: int) -> str:
    return f"val_end:{random.Random(seed).choice([6, 10])}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the killed runs (one subprocess forking a child per seed), run the references meanwhile."""
    root = tmp_path_factory.mktemp("kill")
    jobs = [f"{root / f'attr{s}'}:attr:{attr_kill(s)}" for s in ATTR_SEEDS]
    jobs += [f"{root / f'intrinsic{s}'}:intrinsic:{intrinsic_kill(s)}" for s in INTRINSIC_SEEDS]
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_run.py"), "fork", *jobs], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    try:
        import kill_run

        refs = {mode: kill_run.main(root / f"ref_{mode}", mode) for mode in ("attr", "intrinsic")}
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    finally:
        torch.set_num_threads(threads)
    assert proc.returncode == 0, err[-3000:]
    status = json.loads(out.strip().splitlines()[-1])
    assert status == {job: -signal.SIGKILL for job in jobs}, f"every run must die by SIGKILL: {status}\n{err[-3000:]}"
    return root, refs


def _assert_kill_landed(run: Path, kill: str) -> None:
    """Evidence that the process died where intended (so each seed tests what it claims)."""
    where, step = kill.split(":")
    if where == "commit":  # segment files written, manifest not published
        orphans = []
        for which in ("attr_ckpt", "attr_inline"):
            store = run / which / "store"
            listed = {s[p]["file"] for s in json.loads((store / "manifest.json").read_text())["segments"]
                      for p in ("vectors", "ids")}
            orphans += [f for f in store.glob("seg-*") if f.name not in listed]
        assert orphans
    elif where == "snapshot":  # a half-written snapshot next to the published ones, not in the index
        assert list((run / "spectrum").glob("*.npz.tmp*"))
        assert all(e["step"] < int(step) for e in load_index(run / "spectrum"))
    elif where == "ckpt":  # the checkpoint being saved never appeared
        saved = [int(p.stem.split("step=")[1]) for p in (run / "ckpt").glob("epoch=*.ckpt")]
        assert saved and max(saved) < int(step)
    else:  # batch_end: rows of the killed step were buffered, never committed
        assert max(int(p.stem.split("step=")[1]) for p in (run / "ckpt").glob("epoch=*.ckpt")) < int(step)


def _healthy(path: Path) -> None:
    info = inspect_store(path)
    assert info["health"]["ok"], info["health"]
    store = SketchStore.open(path, verify="full")
    store.verify()


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = SketchStore.open(got), SketchStore.open(want)
    assert a.checkpoints == b.checkpoints
    assert a.num_rows == b.num_rows
    for name in b.checkpoints:
        ia, ib = a.ids(name), b.ids(name)
        oa, ob = np.argsort(ia), np.argsort(ib)
        assert ia[oa].tolist() == ib[ob].tolist()
        np.testing.assert_array_equal(np.asarray(a.vectors(name))[oa], np.asarray(b.vectors(name))[ob])
        assert a.checkpoint_info(name)["lr"] == b.checkpoint_info(name)["lr"]


@pytest.mark.parametrize("seed", ATTR_SEEDS)
def test_killed_run_resumes_to_the_uninterrupted_stores_and_spectrum(runs, seed):
    import kill_run

    root, refs = runs
    run = root / f"attr{seed}"
    assert (run / "ckpt" / "last.ckpt").exists()
    for which in ("attr_ckpt", "attr_inline"):  # consistent right after the kill
        _healthy(run / which / "store")
    _assert_kill_landed(run, attr_kill(seed))
    threads = torch.get_num_threads()
    try:
        resumed = kill_run.main(run, "attr", resume=True)
    finally:
        torch.set_num_threads(threads)
    ref = refs["attr"]
    for which in ("attr_ckpt", "attr_inline"):
        _healthy(run / which / "store")
        _assert_same_store(run / which / "store", root / "ref_attr" / which / "store")
    assert resumed["params"] == ref["params"]
    assert resumed["spectrum"] == ref["spectrum"]
    assert [e["step"] for e in ref["spectrum"]] == [0, 3, 6, 9, 12]
    assert [e["step"] for e in load_index(run / "spectrum")] == [0, 3, 6, 9, 12]
    for e in load_index(run / "spectrum"):  # every indexed snapshot file is whole and equals the reference
        got = load_snapshot(run / "spectrum" / e["file"])["eigenvalues"]
        want = load_snapshot(root / "ref_attr" / "spectrum" / e["file"])["eigenvalues"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("seed", INTRINSIC_SEEDS)
def test_killed_search_resumes_with_the_same_state(runs, seed):
    import kill_run

    root, refs = runs
    run = root / f"intrinsic{seed}"
    killed_at = int(intrinsic_kill(seed).split(":")[1])
    written = json.loads((run / "intrinsic" / "intrinsic_dimension.json").read_text())
    assert written["history"][-1]["step"] == killed_at  # the JSON is whole after the kill
    threads = torch.get_num_threads()
    try:
        resumed = kill_run.main(run, "intrinsic", resume=True)["intrinsic"]
    finally:
        torch.set_num_threads(threads)
    ref = refs["intrinsic"]["intrinsic"]
    assert len(ref["history"]) >= 5 and len({h["d"] for h in ref["history"]}) >= 2  # the search moved
    assert resumed == ref
    final = json.loads((run / "intrinsic" / "intrinsic_dimension.json").read_text())
    assert final["history"] == ref["history"]
