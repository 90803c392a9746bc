"""2-process FSDP2 (``ModelParallelStrategy`` + ``fully_shard``, gloo, CPU) against a single-process run.

Every parameter of the model is a DTensor shard (``scripts/fsdp_run.py``). GradientSketch (checkpoint
and inline modes) and HessianSpectrum (``double_backward`` and ``fwd_rev``) must give what one process
with the same global batches gives (``scripts/ddp_run.py`` with one device, checked against exact
dense Hessians in ``test_ddp.py``); IntrinsicDimension must be refused at setup with a typed error
naming DDP. The FSDP2 job runs as a script in a subprocess, as in ``test_ddp.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _common import HERE, sorted_rows, two_rank_run_beside

from lightning_sketch.store import SketchStore, inspect_store

pytestmark = pytest.mark.slow  # a subprocess and whole training runs

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    import ddp_run

    fsdp, single, out = two_rank_run_beside([str(HERE / "fsdp_run.py"), str(root / "fsdp")], root / "fsdp",
                                            lambda: ddp_run.fit_a(root / "single", 1), "FSDP2", TIMEOUT_S)
    assert single["world"] == 1
    return root, fsdp, single, out


@pytest.mark.parametrize("which", ["attr_ckpt", "attr_inline"])
def test_gradient_sketch_rows_equal_the_single_process_store(runs, which):
    root, fsdp, _, _ = runs
    if which == "attr_inline":  # the hook fast path on FSDP2's own backward
        assert fsdp[0]["inline_fast"] and fsdp[1]["inline_fast"]
    path = root / "fsdp" / which / "store"
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


@pytest.mark.parametrize("method", ["double_backward", "fwd_rev"])
def test_hessian_spectrum_matches_the_single_process_eigenvalues(runs, method):
    _, fsdp, single, _ = runs
    ref = single["spectrum"]  # double_backward, k=4, same probe, sketch and tolerances
    got0, got1 = fsdp[0]["spectrum"][method], fsdp[1]["spectrum"][method]
    assert [e["step"] for e in got0] == [e["step"] for e in ref] == [0, 5]
    for e0, e1, es in zip(got0, got1, ref):
        assert e0["eigenvalues"] == e1["eigenvalues"]  # identical on both ranks
        k = len(e0["eigenvalues"])
        np.testing.assert_allclose(e0["eigenvalues"], es["eigenvalues"][:k], rtol=1e-6)
    assert fsdp[0]["loss_calls"] == fsdp[1]["loss_calls"] == single["loss_calls"] > 0


def test_intrinsic_dimension_is_refused_at_setup_naming_ddp(runs):
    root, fsdp, _, _ = runs
    for rank in fsdp:
        msg = rank["intrinsic"]
        assert msg.startswith("UnsupportedStrategyError: IntrinsicDimension does not support "
                              "ModelParallelStrategy"), msg
        assert "strategy='ddp'" in msg
    assert not (root / "fsdp" / "intrinsic").exists()  # refused at setup, before its directory was made


def test_no_warning_from_the_callbacks(runs):
    *_, out = runs  # e.g. the inline first-step check of rows against the (sharded) .grad
    ours = [line for line in out.splitlines()
            if "Warning" in line and ("GradientSketch" in line or "HessianSpectrum" in line)]
    assert not ours, ours
