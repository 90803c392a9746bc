"""Fixtures for the store tests: small specs, clustered rows, and sketches of real digits gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SPEC = {"kind": "dense", "dim": 1000, "sketch_dim": 16, "seed": 0}


@pytest.fixture(autouse=True)
def _single_faiss_thread():
    """One FAISS OpenMP thread in these tests: on a loaded 2-core machine spinning OpenMP threads made
    a tiny IVF-PQ build take 10 s instead of 0.07 s (measured); the results do not depend on it."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def spec() -> dict:
    return dict(SPEC)


@pytest.fixture(scope="session")
def digits_sketches() -> tuple[np.ndarray, np.ndarray]:
    """Dense-sketched (D = 128) per-example gradients of a small MLP trained on sklearn digits.

    Returns ``(train rows [1437, 128], query rows [360, 128])`` float32; exact per-example
    gradients come from ``torch.func.vmap(grad)``.
    """
    from sklearn.datasets import load_digits

    from lightning_sketch.sketches import make

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:1437]), y[:1437]).backward()
        opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([grads[k].reshape(len(x), -1) for k in params], dim=1)
    sketch = make("dense", flat.shape[1], 128, seed=0)
    rows = sketch.apply(flat).numpy().astype(np.float32)
    return rows[:1437], rows[1437:]
