"""Hostile and wrong input through the whole training path: each gets a typed error or documented handling.

Covered: wrongly typed callback arguments, NaN/inf losses and gradients, empty datasets, duplicate
and unfit example ids, a query model of another architecture, a hand-edited sketch spec, D > N,
batch size 1, BatchNorm and dropout under per-example gradients, and ``bf16-mixed`` training.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _common import Tiny, loader, trainer
from exact_refs import dense_hessian, loop_grads
from torch import nn

from lightning_sketch.attribution import Attributor
from lightning_sketch.callbacks import (
    GradientSketch,
    HessianSpectrum,
    IntrinsicDimension,
    SearchCriteria,
    SpectrumNumerics,
)
from lightning_sketch.exceptions import (
    DuplicateIdError,
    LayoutMismatchError,
    NonFiniteGradientError,
    SketchConfigError,
    SketchInputError,
    SketchMismatchError,
    SpectrumError,
    StoreCorruptError,
    SubspaceError,
    UnsupportedModelError,
)
from lightning_sketch.gradients import ParamLayout
from lightning_sketch.sketches import make
from lightning_sketch.sketches.per_layer import PerLayerSketch
from lightning_sketch.spectrum import load_snapshot
from lightning_sketch.store import SketchStore, inspect_store


def _gs(root, **kw) -> GradientSketch:
    args = dict(dirpath=str(root / "run"), sketch_kind="affd", sketch_dim=8)
    args.update(kw)
    return GradientSketch(**args)


def _hs(**kw) -> HessianSpectrum:
    args = dict(k=2, sketch_kind="dense", sketch_dim=8, at_steps=[0], every_n_steps=None, density=False, plot=False,
                probe_batches=1)
    args.update(kw)
    return HessianSpectrum(**args)


def _loop_grads(model: nn.Module, batch: dict) -> torch.Tensor:
    """Exact per-example gradients [B, N] of the module's own per-example loss (tests/exact_refs.py)."""
    return loop_grads(model, lambda m, b: m.per_example_loss(b), batch)


def _full(n: int, seed: int = 1, dtype=torch.float32) -> dict:
    return next(iter(loader(n, n, seed=seed, dtype=dtype)))


def _sorted(store: SketchStore, name: str):
    ids, vecs = store.ids(name), np.asarray(store.vectors(name))
    order = np.argsort(ids)
    return ids[order], vecs[order]


