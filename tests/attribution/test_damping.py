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
        assert s["unit"] == pytest.approx(s["trace_over_T"] / s["residual"], rel=1e-12)
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
    """λ_c = ρ · tr(K_c)/T_c / r_c on the margin kernel, r_c = √(tr(G_cᵀG_c)/tr(K_c)) the RMS residual,
    ρ = MARGIN_RATIO (a literal: changing the default must change this test)."""
    path, model, x, y = run
    att = Attributor(path, model)
    assert att.damping_ratio == pytest.approx(MARGIN_RATIO, rel=1e-12)
    names, kernels = _kernels(path)
    info = att.damping_info()
    for s, name, (K, _) in zip(info["slices"], names, kernels):
        G = _rows(path, name)
        r = min(1.0, max(1e-3, (float((G * G).sum()) / float(K.trace())) ** 0.5))
        assert s["residual"] == pytest.approx(r, rel=1e-6)
        assert s["lambda"] == pytest.approx(MARGIN_RATIO * float(K.trace()) / len(y) / r, rel=1e-6)
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
    for s, (K, _) in zip(att.damping_info()["slices"], kernels):
        assert s["residual"] == 1.0
        assert s["lambda"] == pytest.approx(0.31622776601683794 * float(K.trace()) / len(y), rel=1e-9)
