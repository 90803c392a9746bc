"""Losses written the ordinary way (``F.*`` with their options) are recognised as the task they are.

Each recognised loss is checked against its definition written out here; losses of another kind
(a focal loss, a Gaussian likelihood with a predicted variance, Huber with δ ≠ 1) must fall back to
the empirical Fisher and say so, never get a kernel of a task they are not. The fits compare the
stored kernel and the scores with dense float64 references (identity sketch, plain autograd).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from attr_helpers import loop_grads
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_sketch.attribution import Attributor, Trak
from lightning_sketch.attribution.curvature import read_curvature
from lightning_sketch.attribution.task import resolve_task
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.store import SketchStore

D = 5


class _Model(LightningModule):
    """An MLP ``D → 8 → outputs`` whose ``per_example_loss`` is ``loss(self.net(x), batch)``."""

    def __init__(self, outputs, loss):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, outputs))
        self.loss = loss

    def per_example_loss(self, batch):
        return self.loss(self.net(batch["x"]), batch)

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return {
        "x": x,
        "cls": torch.arange(n) % 3,
        "bin": (torch.arange(n) % 2).float(),
        "multi": (torch.rand(n, 4, generator=g) > 0.5).float(),
        "reg": torch.randn(n, generator=g),
        "reg3": torch.randn(n, 3, generator=g),
        "count": torch.poisson(2 * torch.ones(n), generator=g),
        "w": torch.rand(n, generator=g) + 0.5,
    }


_W = torch.tensor([1.0, 2.0, 0.5])
# name: (outputs, target column, loss(out, batch) with y = batch["y"], kind, kernel)
_RECOGNISED = {
    "CE label_smoothing=0.1": (3, "cls", lambda o, b: F.cross_entropy(o, b["y"], reduction="none",
                                                                       label_smoothing=0.1),
                               "classification", "margin-logits"),
    "CE class weights": (3, "cls", lambda o, b: F.cross_entropy(o, b["y"], weight=_W.to(o.dtype),
                                                                 reduction="none"),
                         "classification", "margin-logits"),
    "CE class weights and label_smoothing=0.1": (3, "cls", lambda o, b: F.cross_entropy(
        o, b["y"], weight=_W.to(o.dtype), label_smoothing=0.1, reduction="none"), "classification",
        "margin-logits"),
    "CE sample weights": (3, "cls", lambda o, b: b["w"] * F.cross_entropy(o, b["y"], reduction="none"),
                          "classification", "margin-logits"),
    "BCE pos_weight": (1, "bin", lambda o, b: F.binary_cross_entropy_with_logits(
        o[:, 0], b["y"], pos_weight=torch.tensor(3.0), reduction="none"), "binary", "margin-logits"),
    "multi-label BCE, sum": (4, "multi", lambda o, b: F.binary_cross_entropy_with_logits(
        o, b["y"], reduction="none").sum(1), "multilabel", "gauss-newton"),
    "multi-label BCE, mean": (4, "multi", lambda o, b: F.binary_cross_entropy_with_logits(
        o, b["y"], reduction="none").mean(1), "multilabel", "gauss-newton"),
    "L1": (1, "reg", lambda o, b: F.l1_loss(o[:, 0], b["y"], reduction="none"), "regression", "gauss-newton"),
    "smooth L1": (1, "reg", lambda o, b: F.smooth_l1_loss(o[:, 0], b["y"], reduction="none"),
                  "regression", "gauss-newton"),
    "Huber, 3 outputs, mean": (3, "reg3", lambda o, b: F.huber_loss(o, b["y"], reduction="none").mean(1),
                               "regression", "gauss-newton"),
    "Poisson NLL": (1, "count", lambda o, b: F.poisson_nll_loss(o[:, 0], b["y"], reduction="none"),
                    "regression", "gauss-newton"),
    "sample-weighted MSE": (1, "reg", lambda o, b: b["w"] * (o[:, 0] - b["y"]) ** 2,
                            "regression", "gauss-newton"),
}


def _gaussian_nll(o, b):
    return F.gaussian_nll_loss(o[:, 0], b["y"], F.softplus(o[:, 1]) + 1e-3, reduction="none")


def _focal(o, b):  # (1 − p_y)² · CE: not linear in the log-probabilities
    ce = F.cross_entropy(o, b["y"], reduction="none")
    return (1 - torch.exp(-ce)) ** 2 * ce


_FALLBACK = {
    "focal loss": (3, "cls", _focal, "per_example_logits"),
    "Gaussian NLL, predicted variance": (2, "reg", _gaussian_nll, "sample_labels"),
    "Huber delta=0.3": (1, "reg", lambda o, b: F.huber_loss(o[:, 0], b["y"], reduction="none", delta=0.3),
                        "sample_labels"),
    "CE of logits / 2": (3, "cls", lambda o, b: F.cross_entropy(o / 2, b["y"], reduction="none"),
                         "per_example_logits"),
}


def _batch(col, n=12, seed=0):
    d = _data(n, seed)
    return {"x": d["x"], "y": d[col], "w": d["w"]}


@pytest.mark.parametrize("name", list(_RECOGNISED))
def test_weighted_smoothed_multilabel_and_robust_losses_are_recognised(name):
    outputs, col, loss, kind, kernel = _RECOGNISED[name]
    torch.manual_seed(0)
    model = _Model(outputs, loss)
    task = resolve_task(model, _batch(col))
    assert (task.kind, task.kernel) == (kind, kernel), task.reason
    one = {k: v[:1] for k, v in _batch(col).items()}  # a single query example is recognised alike
    assert resolve_task(model, one).kind == kind, resolve_task(model, one).reason


@pytest.mark.parametrize("name", list(_FALLBACK))
def test_losses_of_another_kind_fall_back_and_name_the_fix(name):
    outputs, col, loss, fix = _FALLBACK[name]
    torch.manual_seed(0)
    task = resolve_task(_Model(outputs, loss), _batch(col))
    assert (task.kind, task.kernel, task.kernel_terms) == ("empirical", "empirical", None)
    assert fix in task.reason


def test_multilabel_kernel_terms_are_each_labels_logit():
    torch.manual_seed(0)
    outputs, col, loss, *_ = _RECOGNISED["multi-label BCE, sum"]
    model, b = _Model(outputs, loss), _batch(col)
    task = resolve_task(model, b)
    assert task.kernel_terms is not None
    fns = [fn(model, bb) for fn, bb, w in task.kernel_terms(model, b, torch.Generator())]
    torch.testing.assert_close(torch.stack(fns, 1), model.net(b["x"]))  # f_k = z_k, weight 1 each
    torch.testing.assert_close(task.query_loss(model, b), loss(model.net(b["x"]), b))  # queries: −loss


# ---------------------------------------------------------------------------- fits against dense references
class _Dicts(Dataset):
    def __init__(self, cols):
        self.cols = cols

    def __len__(self):
        return len(self.cols["x"])

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.cols.items()}, "index": i}


def _fit_identity(root, model, cols):
    seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sketch = GradientSketch(dirpath=str(root / "run"), sketch_kind="identity", sketch_dim=None)
        Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, deterministic=True, default_root_dir=root, accelerator="cpu",
                callbacks=[sketch]).fit(model, DataLoader(_Dicts(cols), batch_size=6))
    assert not [w for w in seen if "empirical Fisher" in str(w.message)]  # the task was recognised
    store = SketchStore.open(root / "run" / "store")
    name, spec = list(store.checkpoints)[-1], store.spec
    store.close()
    K, meta = read_curvature(root / "run", name, spec)
    return K, meta


def _margin(z, y):  # log p_y − log(1 − p_y) = z_y − logsumexp_{c ≠ y} z_c
    others = torch.where(F.one_hot(y, z.shape[1]).bool(), torch.full_like(z, -torch.inf), z)
    return z[torch.arange(len(y)), y] - torch.logsumexp(others, 1)


def test_weighted_cross_entropy_fit_stores_the_margin_kernel_and_scores_exact_trak(tmp_path):
    torch.manual_seed(0)
    cols = _batch("cls", n=12)
    outputs, _, loss, *_ = _RECOGNISED["CE class weights"]
    model = _Model(outputs, loss).double()
    cols = {k: (v.double() if v.is_floating_point() else v) for k, v in cols.items()}
    K, meta = _fit_identity(tmp_path, model, cols)
    model.eval()
    neg_margin = lambda m, b: -_margin(m.net(b["x"]), b["y"])  # noqa: E731
    phi = loop_grads(model, neg_margin, cols)  # [T, N]
    assert meta["task"] == "classification"
    torch.testing.assert_close(K, phi.T @ phi, rtol=1e-6, atol=1e-9)
    G = loop_grads(model, lambda m, b: m.per_example_loss(b), cols)  # the stored rows, unsketched
    q_batch = {k: v[:2] for k, v in cols.items()}
    lam = 0.05
    att = Attributor(tmp_path / "run", model, method=Trak(damping=lam))
    assert att.kernel == "margin"
    got = att.scores(q_batch)
    q = loop_grads(model, neg_margin, q_batch)
    want = q @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=phi.dtype), G.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8 * float(want.abs().max()))


def test_multilabel_fit_stores_the_gauss_newton_kernel_of_the_logits(tmp_path):
    torch.manual_seed(0)
    outputs, col, loss, *_ = _RECOGNISED["multi-label BCE, mean"]
    cols = _batch(col, n=12)
    model = _Model(outputs, loss)
    K, meta = _fit_identity(tmp_path, model, cols)
    model.eval()
    rows = [loop_grads(model, lambda m, b, k=k: m.net(b["x"])[:, k], cols).double() for k in range(outputs)]
    want = sum(r.T @ r for r in rows)  # Σ_t Σ_k ∇z_k ∇z_kᵀ
    assert meta["task"] == "multilabel"
    torch.testing.assert_close(K, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    scores = Attributor(tmp_path / "run", model).scores({k: v[:2] for k, v in cols.items()})
    assert scores.shape == (2, 12) and bool(torch.isfinite(scores).all())