# ------------------------------------------------------------------ wrong types
@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (GradientSketch, dict(dirpath="d", sketch_kind="nope"), SketchConfigError, "`sketch_kind` must be one of"),
        (GradientSketch, dict(dirpath=None), SketchConfigError, "`dirpath` must be a non-empty path"),
        (GradientSketch, dict(dirpath="d", include="net.*"), SketchConfigError, r"write \['net\.\*'\] for one"),
        (GradientSketch, dict(dirpath="d", id_key=3), SketchConfigError, "`id_key` must be a str"),
        (GradientSketch, dict(dirpath="d", save_weights="yes"), SketchConfigError, "`save_weights` must be a bool"),
        (GradientSketch, dict(dirpath="d", sketch_dim="1024"), SketchConfigError, "`sketch_dim` must be a positive int"),
        (SpectrumNumerics, dict(outlier_threshold="0.2"), SketchConfigError, r"`outlier_threshold` must be a number in \(0, 1\)"),
        (HessianSpectrum, dict(at_steps=5), SketchConfigError, "`at_steps` must be a list"),
        (HessianSpectrum, dict(plot="no"), SketchConfigError, "`plot` must be a bool"),
        (HessianSpectrum, dict(k=2.0), SketchConfigError, "`k` must be a positive int, got 2.0 \\(float\\)"),
        (SearchCriteria, dict(target="0.9"), SubspaceError, "`target` must be a finite number or None"),
        (IntrinsicDimension, dict(criteria=SearchCriteria(target=0.9), monitor=3), SubspaceError, "`monitor` must be the name"),
        (IntrinsicDimension, dict(criteria=SearchCriteria(target=0.9), said="no"), SubspaceError, "`said` must be a bool"),
        (IntrinsicDimension, dict(criteria=SearchCriteria(target=0.9), sketch_dim=64.0), SubspaceError, "`sketch_dim` must be a positive int"),
    ],
)
def test_wrongly_typed_arguments_raise_typed_errors(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


# ------------------------------------------------------------------ NaN / inf
def test_nan_training_loss_inline_skips_and_counts_or_raises(tmp_path):
    # the training loss turns NaN at step 1: that step's gradients, and every later one (the weights
    # are NaN after the step), are non-finite
    cb = _gs(tmp_path / "skip", sketch_kind="per_layer", mode="inline")
    trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(nan_at_step=1), loader(32, 8))
    assert cb._mode_impl._inline_fast and cb.skipped_nonfinite == 24
    path = tmp_path / "skip" / "run" / "store"
    assert inspect_store(path)["health"]["ok"]
    ids, vecs = _sorted(SketchStore.open(path), "epoch-0")
    assert ids.tolist() == list(range(8)) and np.isfinite(vecs).all()

    cb = _gs(tmp_path / "raise", sketch_kind="per_layer", mode="inline", nan_policy="raise")
    with pytest.raises(NonFiniteGradientError, match=r"example ids \[8, 9, 10, 11, 12\]"):
        trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(nan_at_step=1), loader(32, 8))
    assert inspect_store(tmp_path / "raise" / "run" / "store")["health"]["ok"]  # last committed state intact


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_the_spectrum_with_a_clear_error(tmp_path, bad):
    class Bad(Tiny):
        def per_example_loss(self, batch):
            return super().per_example_loss(batch) * bad

    with pytest.raises(SpectrumError, match="non-finite values; check the loss"):
        trainer(tmp_path, [_hs()], max_steps=1).fit(Bad(), loader())


def test_nan_validation_metric_stops_the_search(tmp_path):
    class NanVal(Tiny):
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", torch.tensor(float("nan")))

    cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=16, criteria=SearchCriteria(d_min=2, target=0.9))
    with pytest.raises(SubspaceError, match="`metric` must be a finite number, got nan"):
        trainer(tmp_path, [cb], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None).fit(
            NanVal(), loader(), loader(8, seed=2))


# ------------------------------------------------------------------ empty data
def test_empty_datasets(tmp_path):
    with pytest.raises(UnsupportedModelError, match="probe dataloader is empty"):
        trainer(tmp_path, [_hs(probe_dataloader=[])], max_steps=1).fit(Tiny(), loader())

    cb = _gs(tmp_path / "a", attribution_dataloader=loader(0))
    with pytest.warns(UserWarning, match="attribution set is empty; checkpoint 'step-4' holds no rows"):
        trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(), loader())
    store = SketchStore.open(tmp_path / "a" / "run" / "store")
    assert store.checkpoints == ["step-4"] and store.num_rows == 0

    cb = _gs(tmp_path / "b")  # an empty train set: Lightning skips training, the store stays empty
    trainer(tmp_path, [cb], max_epochs=1).fit(Tiny(), loader(0))
    assert SketchStore.open(tmp_path / "b" / "run" / "store").num_rows == 0

    cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=16, criteria=SearchCriteria(d_min=2, target=0.9),
                            dirpath=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match="no validation round ran"):  # rank_zero_warn: once, from rank 0
        trainer(tmp_path, [cb], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None).fit(
            Tiny(), loader(), loader(0))
    assert cb.status == "running" and cb.d_star is None


