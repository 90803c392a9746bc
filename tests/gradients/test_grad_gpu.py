"""CUDA runs of the gradient functions equal the CPU ones (float64). Needs a GPU; run with ``-m gpu``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sketch.gradients import (
    GradientCapture,
    ParamLayout,
    hvp,
    per_example_grads,
    sketch_gradients,
    sketched_hvp,
)
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOL = 1e-9


def xent(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def case(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model.to(device), (x.to(device), y.to(device))


def test_cuda_matches_cpu():
    cpu_model, cpu_batch = case("cpu")
    gpu_model, gpu_batch = case("cuda")
    layout = ParamLayout.from_module(cpu_model)
    g_cpu = per_example_grads(cpu_model, xent, cpu_batch)
    g_gpu = per_example_grads(gpu_model, xent, gpu_batch, chunk_size=4)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=TOL, rtol=TOL)
    v = torch.randn(layout.dim, dtype=torch.float64)
    for method in ("fwd_rev", "double_backward", "finite_difference"):
        tol = 1e-6 if method == "finite_difference" else TOL
        ref = hvp(cpu_model, xent, cpu_batch, v, method=method)
        got = hvp(gpu_model, xent, gpu_batch, v.cuda(), method=method)
        torch.testing.assert_close(got.cpu(), ref, atol=tol, rtol=tol, msg=method)
    for kind in ("dense", "affd", "qk"):
        sketch = make(kind, dim=layout.dim, sketch_dim=16, seed=0)
        w = torch.randn(2, 16, dtype=torch.float64)
        ref = sketched_hvp(cpu_model, xent, cpu_batch, sketch, w)
        for mode in ("explicit", "implicit"):
            got = sketched_hvp(gpu_model, xent, gpu_batch, sketch, w.cuda(), mode=mode)
            torch.testing.assert_close(got.cpu(), ref, atol=TOL, rtol=TOL, msg=f"{kind} {mode}")
            sk = sketch_gradients(gpu_model, xent, gpu_batch, sketch, mode=mode)
            torch.testing.assert_close(
                sk.cpu(), sketch.apply(g_cpu), atol=TOL, rtol=TOL, msg=f"{kind} {mode}"
            )
    per_layer = PerLayerSketch.for_module(cpu_model, 20, seed=2)
    with GradientCapture(gpu_model, per_layer) as cap:
        xent(gpu_model, gpu_batch).mean().backward()
    torch.testing.assert_close(cap.sketches().cpu(), per_layer.apply(g_cpu), atol=TOL, rtol=TOL)
