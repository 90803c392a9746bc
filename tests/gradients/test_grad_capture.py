"""GradientCapture / mode="factorized" == per_example_grads then PerLayerSketch.apply, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, UnsupportedModelError
from lightning_sketch.gradients import GradientCapture, ParamLayout, per_example_grads, sketch_gradients
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch

TOL = 1e-10


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding="valid", bias=False)
        self.c3 = nn.Conv2d(4, 2, 3, padding="same", dilation=1)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(torch.tanh(self.c3(h)).flatten(1))


class EmbedSeq(nn.Module):
    """Embedding (with padding_idx) -> Linear on [B, T, d] -> LayerNorm -> mean over T -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, t):
        h = torch.tanh(self.lin(self.emb(t)))
        return self.head(self.norm(h).mean(1))


def xent(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    conv = ConvNet().double()
    xc = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    seq = EmbedSeq().double()
    xt = torch.randint(0, 9, (5, 6))
    xt[0, :2] = 0  # padding tokens contribute no gradient
    return {
        "mlp": (mlp, (x, torch.randint(0, 3, (7,))), None),
        "conv": (conv, (xc, torch.randint(0, 3, (4,))), None),
        "embed": (seq, (xt, torch.randint(0, 3, (5,))), ["norm.*"]),
    }


@pytest.mark.parametrize(
    ("name", "inner"), [("mlp", "qk"), ("mlp", "dense"), ("conv", "qk"), ("embed", "dense")]
)
def test_capture_equals_general_path(name, inner):
    model, batch, exclude = cases()[name]
    layout = ParamLayout.from_module(model, exclude=exclude)
    sketch = PerLayerSketch.for_module(model, 24, seed=4, inner=inner, layout=layout)
    ref = sketch.apply(per_example_grads(model, xent, batch, layout=layout))
    # Inline use: an ordinary mean-reduced training backward (writes .grad, as training would).
    with GradientCapture(model, sketch, layout) as cap:
        xent(model, batch).mean().backward()
    torch.testing.assert_close(cap.sketches(), ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        sketch_gradients(model, xent, batch, sketch, mode="factorized", layout=layout),
        ref,
        atol=TOL,
        rtol=TOL,
    )


def test_capture_does_not_change_training_gradients():
    model, batch, _ = cases()["conv"]
    sketch = PerLayerSketch.for_module(model, 16, seed=0)
    xent(model, batch).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with GradientCapture(model, sketch) as cap:
        xent(model, batch).mean().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    assert cap.sketches().shape == (4, 16)
    # hooks are removed on exit: a later backward adds nothing
    before = cap.sketches().clone()
    xent(model, batch).mean().backward()
    assert torch.equal(cap.sketches(), before)


def test_factorized_leaves_grad_untouched():
    model, batch, _ = cases()["mlp"]
    sketch = PerLayerSketch.for_module(model, 10)
    sketch_gradients(model, xent, batch, sketch, mode="factorized")
    assert all(p.grad is None for p in model.parameters())


def test_capture_errors():
    model, batch, _ = cases()["embed"]
    layout = ParamLayout.from_module(model, exclude=["norm.*"])
    other = make("per_layer", layout.dim, 16, shapes=[[layout.dim]])
    with pytest.raises(SketchConfigError, match="`shapes`.*differ from the layout"):
        GradientCapture(model, other, layout)
    sk = PerLayerSketch.for_module(model, 16, layout=layout)
    with pytest.raises(SketchConfigError, match="`loss_scale` must be"):
        GradientCapture(model, sk, layout, loss_scale="none")
    with pytest.raises(SketchConfigError, match="sketch.dim"):
        GradientCapture(model, make("dense", dim=layout.dim + 1, sketch_dim=4), layout)
    with GradientCapture(model, sk, layout) as cap:
        pass
    with pytest.raises(SketchInputError, match="No per-example sketches yet"):
        cap.sketches()
    with pytest.raises(SketchInputError, match="never forms per-example gradients"):
        cap.grads()
    with GradientCapture(model, None, layout) as cap:
        xent(model, batch).mean().backward()
    with pytest.raises(SketchInputError, match="call grads"):
        cap.sketches()
    with pytest.raises(SketchConfigError, match="needs a kind='per_layer'"):
        sketch_gradients(model, xent, batch, make("dense", dim=layout.dim, sketch_dim=4), mode="factorized", layout=layout)


def test_whole_model_sketch_through_hooks():
    """A non-per_layer sketch: the hooks form [B, N] and apply it (the 'hooks' mode)."""
    model, batch, _ = cases()["embed"]
    s = make("dense", dim=ParamLayout.from_module(model).dim, sketch_dim=6, seed=0)
    ref = s.apply(per_example_grads(model, xent, batch))
    with GradientCapture(model, s) as cap:
        xent(model, batch).mean().backward()
    torch.testing.assert_close(cap.sketches(), ref, atol=TOL, rtol=TOL)


def test_scale_is_one_multiplication_of_the_exact_rows():
    """sketches(scale=s) / grads(scale=s) are s times the exact per-example rows, for every path."""
    model, batch, _ = cases()["embed"]
    layout = ParamLayout.from_module(model)
    g = per_example_grads(model, xent, batch)
    dense = make("dense", dim=layout.dim, sketch_dim=6, seed=0)
    per_layer = PerLayerSketch.for_module(model, sketch_dim=12)
    for sketch, ref in ((None, g), (dense, dense.apply(g)), (per_layer, per_layer.apply(g))):
        for scale_mode in ("mean", "sum"):
            with GradientCapture(model, sketch, loss_scale=scale_mode) as cap:
                losses = xent(model, batch)
                (losses.mean() if scale_mode == "mean" else losses.sum()).backward()
            read = cap.grads if sketch is None else cap.sketches
            torch.testing.assert_close(read(), ref, atol=TOL, rtol=TOL)
            torch.testing.assert_close(read(scale=-2.5), -2.5 * ref, atol=TOL, rtol=TOL)
        model.zero_grad()


class Folding(nn.Module):
    """The second Linear sees [2B, 3]: not batch-first, so the capture must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 1)

    def forward(self, x):
        return self.b(self.a(x).reshape(-1, 3)).reshape(x.shape[0], 2).sum(-1)


def test_capture_refuses_non_batch_first():
    model = Folding()
    with (
        pytest.raises(SketchInputError, match="batch sizes 10 and 5"),
        GradientCapture(model, PerLayerSketch.for_module(model, 8)),
    ):
        model(torch.randn(5, 4)).mean().backward()


def test_functional_calls_inside_the_context_are_ignored():
    from lightning_sketch.gradients import hvp

    model, batch, _ = cases()["mlp"]
    layout = ParamLayout.from_module(model)
    sketch = PerLayerSketch.for_module(model, 12, seed=1)
    ref = sketch.apply(per_example_grads(model, xent, batch))
    v = torch.randn(layout.dim, dtype=torch.float64)
    with GradientCapture(model, sketch) as cap:
        xent(model, batch).mean().backward()
        per_example_grads(model, xent, batch)
        for method in ("fwd_rev", "double_backward", "finite_difference"):
            hvp(model, xent, batch, v, method=method)
    torch.testing.assert_close(cap.sketches(), ref, atol=TOL, rtol=TOL)


def test_bf16_autocast_sketches_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    sketch = PerLayerSketch.for_module(model, 10, seed=0)
    ref = sketch.apply(per_example_grads(model, xent, batch))
    with GradientCapture(model, sketch) as cap, torch.autocast("cpu", dtype=torch.bfloat16):
        xent(model, batch).mean().backward()
    assert cap.sketches().dtype == torch.float32
    # bf16 activations and gradients carry ~3 significant digits
    torch.testing.assert_close(cap.sketches(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