# ------------------------------------------------------------------ ids
@pytest.mark.parametrize(
    "ids_fn, error, match",
    [
        (lambda b: b["index"] % 4, DuplicateIdError, r"\[0, 1, 2, 3\] already appended to checkpoint 'step-4'"),
        (lambda b: b["index"] - 5, SketchInputError, "must be >= 0"),
        (lambda b: b["index"].double() + 0.5, SketchInputError, "must return integer example ids"),
        (lambda b: b["index"][:, None], SketchInputError, r"must be 1-D \[B\]"),
        (lambda b: b["index"][:-1], SketchInputError, "`ids` has 7 entries but `vectors` has 8 rows"),
    ],
)
def test_bad_example_ids(tmp_path, ids_fn, error, match):
    with pytest.raises(error, match=match):
        trainer(tmp_path, [_gs(tmp_path, ids_fn=ids_fn)], max_epochs=1).fit(Tiny(), loader())
    assert inspect_store(tmp_path / "run" / "store")["health"]["ok"]


# ------------------------------------------------------------------ architecture and spec
class Wider(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 3))


def test_other_architecture_and_hand_edited_spec(tmp_path):
    trainer(tmp_path, [_gs(tmp_path)], max_epochs=1).fit(Tiny(), loader())
    query = _full(2, seed=5)
    assert Attributor(tmp_path / "run", Tiny()).scores(query).shape == (2, 32)
    with pytest.raises(LayoutMismatchError, match=r"N = 123 vs 133"):
        Attributor(tmp_path / "run", Wider())
    with pytest.raises(SketchMismatchError, match="dim: stored 123 vs given 133"):  # writing with another model
        trainer(tmp_path, [_gs(tmp_path)], max_epochs=1).fit(Wider(), loader())

    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "run", edited)
    manifest = edited / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["spec"]["seed"] = 99  # the query side would silently use another Φ
    manifest.write_text(json.dumps(data))
    for action in (lambda: SketchStore.open(edited / "store"), lambda: inspect_store(edited / "store"),
                   lambda: Attributor(edited, Tiny())):
        with pytest.raises(StoreCorruptError, match="spec was edited by hand"):
            action()
    data["spec"] = "affd"
    manifest.write_text(json.dumps(data))
    with pytest.raises(StoreCorruptError, match="field 'spec' must be a dict or null"):
        SketchStore.open(edited / "store")


# ------------------------------------------------------------------ sizes
def test_sketch_dim_larger_than_the_model(tmp_path):
    gs = _gs(tmp_path, sketch_dim=10**6)  # capped at N with a warning, as HessianSpectrum
    with pytest.warns(UserWarning, match="sketch_dim=1000000 > N=123; using sketch_dim=123"):
        trainer(tmp_path, [gs], max_steps=1).fit(Tiny(), loader())
    assert gs.sketch.sketch_dim == 123
    with pytest.raises(SketchConfigError, match=r"got 1000000 > 123"):
        cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=10**6, mode="fixed")
        trainer(tmp_path, [cb], max_steps=1, limit_val_batches=0).fit(Tiny(), loader())
    cb = _hs(sketch_kind="affd", sketch_dim=10**6, k=3)  # documented: capped at N with a warning
    with pytest.warns(UserWarning, match="sketch_dim=1000000 > N=123; using sketch_dim=123"):
        trainer(tmp_path, [cb], max_steps=1).fit(Tiny(), loader())
    assert load_snapshot(cb.history[0]["file"])["meta"]["sketch_spec"]["sketch_dim"] == 123
    assert len(cb.history[0]["eigenvalues"]) == 3


class AtBatchStart:
    """Parameters, lr and batch at the start of every training step."""

    @staticmethod
    def callback():
        from lightning.pytorch import Callback

        class _Rec(Callback):
            def __init__(self):
                self.steps = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.steps.append(({n: p.detach().clone() for n, p in pl_module.named_parameters()},
                                   trainer.optimizers[0].param_groups[0]["lr"], {k: v.clone() for k, v in batch.items()}))

        return _Rec()


def _grads_at(params: dict, batch: dict, model_cls=Tiny, dtype=torch.float32) -> torch.Tensor:
    model = model_cls().to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return _loop_grads(model, batch)


