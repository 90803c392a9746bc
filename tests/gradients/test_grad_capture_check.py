"""The hook paths checked against autograd (``gradients._capture_check``): models whose layers are
not batch-first, with T = B so that no shape betrays them, get exact rows from
``sketch_gradients(mode="auto")`` (through torch.func, with one warning); batch-first models keep
the hooks and warn nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from exact_refs import loop_grads
from torch import nn
from torch.nn import functional as F

from lightning_sketch.exceptions import NotBatchFirstError, SketchInputError
from lightning_sketch.gradients import GradientCapture, ParamLayout, sketch_gradients
from lightning_sketch.gradients._capture_check import hook_error, tolerance
from lightning_sketch.gradients.capture import hooked_sketch
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch

T, C = 5, 8


class SharedTable(nn.Module):
    """A learned table [T, C] projected by a Linear and added to every example: the Linear sees
    [T, C], not [B, ...], so its hooked rows are sums over the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, C)
        self.table = nn.Parameter(torch.randn(T, C))
        self.posproj = nn.Linear(C, C)
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x) + self.posproj(self.table)).mean(1))


class SeqFirst(nn.Module):
    """Transposes to [T, B, C] and applies a Linear there (sequence-first layers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, C)
        self.mix = nn.Linear(C, C)
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)  # [T, B, C]
        h = torch.tanh(self.mix(h)).cumsum(0).transpose(0, 1)  # causal mixing over positions
        return self.head(h.mean(1))


class ViTLike(nn.Module):
    """Raw parameters broadcast over the batch (position table [1, T, C], class token): the root
    module's per-module fallback serves them exactly; the hooks stay on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, C)
        self.pos = nn.Parameter(torch.randn(1, T, C))
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], 1, C), self.inp(x) + self.pos], 1)
        return self.head(torch.tanh(h).mean(1))


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _batch(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, T, 3, generator=g), torch.randint(0, 4, (size,), generator=g)


def _dense(model, d=16):
    n = sum(p.numel() for p in model.parameters())
    return make("dense", dim=n, sketch_dim=d, seed=3)


def _rel(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("cls", [SharedTable, SeqFirst])
def test_not_batch_first_with_t_equal_b_is_wrong_under_the_plain_hooks(cls):
    """The premise: with B = T the hooks give wrong rows and raise nothing."""
    model, batch = cls().eval(), _batch(T)
    got = hooked_sketch(model, loss, batch, None, ParamLayout.from_module(model))
    assert _rel(got, loop_grads(model, loss, batch)) > 0.05


@pytest.mark.parametrize("cls", [SharedTable, SeqFirst])
@pytest.mark.parametrize("size", [T, 4])
def test_auto_mode_gives_exact_rows_and_warns_once(cls, size):
    model, batch = cls().eval(), _batch(size)
    sketch = _dense(model)
    cap = GradientCapture(model, sketch, ParamLayout.from_module(model), loss_scale="sum")
    want = sketch.apply(loop_grads(model, loss, batch))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = sketch_gradients(model, loss, batch, sketch, mode="auto", capture=cap)
        again = sketch_gradients(model, loss, _batch(size, seed=2), sketch, mode="auto", capture=cap)
    assert _rel(first, want) < 1e-5
    assert _rel(again, sketch.apply(loop_grads(model, loss, _batch(size, seed=2)))) < 1e-5
    assert cap.exact is False
    msgs = [str(w.message) for w in seen]
    assert len(msgs) == 1 and "torch.func over the whole model" in msgs[0], msgs


def test_a_per_layer_sketch_is_checked_too():
    model, batch = SharedTable().eval(), _batch(T)
    layout = ParamLayout.from_module(model)
    sketch = PerLayerSketch.for_module(model, sketch_dim=24, seed=0)
    want = sketch.apply(loop_grads(model, loss, batch, layout))
    with pytest.warns(UserWarning, match="relative error"):
        got = sketch_gradients(model, loss, batch, sketch, mode="auto")
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("cls", [ViTLike, nn.Sequential])
def test_batch_first_models_keep_the_hooks_silently(cls):
    if cls is ViTLike:
        model = ViTLike().eval()
    else:
        model = nn.Sequential(nn.Linear(3, C), nn.Tanh(), nn.Flatten(), nn.Linear(T * C, 4)).eval()
    batch = _batch(T)
    sketch = _dense(model)
    cap = GradientCapture(model, sketch, ParamLayout.from_module(model), loss_scale="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sketch_gradients(model, loss, batch, sketch, mode="auto", capture=cap)
    assert cap.exact is True
    assert _rel(got, sketch.apply(loop_grads(model, loss, batch))) < 1e-5


def test_train_mode_is_not_checked():
    """Dropout masks differ between the hooked forward and a reference one: no verdict in train mode."""
    model, batch = SharedTable().train(), _batch(T)
    cap = GradientCapture(model, _dense(model), ParamLayout.from_module(model), loss_scale="sum")
    sketch_gradients(model, loss, batch, cap._sketch, mode="auto", capture=cap)
    assert cap.exact is None


def test_hook_error_measures_against_autograd():
    model, batch = SharedTable().eval(), _batch(T)
    layout = ParamLayout.from_module(model)
    exact = loop_grads(model, loss, batch)
    assert hook_error(model, loss, batch, None, layout, exact) < 1e-6
    wrong = exact.clone()
    wrong[1] *= 1.5
    assert hook_error(model, loss, batch, None, layout, wrong) == pytest.approx(
        float((0.5 * exact[1]).norm() / (torch.stack([exact[0], 1.5 * exact[1]])).norm()), rel=1e-5)
    assert tolerance(torch.float32) == 1e-2 and tolerance(torch.bfloat16) == 1e-1


def test_not_batch_first_error_is_a_sketch_input_error():
    model, batch = SharedTable().eval(), _batch(4)
    with pytest.raises(NotBatchFirstError, match="batch sizes 4 and 5"):
        hooked_sketch(model, loss, batch, None, ParamLayout.from_module(model))
    assert issubclass(NotBatchFirstError, SketchInputError)


def test_non_finite_gradients_give_no_verdict():
    model, (x, y) = SharedTable().eval(), _batch(T)
    x = x.clone()
    x[0, 0, 0] = float("nan")
    layout = ParamLayout.from_module(model)
    rows = hooked_sketch(model, loss, (x, y), None, layout)
    assert hook_error(model, loss, (x, y), None, layout, rows) is None
    cap_sketch = _dense(model)
    cap = GradientCapture(model, cap_sketch, layout, loss_scale="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sketch_gradients(model, loss, (x, y), cap_sketch, mode="auto", capture=cap)
    assert cap.exact is None  # decided on a later, finite batch
    with pytest.warns(UserWarning, match="posproj"):
        sketch_gradients(model, loss, _batch(T), cap_sketch, mode="auto", capture=cap)
    assert cap.exact is False
