"""TRAK's margin kernel: gathered by GradientSketch's default, used by the default Attributor (trak).

References are built here with plain autograd loops and dense matrices, independently of the
library's sketching, curvature and scoring code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attr_helpers import TinyClassifier, blobs, full_batch, loader, loop_grads
from lightning.pytorch import Trainer, seed_everything

from lightning_sketch.attribution import (
    DEFAULT_DAMPING_RATIO,
    Attributor,
)
from lightning_sketch.attribution.curvature import (
    curvature_estimator,
    read_curvature,
    write_curvature,
)
from lightning_sketch.attribution.task import resolve_task
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.exceptions import SketchConfigError, StoreNotFoundError
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

D = 16


class NoMarginClassifier(TinyClassifier):
    """A classifier with only ``per_example_loss`` (cross-entropy of ``forward``): the convention."""

    per_example_margin = None  # not callable: the margin must come from the logits


def _ref_margin(model, batch):
    """m = z_y − log Σ_{j≠y} exp z_j, written out (not the library's classification_margin)."""
    z = model(batch["x"])
    zy = z[torch.arange(len(batch["y"])), batch["y"]]
    mask = F.one_hot(batch["y"], z.shape[1]).bool()
    return zy - torch.log(torch.where(mask, torch.zeros_like(z), z.exp()).sum(1))


def _fit(root, model, callbacks, n=32, epochs=2):
    seed_everything(0, verbose=False)
    x, y, _ = blobs(n=n)
    Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, deterministic=True, default_root_dir=root, accelerator="cpu",
            callbacks=callbacks).fit(model, loader(x, y, batch_size=8))
    return x, y


def _dense_phi(spec, N):
    sketch = make(spec["kind"], N, spec["sketch_dim"], seed=spec["seed"], **spec.get("options", {}))
    return sketch.apply(torch.eye(N, dtype=torch.float64)).T  # [D, N]: Φ e_i in column i


@pytest.mark.parametrize("cls, estimator", [(TinyClassifier, "margin"), (NoMarginClassifier, "margin-logits")])
def test_default_callback_gathers_the_margin_kernel_and_trak_uses_it(tmp_path, cls, estimator):
    seed_everything(0, verbose=False)
    model = cls()
    run = tmp_path / "run"
    x, y = _fit(tmp_path, model, [GradientSketch(dirpath=str(run), sketch_kind="affd", sketch_dim=D)])
    store = SketchStore.open(run / "store")
    names, spec = list(store.checkpoints), dict(store.manifest["spec"])
    G = [torch.from_numpy(np.asarray(store.vectors(n), dtype=np.float64)) for n in names]
    store.close()
    assert [curvature_estimator(run, n) for n in names] == [estimator] * len(names)
    # The last slice was taken at the final weights: K = Σ_t Φ∇m_t ∇m_tᵀΦᵀ, from an exact loop.
    m64 = cls().double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    layout = ParamLayout.from_module(m64)
    phi = _dense_phi(spec, layout.dim)
    grads = loop_grads(m64, lambda mod, b: -_ref_margin(mod, b), full_batch(x.double(), y), layout=layout)
    rows = grads @ phi.T  # [T, D]
    K, meta = read_curvature(run, names[-1], spec)
    assert meta["count"] == len(y)
    torch.testing.assert_close(K, rows.T @ rows, rtol=1e-4, atol=1e-6 * float(K.trace()))
    # The loss gradients the store holds are −(1 − p_t) times the margin gradients (TRAK's weighting).
    p = torch.softmax(m64(x.double()), 1)[torch.arange(len(y)), y]
    torch.testing.assert_close(G[-1], (1 - p)[:, None] * rows, rtol=1e-3, atol=1e-5)

    att = Attributor(run, model)  # nothing else passed
    assert (att.method, att.kernel, att.damping_ratio) == ("trak", "margin", DEFAULT_DAMPING_RATIO)
    # Single-slice reference: q (K + λI)⁻¹ Gᵀ, λ = ρ tr(K)/T, queries = margin gradients.
    last = Attributor(run, model, checkpoints=[names[-1]], method="trak")
    q = full_batch(x[:4], y[:4])
    qs = loop_grads(m64, lambda mod, b: -_ref_margin(mod, b), full_batch(x[:4].double(), y[:4]), layout=layout) @ phi.T
    r = min(1.0, max(1e-3, (float((G[-1] ** 2).sum()) / float(K.trace())) ** 0.5))  # RMS residual
    lam = DEFAULT_DAMPING_RATIO * float(K.trace()) / len(y) / r
    want = qs @ torch.linalg.solve(K + lam * torch.eye(D, dtype=torch.float64), G[-1].T)
    torch.testing.assert_close(last.scores(q), want, rtol=2e-3, atol=1e-6 * float(want.abs().max()))


