"""Subspace θ = θ0 + Φᵀω: exactness against float64 references (Li et al. 2018; arXiv 2402.03994 eqs. 4-5 and 10)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_sketch.exceptions import SketchConfigError, SubspaceError, UnsupportedModelError
from lightning_sketch.intrinsic import Subspace
from lightning_sketch.sketches import make


KINDS = ["dense", "ffd", "affd", "afjl", "qk"]


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(11, 5, generator=g, dtype=dtype), torch.randint(0, 3, (11,), generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True], ids=["plain", "said"])
def test_omega_zero_is_theta0_bit_exact(kind, said):
    net = _mlp(torch.float32)
    x, _ = _data(torch.float32)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = net(x)
    Subspace.attach(net, kind=kind, sketch_dim=16 + 4 * said, seed=3, said=said)  # ω keeps 16 coordinates
    assert torch.equal(net(x), out)
    assert torch.equal(net[0].weight, before["0.weight"]) and torch.equal(net[2].bias, before["2.bias"])


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_omega_equals_sketch_of_ordinary_grad(kind, normalize):
    """∇_ω L(θ0 + cΦᵀω) = c Φ ∇_θ L(θ), at a non-zero ω, float64 (c = 1, or √(D/N) normalised)."""
    net = _mlp()
    x, y = _data()
    ref = copy.deepcopy(net)
    sub = Subspace.attach(net, kind=kind, sketch_dim=16, seed=5, normalize=normalize)
    with torch.no_grad():
        sub.omega.copy_(torch.linspace(-0.3, 0.4, 16, dtype=torch.float64))
    theta = sub.delta().detach() + torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    torch.nn.utils.vector_to_parameters(theta, ref.parameters())
    _loss(ref, x, y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    _loss(net, x, y).backward()
    phi = make(**sub.spec["sketch"])
    expected = (math.sqrt(16 / sub.layout.dim) if normalize else 1.0) * phi.apply(g)
    torch.testing.assert_close(sub.omega.grad, expected, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for n, p in net.named_parameters() if "original" in n)



def test_attach_defaults_like_the_callback():
    """Subspace.attach and IntrinsicDimension both draw qk and scale Φᵀ by √(D/N) unless told otherwise."""
    import inspect

    from lightning_sketch.callbacks import IntrinsicDimension

    callback_default = inspect.signature(IntrinsicDimension).parameters["normalize"].default
    assert inspect.signature(Subspace.attach).parameters["normalize"].default is callback_default is True
    kind = inspect.signature(IntrinsicDimension).parameters["sketch_kind"].default
    assert inspect.signature(Subspace.attach).parameters["kind"].default == kind == "qk"
    plain = Subspace.attach(_mlp(), kind="dense", sketch_dim=8, seed=2, normalize=False)
    sub = Subspace.attach(_mlp(), kind="dense", sketch_dim=8, seed=2)
    assert sub.normalize and sub.spec["normalize"] is True
    with torch.no_grad():
        plain.omega.fill_(0.5)
        sub.omega.fill_(0.5)
    torch.testing.assert_close(sub.delta(), math.sqrt(8 / sub.layout.dim) * plain.delta())

def test_only_omega_trainable_and_optimizer_over_parameters_trains_it():
    net = _mlp()
    sub = Subspace.attach(net, kind="dense", sketch_dim=8)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["intrinsic_subspace.omega"]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _data()
    theta0 = net[0].parametrizations.weight.original.detach().clone()
    _loss(net, x, y).backward()
    opt.step()
    assert sub.omega.abs().sum() > 0
    assert torch.equal(net[0].parametrizations.weight.original, theta0)
    assert not torch.equal(net[0].weight, theta0)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_masking_freezes_masked_coordinates_through_optimizer_steps(opt_cls):
    net = _mlp()
    sub = Subspace.attach(net, kind="dense", sketch_dim=12, seed=1)
    with torch.no_grad():
        sub.omega[6:].fill_(0.25)  # non-zero masked values must be kept
    sub.set_active(6)
    opt = opt_cls(net.parameters(), lr=0.1)
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        _loss(net, x, y).backward()
        assert torch.all(sub.omega.grad[6:] == 0) and sub.omega.grad[:6].abs().sum() > 0
        opt.step()
    assert torch.all(sub.omega[6:] == 0.25)
    assert torch.all(sub.omega[:6] != 0)
    sub.set_active(12)  # doubling: unmasked coordinates train, learned ones are kept
    kept = sub.omega[:6].detach().clone()
    opt.zero_grad()
    _loss(net, x, y).backward()
    assert torch.all(sub.omega.grad[6:] != 0)
    assert torch.equal(sub.omega[:6], kept)


def test_said_bookkeeping():
    """C14: trainable count == d exactly (ω of size d − m plus m λ's), λ starts at 1, ω = 0 gives θ0."""
    net = _mlp()
    x, y = _data()
    out = net(x)
    sub = Subspace.attach(net, kind="dense", sketch_dim=10, said=True)
    m = 4  # two weights, two biases
    assert sub.omega.numel() == 10 - m and sub.said_scale.numel() == m
    assert torch.equal(sub.said_scale, torch.ones(m, dtype=torch.float64))
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 10 == sub.num_trainable
    assert torch.equal(net(x), out)
    sub.set_active(7)
    assert sub.num_trainable == 7 and int(sub.active_mask.sum()) == 3
    with torch.no_grad():
        sub.omega.normal_()
    _loss(net, x, y).backward()
    assert sub.said_scale.grad.abs().sum() > 0 and torch.all(sub.omega.grad[3:] == 0)
    # λ_i scales exactly the i-th tensor's slice of Φᵀω
    with torch.no_grad():
        d0 = net[0].weight - net[0].parametrizations.weight.original
        sub.said_scale[0] = 2.0
        torch.testing.assert_close(net[0].weight - net[0].parametrizations.weight.original, 2 * d0)
        theta = torch.cat([getattr(net[i], n).reshape(-1) for i in (0, 2) for n in ("weight", "bias")])
        theta0 = torch.cat([net[i].parametrizations[n].original.reshape(-1) for i in (0, 2) for n in ("weight", "bias")])
        torch.testing.assert_close(sub.delta(), theta - theta0, rtol=0, atol=1e-15)
    with pytest.raises(SubspaceError, match="SAID scalars included"):
        sub.set_active(4)


def test_detach_round_trip_and_normal_training_after():
    net = _mlp()
    x, y = _data()
    sub = Subspace.attach(net, kind="dense", sketch_dim=8, seed=2)
    with torch.no_grad():
        sub.omega.normal_()
    out = net(x)
    sub.detach()
    assert torch.equal(net(x), out)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(p.requires_grad for p in net.parameters()) and not hasattr(net, "intrinsic_subspace")
    _loss(net, x, y).backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(SubspaceError, match="already detached"):
        sub.detach()
    Subspace.attach(net, kind="dense", sketch_dim=8)  # re-attaching after detach is allowed


def test_state_dict_holds_omega_spec_active_not_matrix_and_reloads():
    net = _mlp()
    sub = Subspace.attach(net, kind="dense", sketch_dim=8, seed=4)
    sub.set_active(4)
    with torch.no_grad():
        sub.omega[:4].normal_()
    sd = net.state_dict()
    assert sd["intrinsic_subspace.omega"].shape == (8,)
    n = sub.layout.dim
    assert all(t.numel() < 8 * n for t in sd.values() if torch.is_tensor(t))
    x, _ = _data()
    fresh = _mlp()
    sub2 = Subspace.attach(fresh, kind="dense", sketch_dim=8, seed=4)
    fresh.load_state_dict(sd)
    assert sub2.active == 4 and torch.equal(fresh(x), net(x))
    assert sub2.projection_checksum() == sub.projection_checksum()
    other = _mlp()
    Subspace.attach(other, kind="dense", sketch_dim=8, seed=5)
    with pytest.raises(SubspaceError, match="`sketch`"):
        other.load_state_dict(sd)


def test_delta_computed_once_per_forward(monkeypatch):
    net = _mlp()
    sub = Subspace.attach(net, kind="dense", sketch_dim=8)
    calls = []
    orig = sub.sketch.transpose
    object.__setattr__(sub, "sketch", type("Spy", (), {"transpose": lambda self, y: calls.append(1) or orig(y),
                                                      "sketch_dim": 8, "spec": sub.sketch.spec})())
    x, _ = _data()
    net(x)
    assert len(calls) == 1
    net[0](x)  # a hooked submodule called on its own opens its own scope
    assert len(calls) == 2


def test_projection_checksum_depends_on_seed_only():
    a, b, c = _mlp(), _mlp(), _mlp()
    sa = Subspace.attach(a, kind="dense", sketch_dim=8, seed=1)
    sb = Subspace.attach(b, kind="dense", sketch_dim=8, seed=1)
    sc = Subspace.attach(c, kind="dense", sketch_dim=8, seed=2)
    assert sa.projection_checksum() == sb.projection_checksum() != sc.projection_checksum()


def test_errors():
    net = _mlp()
    with pytest.raises(SubspaceError, match="must be a torch.nn.Module"):
        Subspace.attach("net", kind="dense", sketch_dim=4)
    with pytest.raises(SubspaceError, match="sketch_dim"):
        Subspace.attach(net, kind="dense", sketch_dim=4, said=True)
    with pytest.raises(SubspaceError, match="`said` must be a bool"):
        Subspace.attach(net, kind="dense", sketch_dim=4, said=1)
    with pytest.raises(SketchConfigError, match="Unknown sketch kind"):
        Subspace.attach(net, kind="nope", sketch_dim=4)
    with pytest.raises(SketchConfigError, match="sketch_dim - m = 16 - 4"):
        Subspace.attach(net, kind="ffd", sketch_dim=16, said=True)
    sub = Subspace.attach(net, kind="dense", sketch_dim=4)
    with pytest.raises(SubspaceError, match="already has a subspace"):
        Subspace.attach(net, kind="dense", sketch_dim=4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(SubspaceError, match="`d` must be an int"):
            sub.set_active(bad)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedModelError, match="Tied"):
        Subspace.attach(tied, kind="dense", sketch_dim=4)
    lin = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", nn.Identity())
    with pytest.raises(SubspaceError, match="parametrisations"):
        Subspace.attach(lin, kind="dense", sketch_dim=4)


def test_module_to_dtype_and_deepcopy_after_attach():
    net = _mlp(torch.float64)
    sub = Subspace.attach(net, kind="dense", sketch_dim=8, seed=1)
    sub.set_active(4)
    with torch.no_grad():
        sub.omega[:4].normal_()
    twin = copy.deepcopy(net)
    x, y = _data()
    assert torch.equal(twin(x), net(x))
    net.float()
    assert sub.omega.dtype == torch.float32 and net[0].weight.dtype == torch.float32
    _loss(net, x.float(), y).backward()
    assert torch.all(sub.omega.grad[4:] == 0) and sub.omega.grad[:4].abs().sum() > 0
    twin_sub = Subspace.of(twin)
    assert twin_sub is not sub and twin_sub.active == 4
    _loss(twin, x, y).backward()
    assert torch.all(twin_sub.omega.grad[4:] == 0) and sub.omega.grad.dtype == torch.float32


def test_tied_weights_refusal_names_the_exclude_that_works():
    import ast
    import re

    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    with pytest.raises(UnsupportedModelError, match=r"\['0.weight', '2.weight'\]") as err:
        Subspace.attach(tied, kind="dense", sketch_dim=4, exclude=["2.bias"])
    suggested = ast.literal_eval(re.search(r"exclude=(\[[^\]]*\])", str(err.value)).group(1))
    assert suggested == ["2.bias", "0.weight"]  # given patterns kept, the shared tensor's first name added
    sub = Subspace.attach(tied, kind="dense", sketch_dim=2, exclude=suggested)
    assert sub.layout.names == ("0.bias",)
    assert tied[0].weight is tied[2].weight  # still one tensor, left out of the subspace


def test_one_split_of_the_lift_per_forward_not_one_slice_per_tensor():
    """The backward of a slice of Φᵀω zero-fills a whole [N] gradient: with one slice per tensor a
    step costs O(N · #tensors) (MiniLM: 103 tensors). The pieces come from one split node instead."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(5)])
    Subspace.attach(net, kind="dense", sketch_dim=12, seed=0)
    out = net(torch.randn(3, 6)).sum()
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert sum("Split" in n for n in names) == 1, names
    assert not any(n.startswith("Slice") for n in names), names
