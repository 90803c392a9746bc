"""Byte-flip and truncation sweeps over every kind of file in a run directory (issue 11, findings 3-4).

Each damaged copy is read by the readers of that file kind (``Attributor`` scores, store search,
``inspect_store``, weights, spectrum snapshots, the report's intrinsic and query sections); every
outcome must be the reference answer or a typed library error: zero silently different answers,
zero untyped exceptions. Positions are seeded random samples (the full sweeps behind the figures
in docs/reliability.md are ``benchmarks/reliability.py``).
"""

from __future__ import annotations

import pytest
import runkit


@pytest.fixture(scope="module")
def run_and_refs(tmp_path_factory):
    run = runkit.build(tmp_path_factory.mktemp("sweep"))
    return run, runkit.references(run)


@pytest.mark.parametrize("kind", list(runkit.KINDS))
def test_flips_and_truncations_are_detected_or_harmless(run_and_refs, kind):
    run, refs = run_and_refs
    seed = sorted(runkit.KINDS).index(kind)
    out = runkit.sweep(run, kind, refs[kind], flips=6, cuts=3, seed=seed)
    assert out["tried"] >= 9
    assert out["silent"] == [] and out["untyped"] == [], out
    assert out["typed"] >= out["tried"] // 2  # most damage is caught, not merely harmless
    for reader, ref in zip(runkit.KINDS[kind][1], refs[kind]):  # the intact files are restored
        assert runkit.classify(reader, run, ref)[0] == "same"
