"""Sketch configurations shared by the sketch tests: (id, kind, options)."""

from __future__ import annotations

import pytest

CASES = [
    ("identity", "identity", {}),
    ("dense", "dense", {}),
    ("dense-chunked", "dense", {"chunked": True, "block_rows": 7}),
    ("fjl", "fjl", {}),
    ("ffd", "ffd", {}),
    ("affd", "affd", {}),
    ("affd-fft", "affd", {"preconditioner": "fft"}),
    ("affd-kron_orthogonal", "affd", {"preconditioner": "kron_orthogonal"}),
    ("affd-block4", "affd", {"max_block": 4}),
    ("afjl", "afjl", {}),
    ("afjl-fft", "afjl", {"preconditioner": "fft"}),
    ("afjl-kron_orthogonal", "afjl", {"preconditioner": "kron_orthogonal"}),
    ("qk", "qk", {}),
    ("qk-block4", "qk", {"max_block": 4}),
]

PARAMS = [pytest.param(kind, opts, id=name) for name, kind, opts in CASES]
RANDOM_PARAMS = [pytest.param(kind, opts, id=name) for name, kind, opts in CASES if kind != "identity"]
