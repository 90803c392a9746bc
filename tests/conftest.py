"""Shared fixtures. Keep them tiny: the whole suite must stay well under 10 minutes on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two threads, as on CI; FAISS and torch share them.
torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
