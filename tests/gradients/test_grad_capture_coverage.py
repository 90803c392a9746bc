"""The hook path (fast path + per-module fallback) equals the torch.func per-example reference.

Reference: ``per_example_grads`` (``vmap(grad)`` over the whole model, float64), or for models that
``vmap`` cannot run (Hugging Face), a loop of ordinary backward passes over one-example batches.
Both are independent of the hooks under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients import GradientCapture, ParamLayout, per_example_grads, sketch_gradients
from lightning_sketch.gradients.capture import capture_support
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch

TOL = {"atol": 1e-10, "rtol": 1e-9}


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` (weight ``[in, out]``), written out so tests need no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class HFRMSNorm(nn.Module):
    """A custom RMSNorm class (as Llama's): not an nn.RMSNorm, so it goes through the fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.s.tanh()


class SeqNet(nn.Module):
    """Tokens -> Embedding(padding) -> Linear on 3-D -> norms -> attention -> tied head."""

    def __init__(self, norm: str = "layer", attn: str = "self", tie: bool = True, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.norm = {
            "layer": nn.LayerNorm(d),
            "rms": nn.RMSNorm(d, elementwise_affine=True),
            "group": nn.GroupNorm(2, d),
            "hfrms": HFRMSNorm(d),
            "scale": Scale(d),
        }[norm]
        self.norm_kind = norm
        self.conv1d = Conv1D(d, d)
        self.attn_kind = attn
        if attn == "self":
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        elif attn == "seqfirst":
            self.attn = nn.MultiheadAttention(d, 2)
        elif attn == "kdim":
            self.attn = nn.MultiheadAttention(d, 3, batch_first=True, kdim=4, vdim=5)
            self.kproj, self.vproj = nn.Linear(d, 4), nn.Linear(d, 5)
        elif attn == "bias_kv":
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, t):
        h = torch.tanh(self.lin(self.emb(t)))
        if self.norm_kind == "group":
            h = self.norm(h.transpose(1, 2)).transpose(1, 2).contiguous()
        else:
            h = self.norm(h)
        h = self.conv1d(h)
        pad = t == 0
        if self.attn_kind == "self":
            a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        elif self.attn_kind == "seqfirst":
            s = h.transpose(0, 1)
            mask = torch.triu(torch.ones(t.shape[1], t.shape[1], dtype=torch.bool), 1)
            a = self.attn(s, s, s, attn_mask=mask, need_weights=True)[0].transpose(0, 1)
        elif self.attn_kind == "kdim":
            a = self.attn(h, self.kproj(h), self.vproj(h), need_weights=False)[0]
        else:
            a = self.attn(h, h, h, need_weights=False)[0]
        h = h + a
        return self.head(h.mean(1))


class CrossNet(nn.Module):
    """Encoder-decoder attention: query from one sequence, key = value from another (k is v)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, d), nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.three = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        q, kv = self.a(x), self.b(x.flip(1))
        h = self.attn(q, kv, kv, need_weights=False)[0]
        h = h + self.three(h, q, kv, need_weights=False)[0]  # q, k, v all different: chunked weights
        return self.head(h.sum(1))


class ConvNet(nn.Module):
    def __init__(self, fallback: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(1, 3, (2, 3), stride=(1, 2), dilation=(1, 1), padding="valid")
        self.bn = nn.BatchNorm2d(3)
        self.c3 = nn.Conv2d(3, 3, 3, padding="same", groups=3 if fallback else 1)
        self.fc = nn.Linear(3 * 3 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))  # [B, 4, 5]
        h = self.c2(h.unsqueeze(1))  # [B, 3, 3, 2]
        h = torch.tanh(self.c3(self.bn(h)))
        return self.fc(h.flatten(1))


def xent(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def tokens(B=5, T=7, vocab=11):
    t = torch.randint(1, vocab, (B, T))
    t[0, -3:] = 0  # padding positions
    t[2, -1] = 0
    return t


def build(name):
    torch.manual_seed(0)
    if name.startswith("seq"):
        _, norm, attn = name.split("-")
        model = SeqNet(norm=norm, attn=attn).double()
        batch = (tokens(), torch.randint(0, 11, (5,)))
    elif name == "cross":
        model = CrossNet().double()
        batch = (torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 3, (4,)))
    elif name.startswith("conv"):
        model = ConvNet(fallback=name.endswith("fallback")).double()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
        batch = (torch.randn(4, 2, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    elif name == "mlp4d":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(1), nn.Linear(2 * 3 * 2, 3)).double()
        batch = (torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (4,)))
    return model.eval(), batch


CASES = [
    "seq-layer-self", "seq-rms-seqfirst", "seq-group-kdim", "seq-hfrms-self", "seq-scale-bias_kv",
    "cross", "conv", "conv-fallback", "mlp4d",
]


@pytest.mark.parametrize("name", CASES)
def test_hook_gradients_equal_torch_func_reference(name):
    model, batch = build(name)
    layout = ParamLayout.from_module(model)
    ref = per_example_grads(model, xent, batch, layout=layout)
    # per-example gradients through hooks (the 'hooks' mode), summed loss
    with GradientCapture(model, None, layout, loss_scale="sum") as cap:
        xent(model, batch).sum().backward()
    torch.testing.assert_close(cap.grads(), ref, **TOL)
    # the factorised per_layer path, from a mean-reduced training backward
    sketch = PerLayerSketch.for_module(model, 64, seed=2, layout=layout)
    model.zero_grad()
    with GradientCapture(model, sketch, layout) as cap:
        xent(model, batch).mean().backward()
    torch.testing.assert_close(cap.sketches(), sketch.apply(ref), **TOL)
    # a whole-model sketch through sketch_gradients(mode="auto") (chunked)
    dense = make("dense", layout.dim, 16, seed=1)
    got = sketch_gradients(model, xent, batch, dense, mode="auto", layout=layout, chunk_size=3)
    torch.testing.assert_close(got, dense.apply(ref), **TOL)


def test_support_lists_fast_and_fallback_modules():
    model, _ = build("seq-hfrms-self")
    sup = capture_support(model)
    assert sup.fast == {"emb": "embedding", "lin": "linear", "conv1d": "hf_conv1d", "attn": "mha", "head": "linear"}
    assert sup.fallback == {"norm": "HFRMSNorm"}
    assert sup.fallback_params() == ["norm.weight"]
    assert sup.params["emb"] == sup.params["head"] == ["emb.weight"]  # tied: one layout entry, two users
    model, _ = build("seq-scale-bias_kv")
    assert set(capture_support(model).fallback) == {"norm", "attn"}
    model, _ = build("conv-fallback")
    sup = capture_support(model)
    assert sup.fallback == {"c3": "Conv2d"} and sup.fast["bn"] == "norm" and sup.fast["c1"] == "conv"


def test_tied_weights_and_padding_rows():
    model, batch = build("seq-layer-self")
    assert model.head.weight is model.emb.weight
    layout = ParamLayout.from_module(model)
    with GradientCapture(model, None, layout, loss_scale="sum") as cap:
        xent(model, batch).sum().backward()
    g = layout.unflatten(cap.grads())["emb.weight"]
    ref = layout.unflatten(per_example_grads(model, xent, batch, layout=layout))["emb.weight"]
    torch.testing.assert_close(g, ref, **TOL)
    # the tied head gives every row a gradient, the embedding part none to padding row 0 ...
    untied = SeqNet(tie=False).double().eval()
    untied.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    lay2 = ParamLayout.from_module(untied, include=["emb.*"])
    with GradientCapture(untied, None, lay2, loss_scale="sum") as cap2:
        xent(untied, batch).sum().backward()
    assert cap2.grads().view(5, 11, 6)[:, 0].abs().max() == 0


def test_train_mode_batchnorm_rows_sum_to_the_batch_gradient():
    model, batch = build("conv")
    model.train()
    layout = ParamLayout.from_module(model)
    with GradientCapture(model, None, layout) as cap:
        xent(model, batch).mean().backward()
    total = layout.flatten({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(cap.grads().mean(0), total, **TOL)


def test_unsupported_modules_are_refused_with_exclude_advice():
    from lightning_sketch.exceptions import UnsupportedModelError

    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(UnsupportedModelError, match=r"\['0.weight'\].*max_norm.*exclude="):
        GradientCapture(model, None)
    mha = nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True))  # sequence-first + bias_kv
    with pytest.raises(UnsupportedModelError, match="batch_first=False"):
        GradientCapture(mha, None)


def test_transformer_dropout_train_mode_matches_loop_with_same_masks():
    """Train mode with dropout: the rows are the gradients of the very masks the forward drew."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.3, batch_first=True).double().train()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    layout = ParamLayout.from_module(model)
    torch.manual_seed(5)
    with GradientCapture(model, None, layout, loss_scale="sum") as cap:
        out = model(x)
        out.pow(2).sum((1, 2)).sum().backward()
    # Reference: the same forward (same RNG draws) and one backward per example.
    refs = []
    for b in range(3):
        torch.manual_seed(5)
        model.zero_grad()
        model(x)[b].pow(2).sum().backward()
        refs.append(layout.flatten({n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(cap.grads(), torch.stack(refs), **TOL)


def test_hugging_face_bert_without_vmap():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).double().eval()
    head = nn.Linear(8, 2).double()
    model = nn.ModuleDict({"bert": bert, "head": head})
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    ids[0, 4:] = 0
    y = torch.tensor([0, 1, 1])

    def loss_fn(m, b):
        h = m["bert"](input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return F.cross_entropy(m["head"](h[:, 0]), b["y"], reduction="none")

    batch = {"input_ids": ids, "attention_mask": mask, "y": y}
    layout = ParamLayout.from_module(model)
    sup = capture_support(model, layout)
    assert not sup.fallback and not sup.unsupported
    refs = []
    for b in range(3):
        model.zero_grad()
        loss_fn(model, {k: v[b : b + 1] for k, v in batch.items()}).sum().backward()
        refs.append(layout.flatten({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}))
    ref = torch.stack(refs)
    model.zero_grad()
    got = sketch_gradients(model, loss_fn, batch, make("identity", layout.dim, layout.dim), mode="hooks")
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-8)
    sk = PerLayerSketch.for_module(model, 40, layout=layout)
    torch.testing.assert_close(sketch_gradients(model, loss_fn, batch, sk, mode="factorized"), sk.apply(ref), atol=1e-9, rtol=1e-8)


# --------------------------------------------------------------------------- backward stopped at the hooks
class InplaceNet(nn.Module):
    """Conv and Linear outputs modified in place afterwards (ReLU(inplace=True), as torchvision's ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 5 * 5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


def _xent(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _param_grad_calls(model):
    """Counts how often autograd computes a gradient for any parameter (leaf hooks fire then)."""
    calls = []
    handles = [p.register_hook(lambda g: calls.append(1)) for p in model.parameters()]
    return calls, handles


@pytest.mark.parametrize("inplace", [False, True])
def test_hooks_stop_the_backward_at_their_outputs_even_when_modified_in_place(inplace):
    """The hook path differentiates with respect to the hooked outputs' gradient edges, so autograd never
    forms the batch's parameter gradients, also when an output was changed in place afterwards (the edge
    still names the gradient of the value the hook saw). The rows equal the vmap reference in float64."""
    torch.manual_seed(3)
    model = (InplaceNet() if inplace else nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                                         nn.Linear(75, 4), nn.Tanh(), nn.Linear(4, 3))).double()
    batch = (torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))
    layout = ParamLayout.from_module(model)
    ref = per_example_grads(model, _xent, batch, layout=layout)
    calls, handles = _param_grad_calls(model)
    sketch = make("dense", layout.dim, 16, seed=1)
    got = sketch_gradients(model, _xent, batch, sketch, mode="hooks", layout=layout)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, sketch.apply(ref), **TOL)
    assert not calls


def test_a_reused_capture_refills_its_buffer_and_never_overwrites_what_it_handed_out():
    """One GradientCapture over several batches (as a checkpoint slice uses it): each batch's rows equal a
    fresh capture's, and rows handed out earlier (sketches, or grads that alias the buffer) stay intact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    layout = ParamLayout.from_module(model)
    batches = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    sketch = make("affd", layout.dim, 8, seed=2)
    cap = GradientCapture(model, sketch, layout, loss_scale="sum")
    kept = [sketch_gradients(model, _xent, b, sketch, mode="auto", layout=layout, capture=cap) for b in batches]
    for b, rows in zip(batches, kept):
        torch.testing.assert_close(rows, sketch.apply(per_example_grads(model, _xent, b, layout=layout)), **TOL)
    grads = []
    for b in batches:  # sketches() releases the buffer for reuse, then grads() hands it out as it is
        with cap, torch.enable_grad():
            torch.autograd.grad(_xent(model, b).sum(), list(model.parameters()))
        cap.sketches()
        grads.append(cap.grads())
    for b, g in zip(batches, grads):
        torch.testing.assert_close(g, per_example_grads(model, _xent, b, layout=layout), **TOL)


def test_hooks_under_non_reentrant_activation_checkpointing_equal_the_plain_model():
    """A block under torch.utils.checkpoint(use_reentrant=False) (as Hugging Face's gradient checkpointing
    can be configured): the backward stopped at the hooked outputs still reaches the checkpointed layer,
    and the rows equal the same model's without checkpointing (vmap reference)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, ckpt: bool) -> None:
            super().__init__()
            self.a, self.b, self.head, self.ckpt = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3), ckpt

        def forward(self, x):
            h = torch.tanh(self.a(x))
            block = lambda t: torch.tanh(self.b(t))  # noqa: E731
            h = checkpoint(block, h, use_reentrant=False) if self.ckpt else block(h)
            return self.head(h)

    torch.manual_seed(6)
    plain = Net(False).double()
    ckpt = Net(True).double()
    ckpt.load_state_dict(plain.state_dict())
    batch = (torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,)))
    layout = ParamLayout.from_module(plain)
    sketch = make("dense", layout.dim, 8, seed=0)
    ref = sketch.apply(per_example_grads(plain, _xent, batch, layout=layout))
    torch.testing.assert_close(sketch_gradients(ckpt, _xent, batch, sketch, mode="hooks", layout=layout), ref, **TOL)


def test_rows_from_grads_survive_a_later_sketches_call_and_the_next_batch():
    """grads() hands out the buffer itself; a later sketches() on the same batch must not release it for
    reuse, or the next batch would overwrite the rows the caller holds."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    layout = ParamLayout.from_module(model)
    cap = GradientCapture(model, make("dense", layout.dim, 5, seed=0), layout, loss_scale="sum")
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    loss = lambda m, b: m(b).pow(2).sum(-1)  # noqa: E731
    with cap:
        loss(model, x1).sum().backward()
    g1 = cap.grads()
    cap.sketches()
    with cap:
        loss(model, x2).sum().backward()
    torch.testing.assert_close(g1, per_example_grads(model, loss, x1, layout=layout), **TOL)


def test_an_ordinary_backward_inside_the_capture_keeps_no_hooked_output_alive():
    """Only hooked_sketch's own backward records the hooked outputs; inside a training-style backward (the
    inline callback's) the capture must not hold them, so they are freed as before."""
    import weakref

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    layout = ParamLayout.from_module(model)
    cap = GradientCapture(model, PerLayerSketch.for_module(model, 8, layout=layout), layout)
    refs = []
    model[0].register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    with cap:
        model(torch.randn(5, 4)).pow(2).mean().backward()
        assert cap._watched == []
    assert refs and refs[0]() is None


def test_sketch_gradients_refuses_a_capture_built_for_something_else():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    layout = ParamLayout.from_module(model)
    sketch = make("dense", layout.dim, 5, seed=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    loss = lambda m, b: m(b).pow(2).sum(-1)  # noqa: E731
    for cap in (GradientCapture(model, sketch, layout, loss_scale="mean"),
                GradientCapture(model, make("dense", layout.dim, 5, seed=1), layout, loss_scale="sum")):
        with pytest.raises(SketchConfigError, match="capture"):
            sketch_gradients(model, loss, x, sketch, mode="auto", layout=layout, capture=cap)


class Branches(nn.Module):
    """Two branches from the input (no hooked tensor below either), a module used twice, and a join."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(4, 5), nn.Linear(4, 5)
        self.mid = nn.Linear(5, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        a = torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.left(x))))))
        b = torch.tanh(self.right(x))
        return self.head(torch.cat([a, b], dim=-1))


def test_the_backward_stops_at_the_earliest_hooked_outputs_of_every_branch():
    """_grad_targets keeps only the hooked tensors below which no other hooked tensor lies (here the two
    branch inputs' outputs), and the rows still equal the vmap reference with no parameter gradient."""
    torch.manual_seed(10)
    model = Branches().double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    layout = ParamLayout.from_module(model)
    sketch = make("dense", layout.dim, 12, seed=3)
    cap = GradientCapture(model, sketch, layout, loss_scale="sum")
    cap.batch_size = 5
    seen = {}
    for name in ("left", "right"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    with cap, torch.enable_grad():
        cap._track = True
        out = model(batch[0])
        targets = cap._grad_targets()
        cap._track = False
        assert targets is not None and len(cap._watched) == 5
        assert {id(e.node) for e in targets} == {id(seen["left"].grad_fn), id(seen["right"].grad_fn)}
        del out
    model.left._forward_hooks.clear()
    model.right._forward_hooks.clear()
    calls, handles = _param_grad_calls(model)
    got = sketch_gradients(model, _xent, batch, sketch, mode="hooks", layout=layout)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, sketch.apply(per_example_grads(model, _xent, batch, layout=layout)), **TOL)
    assert not calls
