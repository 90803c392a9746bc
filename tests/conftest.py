"""Shared fixtures. Keep them tiny: the whole suite must stay well under 10 minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed the global RNG, and run on one torch thread (restored afterwards).

    The models under test are tiny: one thread is as fast as two on an idle machine and many times
    faster on a shared one, where two OpenMP threads spend most of their time handing work over
    (measured: a small matmul 50 ms on two contended threads against 0.4 ms on one).
    """
    torch.manual_seed(1234)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
