"""configs/all.yaml: all three callbacks in one run, attribution and spectrum in the ω-subspace."""

from __future__ import annotations

import json

import pytest
from cli_helpers import CONFIGS, run_many

from lightning_sketch.store import inspect_store


@pytest.mark.slow
def test_all_three_callbacks_in_one_run(tmp_path):
    argv = [
        "fit", "--config", str(CONFIGS / "all.yaml"), f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    (result,) = run_many([argv])
    assert result["returncode"] in (0, None), result["stderr"][-2000:]
    info = inspect_store(tmp_path / "sketch" / "store")
    # The trainable parameters are ω (D = 1024 coordinates), so the identity sketch stores ∇_ω rows.
    assert info["spec"]["kind"] == "identity" and info["spec"]["dim"] == 1024
    assert info["rows"] > 0
    summary = json.loads((tmp_path / "intrinsic" / "intrinsic_dimension.json").read_text())
    assert summary["spec"]["sketch"]["dim"] == 9610 and summary["active"] == 1024
    assert (tmp_path / "spectrum" / "step_00000000.npz").exists()
