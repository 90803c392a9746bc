"""Lightning-level SIGKILLs that used to leave a run that could not continue (``scripts/lightning_kill.py``).

Each case kills a training run at the N-th event of one kind, then continues it the way a user
would (from the latest checkpoint, else a fresh fit), in one subprocess that forks a child per
phase. Checked: the killed child died by SIGKILL, the continued fit finished, no row the resumed
checkpoint acknowledged is lost or changed, no id is stored twice in a slice, no temporary file
is left, and for a run Lightning resumes exactly (``-mid``: a resumable loader) the store, spectrum
index and search history equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _common import HERE, clean_env

pytestmark = pytest.mark.slow  # subprocesses and whole training runs

CASES = [
    # inline, killed inside the first on_save_checkpoint after GradientSketch's hook: rows committed,
    # no checkpoint file, so the continuation is a fresh fit, which must discard those orphan rows
    # (not refuse the non-empty store) and end with the uninterrupted run's store
    ("inline-mid", "save_after", 1),
    # inline, mid-epoch checkpoints, killed mid-epoch: Lightning replays batches of the epoch
    ("inline-midplain", "batch_end", 5),
    # inline, checkpoint saved at on_train_epoch_end: Lightning replays one batch of that epoch
    ("inline-epoch", "batch_end", 7),
    # inline, resumable loader: the resumed store equals the uninterrupted one
    ("inline-mid", "batch_end", 5),
    # checkpoint mode with mid-epoch checkpoints, killed mid-commit
    ("ckpt-mid", "publish", 4),
    # a temporary file left by a killed atomic write (store, weights, curvature, spectrum) is removed
    ("ckpt-mid", "tmp", 7),
    # HessianSpectrum / IntrinsicDimension killed mid-epoch with mid-epoch checkpoints
    ("ckpt-mid", "batch_start", 8),
    ("intrinsic-midplain", "tmp", 5),
    # killed at the last epoch end, after the checkpoint of the last step: Lightning resumes it as a
    # finished fit and runs no training hook, so HessianSpectrum must have taken its last snapshot
    # before that checkpoint
    ("ckpt-mid", "epoch_end", 3),
    # killed in the last atomic write of a search, the plot intrinsic_dimension.png: its temporary file
    # is removed by the continued run
    ("intrinsic-mid", "tmp", 8),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lk")
    configs = sorted({c for c, _, _ in CASES})
    jobs = [f"{root / str(i)}:{c}:{k}:{n}" for i, (c, k, n) in enumerate(CASES)]
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import lightning_kill as lk; "
            f"from pathlib import Path; "
            f"refs = {{c: lk.run(Path({str(root)!r}) / ('ref-' + c), c) for c in {configs!r}}}; "
            f"print(json.dumps({{'refs': refs, 'status': lk.fork_all({jobs!r})}}))")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, jobs, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[":".join(map(str, c)) for c in CASES])
def test_killed_run_continues_without_losing_or_duplicating_rows(outcomes, case):
    sys.path.insert(0, str(HERE))
    import lightning_kill as lk

    root, jobs, out = outcomes
    config = CASES[case][0]
    status = out["status"][jobs[case]]
    errors = {p.name: p.read_text() for p in (root / str(case)).glob("*.error")}
    assert status == {"killed": -9, "continued": 0}, errors
    got = json.loads((root / str(case) / "continued.json").read_text())
    res = lk.compare(got, out["refs"][config], exact=config.endswith("-mid"))
    assert res == {"lost": 0, "duplicated": 0, "ref_lost": 0, "different": 0, "other": 0, "tmp_files": 0}, res
    if config.startswith(("ckpt", "inline")):
        assert got["slices"] and all(s["ids"] for s in got["slices"].values())


def test_replayed_inline_rows_are_counted_not_duplicated(outcomes):
    root, jobs, out = outcomes
    got = json.loads((root / "1" / "continued.json").read_text())
    assert got["resumed"] is True
    assert sum(s["skipped_duplicates"] for s in got["slices"].values()) > 0
    assert all(len(s["ids"]) == len(set(s["ids"])) for s in got["slices"].values())


def test_last_spectrum_snapshot_survives_a_kill_after_the_last_checkpoint(outcomes):
    """The last step's snapshot is in the checkpoint of the last step (the resumed fit runs no hook)."""
    root, jobs, out = outcomes
    case = CASES.index(("ckpt-mid", "epoch_end", 3))
    got = json.loads((root / str(case) / "continued.json").read_text())
    assert got["resumed"] is True
    assert [e["step"] for e in got["spectrum"]] == [e["step"] for e in out["refs"]["ckpt-mid"]["spectrum"]]
