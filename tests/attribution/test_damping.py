"""The automatic damping of ``trak``/``fisher_if`` and its diagnostic (``Attributor.damping_info``).

References are computed here from the stored kernel (read as a plain matrix) with dense linear algebra,
not through the engine's weights; expected default values are literals, so a changed default fails.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from attr_helpers import TinyClassifier, blobs, full_batch, loader
from lightning.pytorch import Trainer, seed_everything

from lightning_sketch.attribution import Attributor
from lightning_sketch.attribution.curvature import read_curvature
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.store import SketchStore

D = 16


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
        assert s["unit"] == pytest.approx(float(K.trace()) / len(y), rel=1e-9)
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
