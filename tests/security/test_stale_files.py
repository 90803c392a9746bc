"""Intact files of another run or an older generation, read without a checkpoint: the report refuses a
query result answered from another run's store or from another generation of this run's store."""

from __future__ import annotations

import shutil

import numpy as np
import runkit

from lightning_sketch.report import _attribution_section
from lightning_sketch.store import SketchStore


def test_report_refuses_a_stale_or_foreign_query_result(tmp_path):
    run, other = runkit.build(tmp_path / "r"), runkit.build(tmp_path / "o")
    text = str(_attribution_section(run, None))
    assert "is refused" not in text and "0.5" in text
    shutil.copy(other / "query.json", run / "query.json")  # intact, from another run
    text = str(_attribution_section(run, None))
    assert "query.json is refused" in text and "another run" in text
    shutil.copy(other / "query.json", other / "kept.json")
    with SketchStore.open(other / "store", mode="a") as st:  # the store moves on: the result is stale
        st.add_checkpoint("step-9", step=9, lr=0.1)
        st.append([0], np.ones((1, st.sketch_dim), np.float32), checkpoint="step-9")
        st.commit()
    text = str(_attribution_section(other, None))
    assert "query.json is refused" in text and "stale" in text and "generation" in text
