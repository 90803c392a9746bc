"""A writer killed with SIGKILL at random points, and readers racing a writer, only ever see
committed snapshots (each helper process imports once and forks; see ``_procs.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _procs
import numpy as np
import pytest

from lightning_sketch.store import SketchStore, inspect_store

HELPER = Path(__file__).with_name("_procs.py")


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """One helper process (one torch import) runs the SIGKILL seeds, then the reader/writer race."""
    root = tmp_path_factory.mktemp("procs")
    (root / "crash").mkdir()
    (root / "concurrent").mkdir()
    return root, _run("all", str(root), ",".join(map(str, SEEDS)))


@pytest.mark.slow
def test_sigkill_during_writes_leaves_a_committed_prefix(runs):
    root, results = runs
    acked = results["crash"]
    for seed in SEEDS:
        path = root / "crash" / f"seed{seed}"
        if not (path / "manifest.json").exists():
            assert acked[str(seed)] == 0  # killed before the store existed
            continue
        info = inspect_store(path)
        assert info["health"]["ok"], info["health"]
        store = SketchStore.open(path, verify="full")
        store.verify()
        batches, rest = divmod(store.num_rows, _procs.B)
        assert rest == 0
        # every acknowledged commit survived; at most the one in flight when killed is extra
        assert acked[str(seed)] <= batches <= acked[str(seed)] + 1
        if batches:
            ids, rows = _procs.expected(batches)
            np.testing.assert_array_equal(store.ids("c"), ids)
            np.testing.assert_array_equal(store.vectors("c"), rows)
        writer = SketchStore.open(path, mode="a")  # the dead writer's lock is gone
        writer.add_checkpoint("c", step=0, lr=0.1)  # a no-op if the killed writer committed it
        writer.append(np.arange(batches * _procs.B, (batches + 1) * _procs.B), _procs.batch_rows(batches))
        writer.commit()
        writer.close()
    assert sum(acked.values()) > 0, "no run committed anything: the kill delays are too short to test"


def test_readers_see_only_committed_snapshots(runs):
    root, results = runs
    results = results["concurrent"]
    print(results["writer"], [results[r]["seconds"] for r in ("reader0", "reader1")])
    for reader in ("reader0", "reader1"):
        out = results[reader]
        assert out["bad"] == []
        assert out["seen"] == sorted(out["seen"])  # snapshots only move forward
        # the readers really overlapped with the writer (guaranteed by a handshake at batch 10 of 20)
        assert 10 * _procs.B in out["seen"] and out["seen"][-1] == 20 * _procs.B
    assert SketchStore.open(root / "concurrent" / "store").num_rows == 20 * _procs.B
