"""Per-example losses of modules written the ordinary Lightning way (no ``per_example_loss``):
``training_step`` replayed with each torch loss's reduction taken apart (``gradients._step_loss``).

References are written out here with ``reduction="none"``. The defining properties, checked against
autograd of the real step: an example's loss does not depend on the batch it is in, and the mean
over the batch has the training loss's gradient up to a positive factor of the batch (exactly, for a
plain mean over one element per example)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from exact_refs import loop_grads
from lightning.pytorch import LightningModule
from torch import nn

from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.gradients import module_loss_fn, per_example_grads
from lightning_sketch.gradients._step_loss import StepLoss

B, D, C = 6, 5, 3


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


class Classifier(LightningModule):
    def __init__(self, crit=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
        self.crit = crit if crit is not None else nn.CrossEntropyLoss()
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=C)
        self.logged = []

    def forward(self, x):
        return self.net(x)

    def log(self, *args, **kwargs):  # the replay must never reach it
        self.logged.append(args)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.crit(logits, y)
        self.acc(logits, y)
        self.log("train_loss", loss)
        return {"loss": loss}


def _step_grad(module, batch):
    out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, dict) else out
    return loss, torch.autograd.grad(loss, list(module.parameters()))


def _check_mean_and_gradient(module, batch, per, factor=1.0):
    """mean_b ℓ_b · factor is the training loss, and so is its gradient."""
    loss, grads = _step_grad(module, batch)
    torch.testing.assert_close(per.mean() * factor, loss.detach(), rtol=1e-6, atol=1e-6)
    mean_grads = torch.autograd.grad(module_loss_fn(module)(module, batch).mean() * factor,
                                     list(module.parameters()))
    for a, b in zip(mean_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _check_batch_independent(module, batch, per):
    """Each example's loss in a batch of its own, and in the batch reversed, equals its loss here."""
    fn = module_loss_fn(module)
    rev = [t.flip(0) for t in batch]
    torch.testing.assert_close(fn(module, rev).flip(0), per, rtol=1e-6, atol=1e-6)
    for b in (0, 3):
        one = [t[b:b + 1] for t in batch]
        torch.testing.assert_close(fn(module, one), per[b:b + 1], rtol=1e-6, atol=1e-6)


def test_resolver_takes_the_training_step_and_leaves_training_untouched():
    module, batch = Classifier(), _batch()
    update = vars(module.acc)["update"]  # torchmetrics's own wrapper, an instance attribute

    class Direct(Classifier):
        def training_step(self, batch, batch_idx):
            self.acc.update(self(batch[0]), batch[1])  # a direct update is silenced too
            return super().training_step(batch, batch_idx)

    fn = module_loss_fn(module)
    assert isinstance(fn, StepLoss)
    per = fn(module, batch)
    want = F.cross_entropy(module(batch[0]), batch[1], reduction="none")
    torch.testing.assert_close(per, want, rtol=1e-6, atol=1e-7)
    assert module.logged == [] and int(module.acc._update_count) == 0  # nothing logged, no metric update
    assert "log" not in vars(module) and vars(module.acc)["update"] is update  # shadows removed
    direct = Direct()
    module_loss_fn(direct)(direct, batch)
    assert int(direct.acc._update_count) == 0 and direct.logged == []
    _check_mean_and_gradient(module, batch, per)


WEIGHT = torch.tensor([1.0, 2.0, 0.5])


@pytest.mark.parametrize("crit", [
    nn.CrossEntropyLoss(label_smoothing=0.1, weight=WEIGHT),
    nn.CrossEntropyLoss(weight=WEIGHT),
    nn.CrossEntropyLoss(reduction="sum"),
    nn.NLLLoss(),
])
def test_options_of_the_loss_keep_mean_and_gradient(crit):
    if isinstance(crit, nn.NLLLoss):
        class LogSoftmax(Classifier):
            def forward(self, x):
                return F.log_softmax(self.net(x), -1)
        module = LogSoftmax(crit)
    else:
        module = Classifier(crit)
    batch = _batch(1)
    per = module_loss_fn(module)(module, batch)
    assert per.shape == (B,)
    _check_batch_independent(module, batch, per)
    logits, y = module(batch[0]), batch[1]
    if crit.reduction == "sum":  # ℓ_b = L_b; the summed training loss is B · mean_b ℓ_b
        want, factor = F.cross_entropy(logits, y, reduction="none"), float(B)
    elif crit.weight is not None:  # ℓ_b = (w-weighted L_b) / w̄; torch divides by Σ_b w_{y_b}
        none = F.cross_entropy(logits, y, weight=WEIGHT, label_smoothing=crit.label_smoothing,
                               reduction="none")
        want, factor = none / WEIGHT.mean(), float(B * WEIGHT.mean() / WEIGHT[y].sum())
    else:
        want, factor = F.cross_entropy(logits, y, reduction="none"), 1.0
    torch.testing.assert_close(per, want, rtol=1e-6, atol=1e-6)
    _check_mean_and_gradient(module, batch, per, factor)


class LM(LightningModule):
    """Per-token cross-entropy over logits flattened batch-major, -100 labels ignored."""

    def __init__(self, V=7, T=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, 6), nn.Linear(6, V)
        self.V = V

    def training_step(self, batch, batch_idx):
        x, labels = batch
        logits = self.head(torch.tanh(self.emb(x)))
        return F.cross_entropy(logits.view(-1, self.V), labels.view(-1), ignore_index=-100)


