"""GradientSketch's sampled-label curvature (curvature="fisher"): written per slice, verified, used by fisher_if.

The default kernel (TRAK's margin kernel) is tested in tests/attribution/test_margin_kernel.py."""

from __future__ import annotations

import numpy as np
import torch
from attribution.attr_helpers import TinyClassifier, blobs, full_batch, loader
from lightning.pytorch import Trainer, seed_everything

from lightning_sketch.attribution import Attributor
from lightning_sketch.attribution.curvature import curvature_slices, read_curvature
from lightning_sketch.callbacks import GradientSketch
from lightning_sketch.store import SketchStore


def _fit(root, callbacks, epochs=2):
    seed_everything(0, verbose=False)
    model = TinyClassifier()
    x, y, _ = blobs(n=32)
    Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, deterministic=True, default_root_dir=root, accelerator="cpu",
            callbacks=callbacks).fit(model, loader(x, y, batch_size=8))
    return model, x, y


def test_fisher_curvature_is_written_and_the_default_attributor_uses_it(tmp_path):
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=16, curvature="fisher")
    model, x, y = _fit(tmp_path, [cb])
    store = SketchStore.open(tmp_path / "run" / "store")
    names, spec = list(store.checkpoints), dict(store.manifest["spec"])
    store.close()
    assert curvature_slices(tmp_path / "run") == sorted(names) and len(names) == 2
    for n in names:
        m, meta = read_curvature(tmp_path / "run", n, spec)
        assert meta["count"] == 32 and meta["estimator"] == "sampled"
        evals = torch.linalg.eigvalsh(m)
        assert float(evals.min()) > -1e-9 * float(evals.max()) and float(m.trace()) > 0  # a Gram matrix
    att = Attributor(tmp_path / "run", model)
    assert att.method == "fisher_if" and att.checkpoints == names
    ids, s = att.top_k(full_batch(x[:3], y[:3]), k=4)
    assert ids.shape == (3, 4) and bool(torch.isfinite(s).all())


def test_curvature_pass_leaves_training_unchanged(tmp_path):
    with_cb, _, _ = _fit(tmp_path / "a", [GradientSketch(dirpath=str(tmp_path / "a" / "run"), sketch_dim=16,
                                                         curvature="fisher")])
    without, _, _ = _fit(tmp_path / "b", [GradientSketch(dirpath=str(tmp_path / "b" / "run"), sketch_dim=16,
                                                         curvature="none")])
    plain, _, _ = _fit(tmp_path / "c", [])
    for a, b, c in zip(with_cb.parameters(), without.parameters(), plain.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert curvature_slices(tmp_path / "b" / "run") == []
    assert Attributor(tmp_path / "b" / "run", without).method == "trak"
    # the sampled labels differ from the true ones: the curvature is not the empirical Fisher
    store = SketchStore.open(tmp_path / "a" / "run" / "store")
    name, spec = store.checkpoints[-1], dict(store.manifest["spec"])
    G = np.asarray(store.vectors(name), dtype=np.float64)
    store.close()
    F_sampled = read_curvature(tmp_path / "a" / "run", name, spec)[0].numpy()
    assert not np.allclose(F_sampled, G.T @ G, rtol=1e-3)
