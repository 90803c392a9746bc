"""Regressions from trying the callbacks on models nobody here wrote (transformers, BatchNorm CNNs,
Hugging Face, submodule optimizers, mixed precision). References are computed independently of the
hooks: ordinary autograd per example on the same forward, or ``per_example_grads`` (torch.func)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_sketch.callbacks import GradientSketch, HessianSpectrum, IntrinsicDimension, SearchCriteria
from lightning_sketch.data import IndexedDataset
from lightning_sketch.exceptions import SubspaceError
from lightning_sketch.gradients import ParamLayout, per_example_grads
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore


class Branchy(nn.Module):
    """Tokens -> Embedding -> LayerNorm -> self-attention -> MLP (dropout) -> head, with a
    data-dependent branch (like Hugging Face's mask utilities) that ``vmap`` cannot trace."""

    def __init__(self, vocab=13, d=8, classes=3, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, d))
        self.head = nn.Linear(d, classes)

    def forward(self, t):
        pad = t == 0
        if bool(pad.any()):  # data-dependent control flow: vmap raises here
            mask = pad
        else:
            mask = None
        h = self.norm(self.emb(t))
        h = h + self.attn(h, h, h, key_padding_mask=mask, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h.mean(1))


class SeqModule(LightningModule):
    def __init__(self, dropout=0.0, lr=0.05, submodule_optimizer=False, scheduler=False):
        super().__init__()
        self.model = Branchy(dropout=dropout)
        self.lr, self.submodule_optimizer, self.scheduler = lr, submodule_optimizer, scheduler

    def forward(self, t):
        return self.model(t)

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        acc = (self(batch["x"]).argmax(-1) == batch["y"]).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self):
        params = self.model.parameters() if self.submodule_optimizer else self.parameters()
        opt = torch.optim.SGD(params, lr=self.lr)
        if self.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}
        return opt


class _Seqs(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, 13, (n, 6), generator=g)
        self.x[::3, -2:] = 0  # padded examples
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _loader(n=24, batch_size=6, shuffle=False):
    return DataLoader(IndexedDataset(_Seqs(n)), batch_size=batch_size, shuffle=shuffle)


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                   default_root_dir=tmp_path, accelerator="cpu", callbacks=callbacks, **kw)


def _loop_grads(module, batch, layout):
    """Per-example gradients by one ordinary backward per example (no vmap, no hooks)."""
    own = dict(module.named_parameters())
    out = []
    for b in range(len(batch["y"])):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        g = torch.autograd.grad(module.per_example_loss(one).sum(), [own[n] for n in layout.names], allow_unused=True)
        out.append(layout.flatten([x if x is not None else torch.zeros_like(own[n]) for x, n in zip(g, layout.names)]))
    return torch.stack(out)


def _rows(path, name):
    store = SketchStore.open(path)
    ids, vecs = store.ids(name), np.asarray(store.vectors(name))
    order = np.argsort(ids)
    return ids[order], torch.from_numpy(vecs[order])


def test_vmap_is_not_needed_checkpoint_and_inline(tmp_path):
    """A model vmap cannot run (data-dependent branch): both modes work and match the loop reference."""
    seed_everything(0)
    module = SeqModule()
    with pytest.raises(Exception, match="(?i)data-dependent|control flow|Tensor.*bool|is_nonzero|item"):
        per_example_grads(module, lambda m, b: m.per_example_loss(b), next(iter(_loader()))) 
    ck = GradientSketch(dirpath=str(tmp_path / "ck"), sketch_kind="per_layer", sketch_dim=48, mode="checkpoint")
    _trainer(tmp_path, [ck], max_steps=2).fit(module, _loader())
    assert not ck.support.fallback and ck.support.fast["model.attn"] == "mha"
    layout = ParamLayout.from_module(module)
    sk = make(**SketchStore.open(tmp_path / "ck" / "store").spec)
    module.eval()
    full = {k: torch.stack([d[k] for d in (_Seqs()[i] for i in range(24))]) for k in ("x", "y")}
    ref = sk.apply(_loop_grads(module, full, layout))
    ids, got = _rows(tmp_path / "ck" / "store", "step-2")
    torch.testing.assert_close(got, ref[ids].float(), rtol=1e-4, atol=1e-5)


