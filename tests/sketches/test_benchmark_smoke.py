"""The sketch benchmark script runs end to end in its --quick mode and prints its ratio tables."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_quick_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sketches.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    out = proc.stdout
    assert "### Ratios" in out and "affd/rfft" in out
    assert "Part 2 (Table 6 analogue)" in out and "ordering by required D" in out
    for kind in ("affd", "afjl", "qk", "fjl", "ffd", "affd[fft]", "affd[kron_orth]", "dense (est.)"):
        assert f"\n{kind}" in out, kind