def test_batch_size_one_and_a_last_batch_of_one(tmp_path):
    rec = AtBatchStart.callback()
    ckpt = _gs(tmp_path / "c", sketch_kind="identity", sketch_dim=123, every_n_epochs=1)
    inline = _gs(tmp_path / "i", sketch_kind="per_layer", sketch_dim=16, mode="inline", seed=3)
    probe = next(iter(loader(9, 1, dtype=torch.float64)))  # one example
    spec = _hs(sketch_kind="identity", sketch_dim=123, k=3, numerics=SpectrumNumerics(num_iter=123), at_steps=[2],
               probe_dataloader=[probe])
    model = Tiny(dtype=torch.float64)
    trainer(tmp_path, [rec, ckpt, inline, spec], max_epochs=1).fit(model, loader(9, 4, dtype=torch.float64))
    assert inline._mode_impl._inline_fast and [len(b["y"]) for _, _, b in rec.steps] == [4, 4, 1]
    ids, vecs = _sorted(SketchStore.open(tmp_path / "c" / "run" / "store"), "step-3")
    exact = _loop_grads(model, _full(9, dtype=torch.float64))
    assert ids.tolist() == list(range(9))
    np.testing.assert_allclose(vecs, exact.float().numpy(), rtol=1e-5, atol=1e-6)
    layout = ParamLayout.from_module(model)
    sketch = make("per_layer", layout.dim, 16, seed=3, **PerLayerSketch.layout_options(layout))
    got = dict(zip(*_sorted(SketchStore.open(tmp_path / "i" / "run" / "store"), "epoch-0")))
    for params, lr, batch in rec.steps:
        want = lr * sketch.apply(_grads_at(params, batch, dtype=torch.float64))
        for j, i in enumerate(batch["index"].tolist()):
            np.testing.assert_allclose(got[i], want[j].numpy(), rtol=1e-4, atol=1e-6)
    # batch-size-1 probe: the exact operator's top eigenvalues (float64, torch.linalg.eigvalsh)
    params = rec.steps[2][0]
    m = Tiny(dtype=torch.float64)
    m.load_state_dict(params, strict=False)
    eig = torch.linalg.eigvalsh(dense_hessian(m, lambda mod, b: mod.per_example_loss(b), [probe])).flip(0)[:3]
    torch.testing.assert_close(torch.tensor(spec.history[0]["eigenvalues"], dtype=torch.float64), eig,
                               rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ BatchNorm / dropout
class BNDrop(Tiny):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))


def test_batchnorm_and_dropout_are_handled_in_eval_mode_or_refused(tmp_path):
    # checkpoint mode sketches in eval mode (running statistics, dropout off): exact per-example grads
    model = BNDrop()
    cb = _gs(tmp_path / "c", sketch_kind="identity", sketch_dim=147)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, loader())
    assert model.training  # the mode was restored
    model.eval()
    ids, vecs = _sorted(SketchStore.open(tmp_path / "c" / "run" / "store"), "step-4")
    assert ids.tolist() == list(range(32))
    np.testing.assert_allclose(vecs, _loop_grads(model, _full(32)).numpy(), rtol=1e-5, atol=1e-6)
    # inline mode: the hooks cover BatchNorm's affine parameters; in train mode the rows are each
    # example's contribution to the batch gradient (tests/gradients/test_grad_capture_coverage.py)
    cb = _gs(tmp_path / "i", sketch_kind="per_layer", mode="inline")
    trainer(tmp_path, [cb], max_epochs=1).fit(BNDrop(), loader())
    assert cb._mode_impl._inline_fast and cb.support.fast["net.1"] == "norm"
    assert SketchStore.open(tmp_path / "i" / "run" / "store").num_rows == 32
    # the spectrum refuses train-mode BatchNorm (batch statistics couple the examples) ...
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm module\(s\) \['net.1'\] are in train mode"):
        trainer(tmp_path, [_hs(numerics=SpectrumNumerics(mode="train"))], max_steps=1).fit(BNDrop(), loader())
    # ... and works in its default eval mode
    cb = _hs()
    trainer(tmp_path, [cb], max_steps=1).fit(BNDrop(), loader())
    assert np.isfinite(cb.history[0]["eigenvalues"]).all()


