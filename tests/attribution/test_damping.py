"""The automatic damping of ``trak``/``fisher_if`` and its diagnostic (``Attributor.damping_info``).

References are computed here from the stored kernel (read as a plain matrix) with dense linear algebra,
not through the engine's weights; expected default values are literals, so a changed default fails.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch, loader
from lightning.pytorch import Trainer, seed_everything

from lightning_sketch.attribution import Attributor
from lightning_sketch.attribution.curvature import read_curvature
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

D = 16
#: the default damping ratio on TRAK's margin kernel, written out (not imported)
MARGIN_RATIO = 0.31622776601683794  # 10^-0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("damping")
    seed_everything(0, verbose=False)
    x, y, _ = blobs(n=40)
    model = TinyClassifier()
    Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, deterministic=True, default_root_dir=root, accelerator="cpu",
            callbacks=[GradientSketch(dirpath=str(root / "run"), sketch_kind="affd", sketch_dim=D)]
            ).fit(model, loader(x, y, batch_size=8))
    return root / "run", model, x, y


def _tau(path, model):
    """τ of the run, from its files: sketched saved weights Φθ_c and mean stored rows ḡ_c per slice,
    Σ_c max(0, −⟨Φθ_c − Φθ_{c−1}, (ḡ_c + ḡ_{c−1})/2⟩ / ‖·‖²), the first interval at the mean rate;
    at least Σ_c η_c (step_c − step_{c−1}) of the recorded learning rates."""
    store = SketchStore.open(path / "store")
    try:
        names, spec = list(store.checkpoints), dict(store.manifest["spec"])
        steps = [c["step"] for c in store.manifest["checkpoints"]]
        lrs = [c["lr"] for c in store.manifest["checkpoints"]]
        fp = store.manifest["layout_fingerprint"]
        sketch = make(**spec)
        pos, mean = [], []
        for n in names:
            w = store.load_weights(n, fp)
            flat = torch.cat([w[k].double().reshape(-1) for k, p in model.named_parameters() if p.requires_grad])
            pos.append(sketch.apply(flat))
            mean.append(torch.from_numpy(np.asarray(store.vectors(n), dtype=np.float64)).mean(0))
    finally:
        store.close()
    total = 0.0
    for c in range(1, len(names)):
        g = (mean[c] + mean[c - 1]) / 2
        total += max(0.0, -float((pos[c] - pos[c - 1]) @ g) / float(g @ g))
    # at least Σ_s η_s of the recorded learning rates (plain SGD's time over those steps)
    by_lr = sum(lr * (b - a) for lr, a, b in zip(lrs, [0, *steps[:-1]], steps))
    return max(total * (1 + steps[0] / (steps[-1] - steps[0])), by_lr)


def _default_lambda(K, T, r, tau):
    """λ_c = max(ρ · tr(K_c)/T_c, T_c/τ) / r_c with ρ = MARGIN_RATIO (a literal)."""
    return max(MARGIN_RATIO * float(K.trace()) / T, T / tau) / r


def _kernels(path):
    store = SketchStore.open(path / "store")
    names, spec = list(store.checkpoints), dict(store.manifest["spec"])
    store.close()
    return names, [read_curvature(path, n, spec) for n in names]


def test_damping_info_reports_each_slices_lambda_and_effective_dimension(run):
    path, model, x, y = run
    att = Attributor(path, model)
    info = att.damping_info()
    names, kernels = _kernels(path)
    assert (info["method"], info["kernel"]) == ("trak", "margin")
    assert [s["slice"] for s in info["slices"]] == names
    for s, (K, meta) in zip(info["slices"], kernels):
        ev = torch.linalg.eigvalsh(K).clamp_min(0)
        lam = s["lambda"]
        assert s["T"] == meta["count"] == len(y)
        assert s["trace_over_T"] == pytest.approx(float(K.trace()) / len(y), rel=1e-9)
        assert s["unit"] == pytest.approx(
            max(s["trace_over_T"], len(y) / (MARGIN_RATIO * info["training_time"][0])) / s["residual"], rel=1e-12)
        assert s["d_eff"] == pytest.approx(float((ev / (ev + lam)).sum()), rel=1e-6)
        assert 0 < s["d_eff"] <= s["rank"] <= D
    assert info["d_eff_fraction"] == pytest.approx(
        statistics.median(s["d_eff"] / s["rank"] for s in info["slices"]), rel=1e-9)


def test_top_k_overlap_equals_the_overlap_of_attributors_at_scaled_ratios(run):
    path, model, x, y = run
    q = full_batch(x[:6], y[:6])
    att = Attributor(path, model)
    info = att.damping_info(q, k=5)
    ref = Attributor(path, model, damping_ratio=att.damping_ratio).top_k(q, k=5)[0]
    for label, f in (("lambda/sqrt10", 10**-0.5), ("lambda*sqrt10", 10**0.5)):
        other = Attributor(path, model, damping_ratio=att.damping_ratio * f).top_k(q, k=5)[0]
        want = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref, other)) / (5 * len(ref))
        assert info["top_k_overlap"][label] == pytest.approx(want, abs=1e-12)
    # the check leaves the Attributor's damping as it was
    assert torch.equal(att.top_k(q, k=5)[0], ref)


def test_methods_without_damping_say_so(run):
    path, model, _, _ = run
    assert Attributor(path, model, method="tracin").damping_info() == {
        "method": "tracin", "kernel": None, "rule": None}


def _rows(path, name):
    store = SketchStore.open(path / "store")
    G = torch.from_numpy(np.asarray(store.vectors(name), dtype=np.float64))
    store.close()
    return G


def test_the_default_margin_damping_is_pinned(run):
    """λ_c = max(ρ · tr(K_c)/T_c, T_c/τ) / r_c on the margin kernel, r_c = √(tr(G_cᵀG_c)/tr(K_c)) the
    RMS residual, τ the run's training time read off its files, ρ = MARGIN_RATIO (a literal: changing
    the default must change this test)."""
    path, model, x, y = run
    att = Attributor(path, model)
    assert att.damping_ratio == pytest.approx(MARGIN_RATIO, rel=1e-12)
    names, kernels = _kernels(path)
    info = att.damping_info()
    tau = _tau(path, model)
    assert info["training_time"] == [pytest.approx(tau, rel=1e-6)]
    floored = 0
    for s, name, (K, _) in zip(info["slices"], names, kernels):
        G = _rows(path, name)
        r = min(1.0, max(1e-3, (float((G * G).sum()) / float(K.trace())) ** 0.5))
        assert s["residual"] == pytest.approx(r, rel=1e-6)
        assert s["lambda"] == pytest.approx(_default_lambda(K, len(y), r, tau), rel=1e-6)
        floored += len(y) / tau > MARGIN_RATIO * float(K.trace()) / len(y)
    assert floored  # this two-epoch run is short enough that the training-time floor decides a slice
    # the scores invert K + λI at that λ (last slice alone, dense reference)
    last = Attributor(path, model, checkpoints=[names[-1]])
    q = full_batch(x[:4], y[:4])
    K, _ = kernels[-1]
    lam = info["slices"][-1]["lambda"]
    qs = last.query_sketches(q)[0].double()
    want = qs @ torch.linalg.solve(K + lam * torch.eye(D, dtype=torch.float64), _rows(path, names[-1]).T)
    torch.testing.assert_close(last.scores(q), want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))


def test_the_default_ratio_on_other_kernels_is_pinned(tmp_path):
    """Fisher / Gauss–Newton / empirical kernels: λ_c = 10^-0.5 · tr(K_c)/T_c (no residual factor)."""
    seed_everything(0, verbose=False)
    x, y, _ = blobs(n=40)
    model = TinyClassifier()
    Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, deterministic=True, default_root_dir=tmp_path, accelerator="cpu",
            callbacks=[GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=D,
                                      curvature="fisher")]).fit(model, loader(x, y, batch_size=8))
    att = Attributor(tmp_path / "run", model, method="trak")
    assert att.kernel == "fisher" and att.damping_ratio == pytest.approx(0.31622776601683794, rel=1e-12)
    names, kernels = _kernels(tmp_path / "run")
    assert len(names) == 1  # one slice: no trajectory, so no training-time floor
    info = att.damping_info()
    assert info["training_time"] == [None]
    for s, (K, _) in zip(info["slices"], kernels):
        assert s["residual"] == 1.0
        assert s["lambda"] == pytest.approx(0.31622776601683794 * float(K.trace()) / len(y), rel=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_training_time_reads_the_time_of_gradient_descent_off_its_trajectory(beta):
    """On a quadratic loss trained by heavy-ball SGD (lr η, momentum β, 50 steps, a slice every 10),
    the time τ read off the slices' weights and mean gradients is the optimiser's own:
    η Σ_s (1 − β^s)/(1 − β) (the momentum builds up over the first steps)."""
    from lightning_sketch.attribution.damping import training_time

    gen = torch.Generator().manual_seed(0)
    A = torch.rand(20, generator=gen, dtype=torch.float64) * 1.5 + 0.5  # curvatures in [0.5, 2]
    star = torch.randn(20, generator=gen, dtype=torch.float64)
    eta, theta, v = 0.01, torch.zeros(20, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    pos, mean, steps = [], [], []
    for c in range(5):
        for _ in range(10):
            v = beta * v + A * (theta - star)
            theta = theta - eta * v
        pos.append(theta.clone()), mean.append(A * (theta - star)), steps.append(10 * (c + 1))
    want = eta * sum((1 - beta**s) / (1 - beta) for s in range(1, 51))
    assert training_time(pos, mean, steps) == pytest.approx(want, rel=0.06)
    assert np.isnan(training_time(pos[:1], mean[:1], steps[:1]))  # one slice: no trajectory
    # the recorded learning rates bound τ from below (Σ η_c Δstep_c); here the trajectory is longer
    assert training_time(pos, mean, steps, [eta] * 5) == pytest.approx(want, rel=0.06)
    # weights that moved, but never down the gradient (SGD noise): the learning rates decide
    uphill = [c * mean[0] for c in range(5)]
    assert training_time(uphill, [mean[0]] * 5, steps, [eta, eta, 2 * eta, 2 * eta, 2 * eta]) == pytest.approx(
        eta * 20 + 2 * eta * 30, rel=1e-12)
    # weights that never moved (a store written by hand): no trajectory, whatever the learning rates
    still = [torch.zeros(20, dtype=torch.float64)] * 5
    assert np.isnan(training_time(still, mean, steps, [eta] * 5))


def test_a_missing_weights_file_turns_the_floor_off_with_a_warning_not_the_query(run, tmp_path, caplog):
    """τ reads every slice's weights; a slice the query does not use may have lost its file: the scores of
    the other slices are still given (with the floor off and one warning), as before the floor existed."""
    import logging
    import shutil

    path, model, x, y = run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    names, kernels = _kernels(copy)
    (copy / "weights" / f"{names[0]}.pt").unlink()
    q = full_batch(x[:4], y[:4])
    with caplog.at_level(logging.WARNING, logger="lightning_sketch.attribution.query"):
        att = Attributor(copy, model, checkpoints=[names[-1]])
        top = att.top_k(q, k=3)
    assert att.training_time(0) is None
    assert any("training-time floor" in r.getMessage() and names[0] in r.getMessage() for r in caplog.records)
    G = _rows(copy, names[-1])
    K = kernels[-1][0]
    r = min(1.0, max(1e-3, (float((G * G).sum()) / float(K.trace())) ** 0.5))
    assert att.slice_damping(0, names[-1]) == pytest.approx(MARGIN_RATIO * float(K.trace()) / len(y) / r, rel=1e-6)
    assert top[0].shape == (4, 3)
    # an explicit damping needs no τ: nothing is read for it
    assert Attributor(path, model, damping=0.5).training_time(0) is None


def test_a_view_reuses_the_training_time_instead_of_reading_every_weights_file_again(run, monkeypatch):
    from lightning_sketch.attribution import _engine

    path, model, x, y = run
    att = Attributor(path, model)
    tau = att.training_time(0)
    assert tau is not None

    def no_reads(*args, **kwargs):
        raise AssertionError("weights read again")

    monkeypatch.setattr(_engine, "load_weights", no_reads)
    view = att.view("trak")
    assert view.training_time(0) == tau
    assert view.slice_damping(0, view.checkpoints[-1]) == pytest.approx(att.slice_damping(0, att.checkpoints[-1]))
