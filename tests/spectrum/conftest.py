"""Float64 MLPs and their exact Hessians (``exact_refs.dense_hessian``), computed once per test session.

``mlp_case`` (N = 3,004) is the Lanczos-vs-eigvalsh reference used with dense matvecs;
``small_case`` (N = 278) drives the real HVP path (each HVP of the larger one costs ~0.2-1 s here).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from exact_refs import dense_hessian, loop_grads
from torch import Tensor, nn


@dataclass
class MLPCase:
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    hessian: Tensor  # [N, N] float64, of the mean loss over all probe examples
    eigvals: Tensor  # [N] ascending
    grad: Tensor  # [N]
    loss_fn: object = None


def per_example_ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y, reduction="none")


def _build(widths: tuple[int, ...] = (20, 64, 24, 4), seed: int = 7) -> MLPCase:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.5 / max(p.shape[-1], 1) ** 0.5))
    x = torch.randn(32, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (32,), generator=g)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    h = dense_hessian(model, per_example_ce, batches)
    h = 0.5 * (h + h.T)
    grad = loop_grads(model, per_example_ce, (x, y)).mean(0)
    return MLPCase(model, batches, h, torch.linalg.eigvalsh(h), grad, per_example_ce)


@pytest.fixture(scope="session")
def mlp_case() -> MLPCase:
    return _build()


@pytest.fixture(scope="session")
def small_case() -> MLPCase:
    return _build((8, 16, 8, 3), seed=5)
