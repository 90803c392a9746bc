"""2-process DDP (gloo, CPU) against a single-process run of the same data, for all three callbacks.

The DDP job runs as a script in a subprocess (never ``strategy="ddp"`` inside pytest: it would
relaunch pytest as rank 1), with the distributed environment variables removed and a free port.
The single-process reference runs the same script's ``main`` with one device, in this process. Both runs use a
float64 model, a global batch of 8 (1 x 8 or 2 x 4) and unshuffled data, so they train on the same
examples at every step; see ``scripts/ddp_run.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from _common import HERE, Tiny, clean_env, dataset, free_port, sorted_rows, two_rank_run_beside
from exact_refs import dense_hessian
from torch.utils.data import default_collate

from lightning_sketch.intrinsic import Subspace
from lightning_sketch.sketches import make
from lightning_sketch.spectrum import load_snapshot
from lightning_sketch.store import SketchStore, inspect_store, shard_path

pytestmark = pytest.mark.slow  # subprocesses and whole training runs

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    import ddp_run

    ddp, single, _ = two_rank_run_beside([str(HERE / "ddp_run.py"), str(root / "ddp"), "2"], root / "ddp",
                                         lambda: ddp_run.main(root / "single", 1), "DDP", TIMEOUT_S)
    assert single["world"] == 1
    return root, ddp, single


@pytest.mark.parametrize("which", ["attr_ckpt", "attr_inline"])
def test_gradient_sketch_shards_merge_to_the_single_process_store(runs, which):
    root, ddp, _ = runs
    if which == "attr_inline":  # both ranks used the hook fast path on their own backward
        assert ddp[0]["inline_fast"] and ddp[1]["inline_fast"]
    path = root / "ddp" / which / "store"
    info = inspect_store(path)
    assert info["health"]["ok"], info["health"]
    assert info["shards"] == ["rank0", "rank1"]
    merged, ref = SketchStore.open(path), SketchStore.open(root / "single" / which / "store")
    assert merged.checkpoints == ref.checkpoints and len(ref.checkpoints) == 2
    for name in ref.checkpoints:
        ids, vecs = sorted_rows(merged, name)
        ref_ids, ref_vecs = sorted_rows(ref, name)
        assert ids.tolist() == ref_ids.tolist() == list(range(32))
        np.testing.assert_allclose(vecs, ref_vecs, rtol=1e-5, atol=1e-7)
        assert merged.checkpoint_info(name)["lr"] == ref.checkpoint_info(name)["lr"]
        for rank in (0, 1):  # every rank wrote its own share: ids rank, rank + 2, ...
            shard = SketchStore.open(shard_path(path, rank))
            assert sorted(shard.ids(name).tolist()) == list(range(rank, 32, 2))


def _exact_sketched_hessian_eigs(weights: dict, spec: dict, ids: list[int], k: int) -> torch.Tensor:
    """Top-k eigenvalues of Φ H Φᵀ, H the float64 ``dense_hessian`` of the mean loss over ``ids``."""
    model = Tiny(dtype=torch.float64)
    model.load_state_dict(weights)
    ds = dataset(32, 1, torch.float64)
    batch = default_collate([ds[i] for i in ids])
    h = dense_hessian(model, lambda m, b: m.per_example_loss(b), [batch])
    phi = make(**spec).to_dense(torch.float64)
    return torch.linalg.eigvalsh(phi @ h @ phi.T).flip(0)[:k]


def test_hessian_spectrum_ranks_agree_with_the_single_process_operator(runs):
    root, ddp, single = runs
    # identical Krylov work on both ranks (a mismatch would deadlock the all-reduce)
    assert ddp[0]["loss_calls"] == ddp[1]["loss_calls"] == single["loss_calls"] > 0
    steps = [e["step"] for e in single["spectrum"]]
    assert steps == [0, 5]
    for e0, e1, es in zip(ddp[0]["spectrum"], ddp[1]["spectrum"], single["spectrum"]):
        assert e0["step"] == e1["step"] == es["step"] and e0["matvecs"] == e1["matvecs"]
        assert e0["eigenvalues"] == e1["eigenvalues"]
        np.testing.assert_allclose(e0["eigenvalues"], es["eigenvalues"], rtol=1e-6)
    for step in steps:
        snap = load_snapshot(root / "ddp" / "spectrum" / f"step_{step:08d}.npz")
        weights = torch.load(root / "ddp" / f"weights_step{step}.pt", weights_only=True)
        spec = snap["meta"]["sketch_spec"]
        assert snap["meta"]["world_size"] == 2
        # probe = 2 batches per rank: rank 0 holds ids 0, 2, ..., 14, rank 1 ids 1, 3, ..., 15
        exact = _exact_sketched_hessian_eigs(weights, spec, list(range(16)), k=4)
        torch.testing.assert_close(snap["eigenvalues"].double(), exact, rtol=1e-6, atol=1e-9)
        rank0_only = _exact_sketched_hessian_eigs(weights, spec, list(range(0, 16, 2)), k=4)
        assert not torch.allclose(rank0_only, exact, rtol=1e-3)  # the reduction matters


def test_intrinsic_dimension_projection_identical_and_omega_synchronised(runs):
    _, ddp, single = runs
    r0, r1, s = ddp[0]["intrinsic"], ddp[1]["intrinsic"], single["intrinsic"]
    local = Subspace.attach(Tiny(dtype=torch.float64), kind="affd", sketch_dim=64, seed=4, normalize=True)
    assert r0["checksum"] == r1["checksum"] == s["checksum"] == local.projection_checksum()
    assert r0["spec"] == r1["spec"] == local.spec
    assert r0["history"] == r1["history"] == s["history"]
    assert [h["d"] for h in r0["history"]] == [4, 4, 8, 16, 32]  # doubling decisions taken on every rank
    assert len(r0["trace"]) == len(r1["trace"]) == len(s["trace"]) == 4
    for t0, t1, ts in zip(r0["trace"], r1["trace"], s["trace"]):
        assert t0["step"] == t1["step"] and t0["active"] == t1["active"]
        assert t0["omega"] == t1["omega"]  # bit-identical on both ranks
        assert any(abs(w) > 1e-3 for w in t0["omega"])  # ω actually trained
        np.testing.assert_allclose(t0["omega"], ts["omega"], rtol=1e-9, atol=1e-12)


def test_inline_sketching_refuses_a_padding_distributed_sampler(tmp_path):
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, str(HERE / "ddp_run.py"), str(tmp_path), "2", "padded"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"the padded DDP run did not finish within {TIMEOUT_S} s:\n{text[-4000:]}")
    finally:  # rank 1 is a child of the script: never leave it behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the exit status is not the point (see ddp_run.py): rank 0's record of the refusal is
    assert (tmp_path / "padded.json").exists(), text[-4000:]
    error = json.loads((tmp_path / "padded.json").read_text())["error"]
    assert error.startswith("SketchConfigError: GradientSketch(mode='inline') under DDP: the "
                            "DistributedSampler pads the 33 training examples to 34 for 2 ranks"), error
    assert not (tmp_path / "attr_padded" / "store" / "shards").exists() or all(
        SketchStore.open(p).num_rows == 0 for p in (tmp_path / "attr_padded" / "store" / "shards").iterdir())


def test_first_step_check_waits_for_a_step_without_overflow_on_every_rank(tmp_path):
    """Rank 0's first-step rows overflow, rank 1's do not (``scripts/ddp_overflow_run.py``): both
    ranks must put the collective check of the rows against ``.grad`` off to the next step together."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, str(HERE / "ddp_overflow_run.py"), str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a child of the script: end the whole group
        _, err = proc.communicate()
        pytest.fail(f"the DDP run hung (the ranks were in different collectives):\n{err[-3000:]}")
    files = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    # Each rank writes its file after fit; a gloo teardown abort at interpreter exit after that (seen on
    # loaded 2-core machines: "terminate called without an active exception") is not a failure of the check.
    assert proc.returncode == 0 or all(f.exists() for f in files), err[-3000:]
    ranks = [json.loads(f.read_text()) for f in files]
    assert ranks == [{"checked_sum": True, "skipped_overflow_steps": 1},
                     {"checked_sum": True, "skipped_overflow_steps": 0}]
    assert "do not add up" not in err  # the step-1 check found the rows equal to .grad
