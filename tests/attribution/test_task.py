"""The task protocol: what is recognised, what the measurement and kernel are, and the fits it drives.

References are written out here (plain autograd, ``torch.func.jacrev``, dense float64 matrices),
independently of the library's task, sketching and scoring code.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from attr_helpers import blobs
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_sketch.attribution import Attributor
from lightning_sketch.attribution.curvature import curvature_estimator, read_curvature
from lightning_sketch.attribution.task import AttributionTask, resolve_task
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.exceptions import SketchConfigError
from lightning_sketch.store import SketchStore


# ---------------------------------------------------------------------------- tiny models, written the
# ordinary Lightning way: forward (or not), training_step, configure_optimizers, per_example_loss.
class _Base(LightningModule):
    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NoForwardClassifier(_Base):
    """Cross-entropy of a submodule's logits; no ``forward``, no margin, no logits method."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def per_example_loss(self, batch):
        return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")


class TupleClassifier(NoForwardClassifier):
    """Batches are ``(x, y)`` tuples."""

    def per_example_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")


class BinaryBCE(_Base):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def per_example_loss(self, batch):
        return F.binary_cross_entropy_with_logits(self(batch["x"]), batch["y"], reduction="none")


class Regressor(_Base):
    def __init__(self, outputs: int = 1, half: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, outputs))
        self.half = half

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def per_example_loss(self, batch):
        se = (self(batch["x"]) - batch["y"]) ** 2
        se = se if se.ndim == 1 else se.sum(1)
        return 0.5 * se if self.half else se


class TinyLM(_Base):
    """A causal LM (previous-token bigram net), Hugging Face conventions: labels with −100, shifted."""

    def __init__(self, vocab: int = 7, mean: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, 5)
        self.out = nn.Linear(5, vocab)
        self.vocab, self.mean = vocab, mean

    def forward(self, input_ids):
        return self.out(torch.tanh(self.emb(input_ids)))

    def per_example_loss(self, batch):
        logits, labels = self(batch["input_ids"])[:, :-1], batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, self.vocab), labels.reshape(-1), ignore_index=-100,
                             reduction="none").view(labels.shape)
        total = ce.sum(1)
        return total / (labels != -100).sum(1) if self.mean else total


class _Dicts(Dataset):
    def __init__(self, **cols):
        self.cols = cols

    def __len__(self):
        return len(next(iter(self.cols.values())))

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.cols.items()}, "index": i}


def _regression_data(n=24, outputs=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, outputs, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, outputs, generator=g)
    return x, (y[:, 0] if outputs == 1 else y)


def _lm_data(n=16, L=6, vocab=7, seed=0):
    ids = torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :2] = -100  # the "prompt"
    return ids, labels


def _fit(root, model, dataset, callbacks, epochs=2, batch_size=8):
    seed_everything(0, verbose=False)
    Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, deterministic=True, default_root_dir=root, accelerator="cpu",
            callbacks=callbacks).fit(model, DataLoader(dataset, batch_size=batch_size))


# ---------------------------------------------------------------------------- recognition
def _cases():
    x, y, _ = blobs(n=8)
    xr, yr = _regression_data(8)
    xm, ym = _regression_data(8, outputs=3)
    ids, labels = _lm_data(4)
    return [
        ("no-forward classifier", NoForwardClassifier(), {"x": x, "y": y}, "classification", "margin-logits"),
        ("tuple batch", TupleClassifier(), (x, y), "classification", "margin-logits"),
        ("binary BCE", BinaryBCE(), {"x": x, "y": (y == 1).float()}, "binary", "margin-logits"),
        ("regression 0.5·SE", Regressor(), {"x": xr, "y": yr}, "regression", "gauss-newton"),
        ("3-output regression", Regressor(3, half=False), {"x": xm, "y": ym}, "regression", "gauss-newton"),
        ("LM, summed tokens", TinyLM(), {"input_ids": ids, "labels": labels}, "language_model",
         "gauss-newton-sampled"),
        ("LM, mean over tokens", TinyLM(mean=True), {"input_ids": ids, "labels": labels}, "language_model",
         "gauss-newton-sampled"),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _cases()])
