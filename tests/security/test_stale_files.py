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


def test_older_and_foreign_copies_of_every_file_kind(tmp_path):
    """Each kind replaced by an intact older copy or another run's: the checks a resume or ``query --ckpt``
    makes against the checkpoint, and the report's query check, never give a silently different answer;
    another run's file is silent only in the report's intrinsic-dimension section (it has no reference)."""
    run = runkit.build(tmp_path / "a")
    other = runkit.build(tmp_path / "b", variant=1)
    silent_other, checked = [], 0
    for kind, readers in runkit.SWAP_READERS.items():
        refs = [r(run) for r in readers]
        for source in (tmp_path / "a" / "older", other):
            out = runkit.swap_sweep(run, kind, refs, source)
            if out is None:
                continue
            assert not out["untyped"], out["untyped"]
            checked += 1
            for line in out["silent"]:
                assert "_checkpoint_resume" not in line and "_query" not in line, line
                if source == other:
                    silent_other.append(line)
    assert checked == 16  # 4 kinds have an older copy, all 12 another run's
    assert [s.split(" from ")[0] for s in silent_other] == ["intrinsic-dimension state"]
