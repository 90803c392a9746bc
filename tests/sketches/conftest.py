"""Sketch tests run many tiny matmuls; on a loaded 2-core machine OpenMP's thread hand-off costs
~50 ms per tiny matmul against ~0.4 ms single-threaded, so these tests use one intra-op thread
(restored afterwards)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