# ------------------------------------------------------------------ mixed precision
def test_bf16_mixed_training_sketches_in_float32(tmp_path):
    rec = AtBatchStart.callback()
    ckpt = _gs(tmp_path / "c", sketch_kind="identity", sketch_dim=123, every_n_steps=2)
    inline = _gs(tmp_path / "i", sketch_kind="per_layer", sketch_dim=16, mode="inline", seed=3)
    spec = _hs(at_steps=[0, 2])
    model = Tiny()
    trainer(tmp_path, [rec, ckpt, inline, spec], max_steps=4, precision="bf16-mixed").fit(model, loader())
    store = SketchStore.open(tmp_path / "c" / "run" / "store")
    assert store.dtype == "float32"
    # checkpoint slices run outside autocast: float32 gradients at the saved weights, to float32 accuracy
    saved = torch.load(tmp_path / "c" / "run" / "weights" / "step-2.pt", weights_only=True)
    _, vecs = _sorted(store, "step-2")
    np.testing.assert_allclose(vecs, _grads_at(saved, _full(32)).numpy(), rtol=1e-5, atol=1e-6)
    # inline rows come from the bf16 training backward: finite, within bf16 accuracy of float32
    layout = ParamLayout.from_module(model)
    sketch = make("per_layer", layout.dim, 16, seed=3, **PerLayerSketch.layout_options(layout))
    got = dict(zip(*_sorted(SketchStore.open(tmp_path / "i" / "run" / "store"), "epoch-0")))
    for params, lr, batch in rec.steps:
        want = lr * sketch.apply(_grads_at(params, batch))
        rows = torch.tensor(np.stack([got[i] for i in batch["index"].tolist()]))
        assert torch.isfinite(rows).all()
        assert float((rows - want).norm() / want.norm()) < 5e-2
    # the spectrum at step 0 (same weights as a float32 run) equals the float32 run's
    ref = _hs(at_steps=[0, 2])
    trainer(tmp_path / "ref", [ref], max_steps=1).fit(Tiny(), loader())
    np.testing.assert_allclose(spec.history[0]["eigenvalues"], ref.history[0]["eigenvalues"], rtol=1e-6)
    # subspace training under bf16 autocast: ω stays a float32 parameter and trains
    cb = IntrinsicDimension(sketch_kind="affd", sketch_dim=16, criteria=SearchCriteria(d_min=2, target=0.99),
                            dirpath=str(tmp_path / "id"))
    trainer(tmp_path / "id", [cb], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
            precision="bf16-mixed").fit(Tiny(), loader(), loader(8, seed=2))
    omega = cb.subspace.omega.detach()
    assert omega.dtype == torch.float32 and torch.isfinite(omega).all() and omega.abs().max() > 0
    # the search measures metric(θ0) before training (step 0), then one round every 2 steps
    assert [h["step"] for h in cb.history] == [0, 2, 4] and cb.history[0]["action"] == "baseline"


