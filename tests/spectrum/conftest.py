"""Float64 MLPs and their exact Hessians (torch.func.hessian), computed once per test session.

``mlp_case`` (N = 3,004) is the Lanczos-vs-eigvalsh reference used with dense matvecs;
``small_case`` (N = 278) drives the real HVP path (each HVP of the larger one costs ~0.2-1 s here).
"""

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
    return MLPCase(model, batches, h, torch.linalg.eigvalsh(h), grad, per_example_ce)


@pytest.fixture(scope="session")
def mlp_case() -> MLPCase:
    return _build()


@pytest.fixture(scope="session")
def small_case() -> MLPCase:
    return _build((8, 16, 8, 3), seed=5)