def test_common_tasks_are_recognised_from_the_loss_alone(case):
    _, model, batch, kind, kernel = _cases()[case]
    task = resolve_task(model, batch)
    assert (task.kind, task.kernel) == (kind, kernel), task.reason
    assert task.loss(model, batch).shape == (len(batch["x"] if isinstance(batch, dict) and "x" in batch
                                                 else batch[0] if isinstance(batch, tuple)
                                                 else batch["input_ids"]),)


def test_measurements_are_the_margin_the_signed_logit_and_minus_the_loss():
    torch.manual_seed(0)
    x, y, _ = blobs(n=8)
    clf = NoForwardClassifier()
    z = clf.net(x)
    others = torch.where(F.one_hot(y, 3).bool(), torch.full_like(z, -torch.inf), z)
    margin = z[torch.arange(8), y] - torch.logsumexp(others, 1)
    torch.testing.assert_close(resolve_task(clf, {"x": x, "y": y}).query_loss(clf, {"x": x, "y": y}), -margin)
    bin_model, yb = BinaryBCE(), (y == 1).float()
    logit = bin_model.net(x)[:, 0]
    p = torch.sigmoid(logit)
    want = torch.log(torch.where(yb == 1, p, 1 - p) / torch.where(yb == 1, 1 - p, p))  # log p_y/(1 − p_y)
    got = resolve_task(bin_model, {"x": x, "y": yb}).query_loss(bin_model, {"x": x, "y": yb})
    torch.testing.assert_close(got, -want, rtol=1e-4, atol=1e-5)
    reg, (xr, yr) = Regressor(), _regression_data(8)
    b = {"x": xr, "y": yr}
    torch.testing.assert_close(resolve_task(reg, b).query_loss(reg, b), 0.5 * (reg(xr) - yr) ** 2)


def test_unrecognised_losses_fall_back_to_the_empirical_fisher_and_say_what_to_add():
    reg, (x, y) = Regressor(), _regression_data(8)
    log_cosh = lambda m, b: torch.log(torch.cosh(m(b["x"]) - b["y"]))  # noqa: E731  (no recognised loss)
    task = resolve_task(reg, {"x": x, "y": y}, loss_fn=log_cosh)
    assert (task.kind, task.kernel, task.kernel_terms) == ("empirical", "empirical", None)
    assert "per_example_margin" in task.reason and "task=" in task.reason
    with pytest.raises(SketchConfigError, match="kernel_samples"):
        resolve_task(reg, {"x": x, "y": y}, kernel_samples=0)