# ------------------------------------------------------------------ query batches unlike a training batch
def test_query_batches_unlike_a_training_batch_raise_typed_errors(tmp_path):
    trainer(tmp_path, [_gs(tmp_path)], max_epochs=1).fit(Tiny(), loader())
    good = _full(4, seed=5)
    hostile = [
        ({"inputs": good["x"], "y": good["y"]}, r"\{'inputs': \(4, 6\) float32, 'y': \(4,\) int64\}.*KeyError"),
        ({**good, "x": torch.randn(4, 5)}, r"'x': \(4, 5\) float32.*RuntimeError"),
        ({**good, "y": good["y"] + 7}, r"IndexError|RuntimeError"),  # labels beyond the 3 classes
        ((good["x"], good["y"]), r"tuple \[\(4, 6\) float32, \(4,\) int64\]"),
    ]
    for method in ("grad_dot", "trak"):
        attr = Attributor(tmp_path / "run", Tiny(), method=method)
        want = attr.scores(good)  # trak recognises the queries' task on this first batch
        for batch, match in hostile:
            for action in (lambda b: attr.scores(b), lambda b: attr.top_k(b, k=3), lambda b: attr.query_sketches(b)):
                with pytest.raises(SketchInputError, match=match) as err:
                    action(batch)
                assert "must look like a training batch" in str(err.value)
                assert isinstance(err.value.__cause__, (KeyError, IndexError, TypeError, RuntimeError))
        torch.testing.assert_close(attr.scores(good), want)  # a good batch still answers afterwards
    # float labels to a cross-entropy: the user's loss refuses them, and the error says so
    attr = Attributor(tmp_path / "run", Tiny(), method="grad_dot")
    with pytest.raises(SketchInputError, match="integer class labels"):
        attr.scores({**good, "y": good["y"].float() + 0.5})


def test_float_class_labels_of_a_classification_query_are_refused_not_truncated(tmp_path):
    trainer(tmp_path, [_gs(tmp_path)], max_epochs=1).fit(Tiny(), loader())
    good = _full(4, seed=5)
    attr = Attributor(tmp_path / "run", Tiny(), method="trak")
    want = attr.scores(good)
    assert attr.task is not None and attr.task.kind == "classification"
    with pytest.raises(SketchInputError, match=r"targets 'y' \(torch.float32\) hold non-integer values \[0\.5"):
        attr.scores({**good, "y": good["y"].float() + 0.5})
    # integer-valued float labels pass this check; this model's cross-entropy then refuses them
    with pytest.raises(SketchInputError, match="loss failed on the query batch .*'y': \\(4,\\) float32"):
        attr.scores({**good, "y": good["y"].float()})
    torch.testing.assert_close(attr.scores(good), want)
    # a loss that casts its labels itself would truncate 0.5 to class 0 without the check
    attr = Attributor(tmp_path / "run", CastingTiny(), method="trak")
    torch.testing.assert_close(attr.scores(good), want)
    torch.testing.assert_close(attr.scores({**good, "y": good["y"].float()}), want)
    with pytest.raises(SketchInputError, match="non-integer values"):
        attr.scores({**good, "y": good["y"].float() + 0.5})


class CastingTiny(Tiny):
    def per_example_loss(self, batch):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"].long(), reduction="none")


def test_cli_inputs_labels_must_be_integer_classes_of_the_model(tmp_path):
    from lightning_sketch import cli
    from lightning_sketch.cli import commands as cli_commands

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    model = Tiny()

    def batch(y):
        path = tmp_path / "q.npz"
        np.savez(path, x=x, y=y)
        args = cli._own_parser().parse_args(["query", "--store", "s", "--ckpt", "c", "--config", "c",
                                              "--inputs", str(path)])
        return cli_commands._query_batch(args, model, None)[0]

    for y, match in ((np.array([0, 1, 3, 2]), r"labels y \[3\] are outside the model's classes \[0, 3\)"),
                     (np.array([0, -1, 1, 2]), r"labels y \[-1\] are outside"),
                     (np.array([0.0, 1.5, 1.0, 2.0]), r"non-integer values \[1\.5\].*in \[0, 3\)"),
                     (np.array(["a", "b", "c", "d"]), "save integer class labels")):
        with pytest.raises(SketchInputError, match=match):
            batch(y)
    got = batch(np.array([0.0, 1.0, 2.0, 1.0]))
    assert got["y"].dtype == torch.long and got["y"].tolist() == [0, 1, 2, 1]
