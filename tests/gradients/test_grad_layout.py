"""ParamLayout: order, selection, (un)flattening, fingerprint and mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_sketch.exceptions import LayoutMismatchError, SketchConfigError, SketchInputError
from lightning_sketch.gradients import ParamLayout


def net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    m[1].bias.requires_grad_(False)  # frozen: not part of θ
    return m


def test_order_selection_and_offsets():
    layout = ParamLayout.from_module(net())
    assert layout.names == ("0.weight", "0.bias", "1.weight", "2.weight", "2.bias")
    assert layout.shapes == ((4, 3), (4,), (4,), (2, 4), (2,))
    assert layout.numels == (12, 4, 4, 8, 2) and layout.offsets == (0, 12, 16, 20, 28) and layout.dim == 30
    sub = ParamLayout.from_module(net(), include=["0.*", "2.*"], exclude="*.bias")
    assert sub.names == ("0.weight", "2.weight")


def test_flatten_unflatten_roundtrip_and_batched():
    model = net()
    layout = ParamLayout.from_module(model)
    params = layout.params(model)
    flat = layout.flatten(params)
    expected = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in layout.names])
    assert torch.equal(flat, expected)
    assert torch.equal(layout.flatten(list(params.values())), flat)
    batched = torch.randn(5, 2, layout.dim)
    parts = layout.unflatten(batched)
    assert parts["2.weight"].shape == (5, 2, 2, 4)
    assert torch.equal(layout.flatten(parts), batched)
    assert all(not t.requires_grad for t in params.values())


def test_fingerprint_and_dict_roundtrip():
    a = ParamLayout.from_module(net())
    d = json.loads(json.dumps(a.to_dict()))
    b = ParamLayout.from_dict(d)
    assert b == a and b.fingerprint() == a.fingerprint() and len(a.fingerprint()) == 64
    a.check_compatible(b)
    other = ParamLayout.from_module(net(), exclude="0.bias")
    assert other.fingerprint() != a.fingerprint()
    d["shapes"][0] = [3, 4]
    with pytest.raises(LayoutMismatchError, match="fingerprint mismatch.*edited"):
        ParamLayout.from_dict(d)
    with pytest.raises(LayoutMismatchError, match="not a ParamLayout dict"):
        ParamLayout.from_dict({"names": ["a"]})


def test_check_compatible_names_the_differences():
    a = ParamLayout(("w", "b"), ((2, 3), (2,)))
    with pytest.raises(LayoutMismatchError, match=r"only in this layout \['b'\]; only in the other \['c'\]"):
        a.check_compatible(ParamLayout(("w", "c"), ((2, 3), (2,))))
    with pytest.raises(LayoutMismatchError, match=r"shape differs .* \[\('w', \(2, 3\), \(3, 2\)\)\]"):
        a.check_compatible(ParamLayout(("w", "b"), ((3, 2), (2,))))
    with pytest.raises(LayoutMismatchError, match="Same parameters, different order"):
        a.check_compatible(ParamLayout(("b", "w"), ((2,), (2, 3))))


def test_params_mismatch_and_input_errors():
    layout = ParamLayout.from_module(net())
    with pytest.raises(LayoutMismatchError, match=r"missing \[.*'2.bias'\]"):
        layout.params(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False)))
    with pytest.raises(LayoutMismatchError, match=r"shape mismatches .*'0.weight', \(4, 3\), \(5, 3\)"):
        layout.params(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(SketchInputError, match="last dimension N = 30"):
        layout.unflatten(torch.zeros(29))
    with pytest.raises(SketchInputError, match=r"lacks layout parameter\(s\) \['2.bias'\]"):
        layout.flatten({n: t for n, t in layout.unflatten(torch.zeros(30)).items() if n != "2.bias"})
    with pytest.raises(SketchInputError, match="must end with shape"):
        layout.flatten([torch.zeros(3, 4)] + [torch.zeros(s) for s in layout.shapes[1:]])
    with pytest.raises(SketchInputError, match="must hold 5 tensors"):
        layout.flatten([torch.zeros(4, 3)])
    with pytest.raises(SketchInputError, match="leading dims"):
        layout.flatten([torch.zeros(2, *s) for s in layout.shapes[:-1]] + [torch.zeros(3, 2)])


def test_construction_errors():
    with pytest.raises(SketchConfigError, match="No trainable parameter .* include='nothing\\*'"):
        ParamLayout.from_module(net(), include="nothing*")
    with pytest.raises(SketchConfigError, match="`include` must be None, a str or a list"):
        ParamLayout.from_module(net(), include=[1])
    with pytest.raises(SketchConfigError, match="`module` must be a torch.nn.Module"):
        ParamLayout.from_module("model")
    with pytest.raises(SketchConfigError, match="`names` must be unique"):
        ParamLayout(("a", "a"), ((1,), (1,)))
    with pytest.raises(SketchConfigError, match="differ in length"):
        ParamLayout(("a",), ())
    with pytest.raises(SketchConfigError, match="at least one parameter"):
        ParamLayout((), ())


def test_restrict_selects_the_sub_layout_coordinates():
    """For the Attributor: vectors over the whole model meet rows stored with include/exclude."""
    import pytest
    import torch

    from lightning_sketch.exceptions import LayoutMismatchError
    from lightning_sketch.gradients import ParamLayout

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    full = ParamLayout.from_module(model)
    sub = ParamLayout.from_module(model, exclude=["1.*"])
    vecs = torch.randn(5, full.dim)
    got = sub.restrict(vecs, full)
    parts = full.unflatten(vecs)
    want = sub.flatten({n: parts[n] for n in sub.names})
    assert torch.equal(got, want) and got.shape == (5, sub.dim)
    with pytest.raises(LayoutMismatchError, match=r"\['1.weight', '1.bias'\]"):
        full.restrict(torch.randn(sub.dim), sub)


def test_module_loss_fn():
    import pytest
    import torch

    from lightning_sketch.exceptions import SketchConfigError
    from lightning_sketch.gradients import module_loss_fn

    class M(torch.nn.Module):
        def per_example_loss(self, batch):
            return batch["x"].sum(-1)

    assert module_loss_fn(M())(M(), {"x": torch.ones(2, 3)}).tolist() == [3.0, 3.0]
    with pytest.raises(SketchConfigError, match="per_example_loss"):
        module_loss_fn(torch.nn.Linear(2, 2))