class RecordRNG(__import__("lightning.pytorch").pytorch.Callback):
    def __init__(self):
        self.states, self.params, self.batches, self.lrs = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(torch.get_rng_state())
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        self.batches.append({k: v.clone() for k, v in batch.items()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("kind", ["per_layer", "dense"])
def test_inline_rows_are_train_mode_gradients_of_the_trained_batch(tmp_path, kind):
    """Dropout on: the rows are the gradients under the very masks the training step drew."""
    seed_everything(0)
    module = SeqModule(dropout=0.5)
    rec = RecordRNG()
    cb = GradientSketch(dirpath=str(tmp_path / "in"), sketch_kind=kind, sketch_dim=40, mode="inline", seed=1)
    _trainer(tmp_path, [rec, cb], max_steps=2).fit(module, _loader())
    layout = ParamLayout.from_module(module)
    sketch = make(**SketchStore.open(tmp_path / "in" / "store").spec)
    ids, got = _rows(tmp_path / "in" / "store", "epoch-0")
    ref = SeqModule(dropout=0.5).train()
    want = {}
    for state, params, batch, lr in zip(rec.states, rec.params, rec.batches, rec.lrs):
        ref.load_state_dict(params, strict=False)
        own = dict(ref.named_parameters())
        torch.set_rng_state(state)
        losses = ref.per_example_loss(batch)  # one forward, the training step's masks
        for j, i in enumerate(batch["index"].tolist()):
            g = torch.autograd.grad(losses[j], [own[n] for n in layout.names], retain_graph=True)
            want[i] = lr * sketch.apply(layout.flatten(list(g)))
    torch.testing.assert_close(got, torch.stack([want[int(i)] for i in ids]), rtol=1e-4, atol=1e-6)


class BNNet(LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _images(n=16):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(IndexedDataset(torch.utils.data.TensorDataset(x, y), names=("x", "y")), batch_size=8)


def test_per_layer_checkpoint_on_batchnorm_cnn(tmp_path):
    """Used to refuse BatchNorm only at the first slice (after an epoch); now exact in eval mode."""
    seed_everything(0)
    module = BNNet()
    loader = _images()
    cb = GradientSketch(dirpath=str(tmp_path / "bn"), sketch_kind="per_layer", sketch_dim=32, mode="checkpoint")
    _trainer(tmp_path, [cb], max_steps=2).fit(module, loader)
    assert cb.support.fast["bn"] == "norm" and not cb.support.fallback
    module.eval()
    layout = ParamLayout.from_module(module)
    sk = make(**SketchStore.open(tmp_path / "bn" / "store").spec)
    batch = {"x": torch.cat([b["x"] for b in loader]), "y": torch.cat([b["y"] for b in loader])}
    ref = sk.apply(per_example_grads(module, lambda m, b: m.per_example_loss(b), batch, layout=layout))
    ids, got = _rows(tmp_path / "bn" / "store", "step-2")
    torch.testing.assert_close(got, ref[ids].float(), rtol=1e-4, atol=1e-5)


def test_intrinsic_dimension_with_submodule_optimizer(tmp_path):
    """LightningTransformer-style SGD(self.model.parameters()): ω used to stay outside the optimizer."""
    seed_everything(0)
    module = SeqModule(submodule_optimizer=True, lr=0.5)
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=32, mode="fixed", monitor="val_acc", dirpath=str(tmp_path), plot=False)
    with pytest.warns(UserWarning, match="were in no optimizer"):
        _trainer(tmp_path, [cb], max_steps=3, limit_val_batches=1, num_sanity_val_steps=0).fit(
            module, _loader(), _loader())
    assert module.intrinsic_subspace.omega.abs().sum() > 0  # ω trained
    assert cb.status == "finished"  # fixed mode without target no longer ends "running"
    seed_everything(0)
    module = SeqModule(submodule_optimizer=True, scheduler=True)
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=32, mode="fixed", monitor="val_acc", dirpath=str(tmp_path), plot=False)
    with pytest.raises(SubspaceError, match=r"in no optimizer.*self\.parameters\(\)"):
        _trainer(tmp_path, [cb], max_steps=3).fit(module, _loader())


def test_fixed_mode_with_unreached_target_reports_not_reached(tmp_path):
    seed_everything(0)
    module = SeqModule()
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=16, mode="fixed", monitor="val_acc",
                            criteria=SearchCriteria(target=2.0), dirpath=str(tmp_path), plot=False)
    _trainer(tmp_path, [cb], max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=1).fit(
        module, _loader(), _loader())
    assert cb.status == "not_reached" and cb.reached is False


def test_identity_sketch_needs_no_sketch_dim(tmp_path):
    assert make("identity", 10, None).sketch_dim == 10
    seed_everything(0)
    module = SeqModule()
    cb = GradientSketch(dirpath=str(tmp_path / "id"), sketch_kind="identity", sketch_dim=None, mode="inline",
                        include=["model.head.*"])
    _trainer(tmp_path, [cb], max_steps=2).fit(module, _loader())
    spec = SketchStore.open(tmp_path / "id" / "store").spec
    assert spec["sketch_dim"] == spec["dim"] == 8 * 3 + 3