def test_fisher_option_keeps_the_sampled_label_fisher_and_fisher_if(tmp_path):
    run = tmp_path / "run"
    model = TinyClassifier()
    _fit(tmp_path, model, [GradientSketch(dirpath=str(run), sketch_kind="affd", sketch_dim=D, curvature="fisher")])
    store = SketchStore.open(run / "store")
    names = list(store.checkpoints)
    store.close()
    assert {curvature_estimator(run, n) for n in names} == {"sampled"}
    att = Attributor(run, model)
    assert (att.method, att.kernel, att.damping_ratio) == ("fisher_if", "fisher", DEFAULT_DAMPING_RATIO)
    trak = Attributor(run, model, method="trak")  # trak inverts the kernel the run gathered
    assert (trak.kernel, trak.damping_ratio) == ("fisher", DEFAULT_DAMPING_RATIO)


def _synthetic_run(root, estimator, T=20, seed=0):
    """A run directory with random stored rows and a random PSD kernel under ``estimator``."""
    torch.manual_seed(seed)
    model = TinyClassifier().double()
    layout = ParamLayout.from_module(model)
    sketch = make("affd", layout.dim, D, seed=3)
    store = SketchStore.create(root / "store", sketch.spec, layout=layout)
    g = torch.Generator().manual_seed(seed)
    store.add_checkpoint("s0", step=0, lr=0.1)
    store.append(torch.arange(T), torch.randn(T, D, generator=g, dtype=torch.float64), checkpoint="s0")
    store.save_weights("s0", {n: t.detach().clone() for n, t in layout.params(model).items()}, root / "weights",
                       layout.fingerprint())
    A = torch.randn(D, 2 * D, generator=g, dtype=torch.float64)
    write_curvature(root, "s0", A @ A.T, T, sketch.spec, estimator, store=store)
    store.commit()
    store.close()
    return model


def test_fisher_if_refuses_a_margin_kernel_and_mixed_ensembles_fall_back_to_gradients(tmp_path):
    model = _synthetic_run(tmp_path / "a", "margin")
    _synthetic_run(tmp_path / "b", "sampled", seed=1)
    with pytest.raises(StoreNotFoundError, match="curvature='fisher'"):
        Attributor(tmp_path / "a", model, method="fisher_if")
    mixed = Attributor([tmp_path / "a", tmp_path / "b"], model)
    assert (mixed.method, mixed.kernel) == ("trak", "gradients")
    # an explicit ratio wins over the kernel's automatic one
    assert Attributor(tmp_path / "a", model, damping_ratio=0.1).damping_ratio == 0.1


def test_the_recognised_task_measures_the_margin():
    x, y, _ = blobs(n=6)
    b = full_batch(x, y)
    own = TinyClassifier()
    task = resolve_task(own, b)
    assert (task.kind, task.kernel) == ("custom", "margin")
    torch.testing.assert_close(task.query_loss(own, b), -_ref_margin(own, b))
    conv = NoMarginClassifier()
    task = resolve_task(conv, b)
    assert (task.kind, task.kernel) == ("classification", "margin-logits")
    torch.testing.assert_close(task.query_loss(conv, b), -_ref_margin(conv, b))
    # a loss that is not a (weighted) cross-entropy of the logits: no margin, and the reason
    task = resolve_task(conv, b, loss_fn=lambda m, bb: m.per_example_loss(bb) ** 2)
    assert task.kernel == "empirical" and "cross-entropy" in task.reason


def test_curvature_argument_is_checked():
    with pytest.raises(SketchConfigError, match="curvature"):
        GradientSketch(dirpath="unused", sketch_dim=D, curvature="hessian")
