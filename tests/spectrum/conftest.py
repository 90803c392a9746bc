"""A small float64 MLP (N = 3,004) and its exact Hessian, computed once per test session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call


@dataclass
class MLPCase:
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    hessian: Tensor  # [N, N] float64, of the mean loss over all probe examples
    eigvals: Tensor  # [N] ascending
    grad: Tensor  # [N]


def per_example_ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y, reduction="none")


def _build() -> MLPCase:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.5 / max(p.shape[-1], 1) ** 0.5))
    x = torch.randn(32, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=g)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: Tensor) -> Tensor:
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[off : off + s.numel()].reshape(s)
            off += s.numel()
        return torch.stack([per_example_ce(lambda inp: functional_call(model, params, (inp,)), b).mean()
                            for b in batches]).mean()

    h = torch.func.hessian(loss)(theta)
    h = 0.5 * (h + h.T)
    grad = torch.func.grad(loss)(theta)
    return MLPCase(model, batches, h, torch.linalg.eigvalsh(h), grad)


@pytest.fixture(scope="session")
def mlp_case() -> MLPCase:
    return _build()