def test_token_mean_with_ignored_labels():
    module = LM()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 7, (B, 4), generator=g)
    labels = torch.randint(0, 7, (B, 4), generator=g)
    labels[0, :3] = -100
    labels[3, 1] = -100
    per = module_loss_fn(module)(module, (x, labels))
    tokens = F.cross_entropy(module.head(torch.tanh(module.emb(x))).transpose(1, 2), labels,
                             ignore_index=-100, reduction="none")  # [B, T], 0 where ignored
    want = tokens.sum(1)  # each sequence's summed token loss: −log p of its labels
    torch.testing.assert_close(per, want, rtol=1e-6, atol=1e-6)
    _check_batch_independent(module, (x, labels), per)
    _check_mean_and_gradient(module, (x, labels), per, float(B / (labels != -100).sum()))


class TwoLosses(LightningModule):
    """A classification loss plus half an auxiliary regression loss, and an unused logged loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, 8)
        self.cls, self.reg = nn.Linear(8, C), nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        h = torch.tanh(self.body(x))
        ce = F.cross_entropy(self.cls(h), y)
        aux = F.mse_loss(self.reg(h), t)
        F.l1_loss(self.reg(h), t)  # computed, not part of the loss: weight 0
        return ce + 0.5 * aux


def test_several_losses_are_weighted_by_their_share_of_the_returned_loss():
    module = TwoLosses()
    x, y = _batch(3)
    t = torch.randn(B, 2, generator=torch.Generator().manual_seed(4))
    per = module_loss_fn(module)(module, (x, y, t))
    h = torch.tanh(module.body(x))
    want = (F.cross_entropy(module.cls(h), y, reduction="none")
            + 0.5 * F.mse_loss(module.reg(h), t, reduction="none").mean(1))
    torch.testing.assert_close(per, want, rtol=1e-6, atol=1e-7)
    _check_mean_and_gradient(module, (x, y, t), per)


class Unreduced(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(D, 2)

    def training_step(self, batch, batch_idx):
        x, t = batch
        return F.mse_loss(self.net(x), t, reduction="none").mean()


def test_a_training_step_without_batch_idx():
    class NoIdx(Unreduced):
        def training_step(self, batch):  # Lightning passes batch_idx only when the step takes it
            x, t = batch
            return F.mse_loss(self.net(x), t)

    module = NoIdx()
    x = _batch()[0]
    t = torch.randn(B, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(module_loss_fn(module)(module, (x, t)), (module.net(x) - t).pow(2).mean(1))


def test_unreduced_loss_then_mean():
    module = Unreduced()
    x = _batch()[0]
    t = torch.randn(B, 2, generator=torch.Generator().manual_seed(5))
    per = module_loss_fn(module)(module, (x, t))
    torch.testing.assert_close(per, (module.net(x) - t).pow(2).mean(1), rtol=1e-6, atol=1e-7)


def test_per_example_gradients_through_vmap_equal_the_loop():
    module, batch = Classifier(nn.CrossEntropyLoss(label_smoothing=0.1)), _batch(6)
    fn = module_loss_fn(module)
    got = per_example_grads(module, fn, batch)
    want = loop_grads(module, lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.1,
                                                            reduction="none"), batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class NoTorchLoss(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return -F.log_softmax(self(x), -1).gather(1, y[:, None]).mean()


class MaskedReduction(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        keep = (y > 0).float()
        return (losses * keep).sum() / keep.sum()


class SampleWeights(Classifier):
    def training_step(self, batch, batch_idx):
        x, y, w = batch
        return 2.0 * (F.cross_entropy(self(x), y, reduction="none") * w).mean()


class IndexedReduction(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")[y > 0].mean()


def test_weights_and_masks_multiplied_into_unreduced_losses():
    """ℓ_b = w_b · CE_b (sample weights; a mask is 0/1 weights), the same in any batch; a factor common
    to the whole loss (2, 1/Σ keep) is left out, so the gradient is the step's up to that factor."""
    x, y = _batch(7)
    y[0] = 0  # one example masked out
    w = torch.rand(B, generator=torch.Generator().manual_seed(8))
    for module, batch, weights, factor in (
        (SampleWeights(), (x, y, w), w, 2.0 / B * B),
        (MaskedReduction(), (x, y), (y > 0).float(), float(B / (y > 0).sum())),
    ):
        per = module_loss_fn(module)(module, batch)
        want = F.cross_entropy(module(x), y, reduction="none") * weights
        torch.testing.assert_close(per, want, rtol=1e-6, atol=1e-6)
        _check_batch_independent(module, batch, per)
        _check_mean_and_gradient(module, batch, per, factor)


@pytest.mark.parametrize(("cls", "match"), [
    (Manual, "manual optimisation"),
    (NoTorchLoss, "calls none of torch's loss functions"),
    (IndexedReduction, r"reduces \['cross_entropy'\] \(reduction='none'\) itself"),
])
def test_steps_that_cannot_be_replayed_ask_for_per_example_loss(cls, match):
    module = cls()
    with pytest.raises(SketchConfigError, match=f"{match}.*per_example_loss"):
        module_loss_fn(module, who="GradientSketch ")(module, _batch())


def test_a_module_without_training_step_still_gets_the_old_error():
    with pytest.raises(SketchConfigError, match="has no `per_example_loss"):
        module_loss_fn(nn.Linear(2, 2))