# ---------------------------------------------------------------------------- kernels, exactly
def _jacobian(model, x):
    """``[B, O, N]`` Jacobian of the outputs w.r.t. all parameters (flattened in named order), float64."""
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x.double(),))
        return out.reshape(x.shape[0], -1)

    jac = torch.func.jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    return torch.cat([j.reshape(x.shape[0], -1, params[n].numel()) for n, j in zip(names, jac)], dim=2)


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_fit_gathers_the_gauss_newton_kernel_without_warnings(tmp_path, outputs):
    x, y = _regression_data(24, outputs)
    model = Regressor(outputs)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, model, _Dicts(x=x, y=y),
             [GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="identity", sketch_dim=None)], epochs=3)
    assert not [w for w in seen if "GradientSketch" in str(w.message) or "Fisher" in str(w.message)]
    store = SketchStore.open(tmp_path / "run" / "store")
    names, spec = list(store.checkpoints), store.spec
    store.close()
    assert [curvature_estimator(tmp_path / "run", n) for n in names] == ["gauss-newton"] * 3
    K, meta = read_curvature(tmp_path / "run", names[-1], spec)
    J = _jacobian(model.eval(), x)  # the last slice is taken at the final weights
    want = torch.einsum("bon,bom->nm", J, J)  # Σ_t Σ_o ∇f_o ∇f_oᵀ
    assert meta["count"] == 24 and meta["task"] == "regression"
    torch.testing.assert_close(K, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    att = Attributor(tmp_path / "run", model)
    assert (att.method, att.kernel) == ("trak", "gauss-newton")
    assert att.scores({"x": x[:2], "y": y[:2]}).shape == (2, 24)


@pytest.mark.slow
def test_sampled_completions_estimate_the_softmax_gauss_newton_of_a_language_model():
    torch.manual_seed(0)
    model = TinyLM().double()
    ids, labels = _lm_data(3)
    batch = {"input_ids": ids, "labels": labels}
    task = resolve_task(model, batch, kernel_samples=1000)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def flat_grads(fn, b):  # per-example gradients [B, N], plain autograd loop
        rows = []
        for i in range(ids.shape[0]):
            bi = {k: v[i : i + 1] for k, v in b.items()}
            g = torch.autograd.grad(fn(model, bi).sum(), list(model.parameters()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    est = 0
    for fn, b, w in task.kernel_terms(model, batch, torch.Generator().manual_seed(1)):
        G = flat_grads(fn, b)
        est = est + w * G.T @ G
    # exact: Σ_examples Σ_positions J_pᵀ (diag p − p pᵀ) J_p over the positions with a label
    def logits(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat)), (ids,))[:, :-1]

    jac = torch.func.jacrev(logits, argnums=tuple(range(len(names))))(*params)
    J = torch.cat([j.reshape(*j.shape[:3], -1) for j in jac], dim=3)  # [B, L-1, V, N]
    p = torch.softmax(logits(*params), -1)
    exact = 0
    for b in range(ids.shape[0]):
        for pos in range(ids.shape[1] - 1):
            if labels[b, pos + 1] != -100:
                Jp, pp = J[b, pos], p[b, pos]
                exact = exact + Jp.T @ (torch.diag(pp) - torch.outer(pp, pp)) @ Jp
    rel = float((est - exact).norm() / exact.norm())
    assert rel < 0.1, rel


def test_a_model_without_forward_gets_the_margin_kernel_and_margin_queries(tmp_path):
    x, y, _ = blobs(n=24)
    model = NoForwardClassifier()
    _fit(tmp_path, model, _Dicts(x=x, y=y), [GradientSketch(dirpath=str(tmp_path / "run"), sketch_dim=16)])
    store = SketchStore.open(tmp_path / "run" / "store")
    names = list(store.checkpoints)
    store.close()
    assert {curvature_estimator(tmp_path / "run", n) for n in names} == {"margin-logits"}
    att = Attributor(tmp_path / "run", model)
    assert (att.method, att.kernel) == ("trak", "margin")
    q = {"x": x[:3], "y": y[:3]}
    att.scores(q)
    assert att.task is not None and att.task.kind == "classification"


def test_an_unrecognised_task_warns_once_per_fit_not_per_slice(tmp_path):
    class LogCosh(Regressor):
        def per_example_loss(self, batch):
            return torch.log(torch.cosh(self(batch["x"]) - batch["y"]))

    x, y = _regression_data(16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, LogCosh(), _Dicts(x=x, y=y),
             [GradientSketch(dirpath=str(tmp_path / "run"), sketch_dim=8)],
             epochs=3)
    mine = [w for w in seen if "empirical Fisher" in str(w.message)]
    assert len(mine) == 1 and "per_example_margin" in str(mine[0].message)


def test_an_explicit_task_is_used_and_checked():
    with pytest.raises(SketchConfigError, match="AttributionTask"):
        GradientSketch(dirpath="unused", sketch_dim=8, task="regression")
    reg, (x, y) = Regressor(), _regression_data(8)
    task = AttributionTask(kind="custom", loss=lambda m, b: m.per_example_loss(b),
                           query_loss=lambda m, b: -m(b["x"]), kernel_terms=None, kernel="empirical",
                           reason="given")
    assert GradientSketch(dirpath="unused", sketch_dim=8, task=task).task is task


# ---------------------------------------------------------------------------- the fallback names its fix
class MaskedEncoder(_Base):
    """``forward(x, mask) -> (pooled, logits)``, the pooled output first (as encoders return it): no
    output the loss computes is recognised as the logits, so the task falls back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 12)
        self.head = nn.Parameter(0.3 * torch.randn(12, 3))

    def forward(self, x, mask):
        pooled = torch.tanh(self.enc(x)) * mask[:, None]
        return pooled, pooled @ self.head

    def per_example_loss(self, batch):
        return F.cross_entropy(self(batch["x"], batch["mask"])[1], batch["y"], reduction="none")


class MaskedEncoderWithLogits(MaskedEncoder):
    def per_example_logits(self, batch):
        return self(batch["x"], batch["mask"])[1]


def _masked_batch(n=8):
    x, y, _ = blobs(n=n)
    return {"x": x, "mask": (torch.arange(n) % 4 != 3).float(), "y": y}


def test_unrecognised_classifier_names_per_example_logits_and_it_restores_the_margin_kernel():
    b = _masked_batch()
    task = resolve_task(MaskedEncoder(), b)
    assert (task.kind, task.kernel) == ("empirical", "empirical")
    assert "empirical Fisher" in task.reason and "per_example_logits(batch) -> [B, C]" in task.reason
    assert "batch['y']" in task.reason and "margin kernel" in task.reason
    assert "sample_labels" not in task.reason  # class labels: the logits are the fix, not a likelihood

    model = MaskedEncoderWithLogits()
    fixed = resolve_task(model, b)
    assert (fixed.kind, fixed.kernel) == ("classification", "margin-logits")
    assert "per_example_logits" in fixed.reason
    logp = torch.log_softmax(model(b["x"], b["mask"])[1].double(), -1)[torch.arange(8), b["y"]]
    margin = logp - torch.log1p(-logp.exp())  # log p_y − log(1 − p_y), independently
    torch.testing.assert_close(fixed.query_loss(model, b).double(), -margin, rtol=1e-4, atol=1e-5)


def test_per_example_logits_that_are_not_the_losss_logits_are_named_in_the_fallback():
    class Wrong(MaskedEncoder):
        def per_example_logits(self, batch):
            return -self(batch["x"], batch["mask"])[1]

    task = resolve_task(Wrong(), _masked_batch())
    assert task.kind == "empirical"
    assert "per_example_logits(batch) (8, 3) against batch['y'] is not the loss" in task.reason


def test_float_targets_name_sample_labels_for_a_likelihood_of_another_kind():
    reg, (x, y) = Regressor(), _regression_data(8)
    log_cosh = lambda m, b: torch.log(torch.cosh(m(b["x"]) - b["y"]))  # noqa: E731  (no recognised loss)
    task = resolve_task(reg, {"x": x, "y": y}, loss_fn=log_cosh)
    assert "sample_labels(batch, generator)" in task.reason and "per_example_logits" not in task.reason


def test_the_per_example_logits_fix_is_warned_once_per_fit(tmp_path):
    b = _masked_batch(24)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, MaskedEncoder(), _Dicts(**b),
             [GradientSketch(dirpath=str(tmp_path / "run"), sketch_dim=8)], epochs=2)
    mine = [w for w in seen if "empirical Fisher" in str(w.message)]
    assert len(mine) == 1 and "per_example_logits(batch) -> [B, C]" in str(mine[0].message)


class ShiftedBCE(_Base):
    """BCE whose logit is a submodule's output plus a bare parameter: no tapped output is the logit."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.shift = nn.Parameter(torch.tensor(0.3))

    def logit(self, x):
        return self.net(x)[:, 0] + self.shift

    def per_example_loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.logit(batch["x"]), batch["y"], reduction="none")


def test_float_zero_one_targets_name_the_binary_per_example_logits_fix():
    x, y, _ = blobs(n=8)
    batch = {"x": x, "y": (y == 1).float()}
    task = resolve_task(ShiftedBCE(), batch)
    assert task.kind == "empirical"
    assert "per_example_logits(batch) -> [B] or [B, 1]" in task.reason and "BCE-with-logits" in task.reason

    class Fixed(ShiftedBCE):
        def per_example_logits(self, batch):
            return self.logit(batch["x"])

    assert resolve_task(Fixed(), batch).kind == "binary"  # the fix the message names works


def test_the_default_language_model_kernel_takes_four_sampled_completions():
    """The default number of sampled completions per example, pinned by a literal (4 terms of weight 1/4)."""
    torch.manual_seed(0)
    model = TinyLM()
    ids, labels = _lm_data(3)
    batch = {"input_ids": ids, "labels": labels}
    task = resolve_task(model, batch)
    terms = task.kernel_terms(model, batch, torch.Generator().manual_seed(1))
    assert [w for _, _, w in terms] == [0.25, 0.25, 0.25, 0.25]