def test_hessian_spectrum_include_exclude_layout(tmp_path):
    seed_everything(0)
    module = SeqModule()
    cb = HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=8, at_steps=[1], every_n_steps=None, probe_batches=1,
                         density=False, dirpath=str(tmp_path / "hs"), plot=False, exclude=["*norm*", "*attn*"])
    _trainer(tmp_path, [cb], max_steps=2).fit(module, _loader())
    layout = ParamLayout.from_module(module, exclude=["*norm*", "*attn*"])
    assert cb.history and cb.history[0].get("layout_fingerprint", layout.fingerprint()) == layout.fingerprint()
    assert cb._sketch is None or cb._sketch.dim == layout.dim


class Functional(LightningModule):
    """The head reuses the embedding weight in the parent's forward: invisible to module hooks."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.lin = nn.Linear(6, 6)

    def per_example_loss(self, batch):
        h = torch.tanh(self.lin(self.emb(batch["x"]))).mean(1)
        return F.cross_entropy(F.linear(h, self.emb.weight)[:, :3], batch["y"], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("mode", ["inline", "checkpoint"])
def test_parameters_used_outside_their_module_are_named_and_served_by_torch_func(tmp_path, mode):
    """The hooks miss the head's use of emb.weight: the start check against autograd names it and
    sends the rows to torch.func, which sees every use (exact rows; checked in test_capture_check)."""
    seed_everything(0)
    cb = GradientSketch(dirpath=str(tmp_path / "f"), sketch_kind="per_layer", sketch_dim=16, mode=mode)
    with pytest.warns(UserWarning, match=r"in \['emb.weight'\].*parameter used outside the module"):
        _trainer(tmp_path, [cb], max_steps=1).fit(Functional(), _loader())
    assert cb._hooks_exact is False


@pytest.mark.parametrize("kind", ["per_layer", "dense"])
def test_inline_sum_check_is_quiet_on_conv_before_batchnorm(tmp_path, kind):
    """Train-mode BatchNorm makes the conv bias's batch gradient ~0 (its per-example contributions
    cancel): that is no gap, while the invisible parameter above still is one."""
    seed_everything(0)
    cb = GradientSketch(dirpath=str(tmp_path / "bn"), sketch_kind=kind, sketch_dim=32, mode="inline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], max_steps=2).fit(BNNet(), _images())
    assert cb._mode_impl._checked_sum
    assert not [w for w in caught if "do not add up" in str(w.message)]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_every_callback(tmp_path, precision):
    """Every callback runs under mixed precision; inline rows are float32 and close to float32 ones."""
    rows = {}
    for prec in ("32-true", precision):
        seed_everything(0)
        module = SeqModule()
        cbs = [
            GradientSketch(dirpath=str(tmp_path / prec / "in"), sketch_kind="per_layer", sketch_dim=32, mode="inline"),
            GradientSketch(dirpath=str(tmp_path / prec / "ck"), sketch_kind="affd", sketch_dim=32, mode="checkpoint"),
        ]
        if prec != "32-true":
            cbs += [HessianSpectrum(k=2, sketch_kind="dense", sketch_dim=8, at_steps=[1], every_n_steps=None,
                                    probe_batches=1, density=False, dirpath=str(tmp_path / "hs"), plot=False)]
        try:
            _trainer(tmp_path, cbs, max_steps=2, precision=prec).fit(module, _loader())
        except (RuntimeError, ValueError) as err:  # a precision this CPU build of Lightning refuses
            if "precision" in str(err).lower() or "not supported" in str(err).lower():
                pytest.skip(f"{precision} unavailable on this machine: {err}")
            raise
        rows[prec] = _rows(tmp_path / prec / "in" / "store", "epoch-0")[1]
        assert rows[prec].dtype == torch.float32 and torch.isfinite(rows[prec]).all()
    a, b = rows["32-true"], rows[precision]
    assert float((a - b).norm() / a.norm()) < 0.1
    # the second model is a fresh IntrinsicDimension-free run: subspace training under mixed precision
    seed_everything(0)
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=16, mode="fixed", monitor="val_acc", dirpath=str(tmp_path), plot=False)
    module = SeqModule()
    _trainer(tmp_path, [cb], max_steps=2, precision=precision, limit_val_batches=1, num_sanity_val_steps=0).fit(
        module, _loader(), _loader())
    assert module.intrinsic_subspace.omega.abs().sum() > 0
