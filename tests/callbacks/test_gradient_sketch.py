"""GradientSketch: stored rows against exact per-example gradients, resume equality, no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution.attr_helpers import TinyClassifier, blobs, full_batch, loader, loop_grads  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sketch.attribution import Attributor  # noqa: E402
from lightning_sketch.callbacks import GradientSketch  # noqa: E402
from lightning_sketch.exceptions import (  # noqa: E402
    DuplicateIdError,
    NonFiniteGradientError,
    SketchConfigError,
    StoreWriteError,
)
from lightning_sketch.gradients import ParamLayout  # noqa: E402
from lightning_sketch.sketches import make  # noqa: E402
from lightning_sketch.store import SketchStore  # noqa: E402

N_PARAMS = 123  # TinyClassifier(d=6, hidden=12, classes=3)




def _trainer(tmp_path, callbacks, max_epochs=2, max_steps=-1, **kw):
    return Trainer(
        max_epochs=max_epochs, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), deterministic=True,
        default_root_dir=tmp_path, accelerator="cpu", callbacks=callbacks, enable_model_summary=False, **kw,
    )


def _data(n=32):
    x, y, _ = blobs(n=n)
    return x, y


def _rows(store_path, name):
    store = SketchStore.open(store_path)
    ids, vecs = store.ids(name), np.asarray(store.vectors(name))
    order = np.argsort(ids)
    return ids[order], vecs[order]


class WeightsAtBatchStart(Callback):
    """Records the parameters and lr each optimizer step starts from."""

    def __init__(self):
        self.params, self.lrs, self.batches = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.batches.append({k: v.clone() for k, v in batch.items()})


def _grads_at(params, batch):
    model = TinyClassifier()
    model.load_state_dict({k: v for k, v in params.items()}, strict=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return loop_grads(model, lambda m, b: m.per_example_loss(b), batch)


def test_checkpoint_mode_rows_equal_exact_per_example_grads(tmp_path):
    seed_everything(0)
    x, y = _data()
    model = TinyClassifier()
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="identity", sketch_dim=N_PARAMS, every_n_epochs=1)
    _trainer(tmp_path, [cb]).fit(model, loader(x, y))
    store = SketchStore.open(tmp_path / "run" / "store")
    assert store.checkpoints == ["step-4", "step-8"]
    assert store.checkpoint_info("step-8")["lr"] == pytest.approx(0.1)
    # rows of the last slice are the per-example gradients at the final weights
    ids, vecs = _rows(tmp_path / "run" / "store", "step-8")
    assert ids.tolist() == list(range(32))
    exact = loop_grads(model, lambda m, b: m.per_example_loss(b), full_batch(x, y))
    np.testing.assert_allclose(vecs, exact.numpy(), rtol=1e-5, atol=1e-6)
    # the saved weights of the first slice reproduce its rows
    saved = torch.load(tmp_path / "run" / "weights" / "step-4.pt", weights_only=True)
    _, vecs4 = _rows(tmp_path / "run" / "store", "step-4")
    np.testing.assert_allclose(vecs4, _grads_at(saved, full_batch(x, y)).numpy(), rtol=1e-5, atol=1e-6)
    # and TracIn over the two slices equals the lr-weighted sum of exact dot products
    att = Attributor(tmp_path / "run", model, method="tracin")
    q = full_batch(x[:2], y[:2])
    want = sum(
        0.1 * _grads_at(torch.load(tmp_path / "run" / "weights" / f"{c}.pt", weights_only=True), q)
        @ _grads_at(torch.load(tmp_path / "run" / "weights" / f"{c}.pt", weights_only=True), full_batch(x, y)).T
        for c in ("step-4", "step-8")
    )
    torch.testing.assert_close(att.scores(q).float(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["per_layer", "dense"])
def test_inline_rows_equal_lr_weighted_grads_at_step_weights(tmp_path, kind):
    seed_everything(0)
    x, y = _data(24)
    model = TinyClassifier(decay_lr=True)
    rec = WeightsAtBatchStart()
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind=kind, sketch_dim=40, mode="inline", seed=5)
    _trainer(tmp_path, [rec, cb], max_epochs=2).fit(model, loader(x, y, shuffle=True))
    assert cb.support is not None and not cb.support.fallback  # every kind: hooks on the training backward
    layout = ParamLayout.from_module(model)
    opts = {"shapes": [list(s) for s in layout.shapes]} if kind == "per_layer" else {}
    sketch = make(kind, layout.dim, 40, seed=5, **opts)
    store = SketchStore.open(tmp_path / "run" / "store")
    assert store.checkpoints == ["epoch-0", "epoch-1"]
    assert sorted(p.name for p in (tmp_path / "run" / "weights").iterdir()) == ["epoch-0.pt", "epoch-1.pt"]
    assert len(set(rec.lrs)) == len(rec.lrs)  # the lr changes every step
    got = {}
    for name in store.checkpoints:
        for i, v in zip(store.ids(name), np.asarray(store.vectors(name))):
            got[(name, int(i))] = v
    for step, (params, lr, batch) in enumerate(zip(rec.params, rec.lrs, rec.batches)):
        want = lr * sketch.apply(_grads_at(params, batch).double()).float()
        name = f"epoch-{step // 3}"
        for j, i in enumerate(batch["index"].tolist()):
            np.testing.assert_allclose(got[(name, i)], want[j].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["checkpoint", "inline"])
def test_training_is_unchanged_by_the_callback(tmp_path, mode):
    x, y = _data()

    def run(with_cb):
        seed_everything(7)
        model = TinyClassifier(decay_lr=True)
        cbs = [GradientSketch(dirpath=str(tmp_path / f"run-{mode}"), sketch_kind="per_layer" if mode == "inline" else "affd",
                              sketch_dim=32, mode=mode, every_n_steps=3 if mode == "checkpoint" else None)] if with_cb else []
        _trainer(tmp_path, cbs, max_epochs=2).fit(model, loader(x, y, shuffle=True))
        return [p.detach().clone() for p in model.parameters()], torch.rand(3), model.training

    p0, r0, t0 = run(False)
    p1, r1, t1 = run(True)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
    assert torch.equal(r0, r1) and t0 == t1


class Crash(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_gives_the_uninterrupted_store(tmp_path):
    x, y = _data()

    def fit(root, crash_at=None, ckpt_path=None):
        seed_everything(3)
        model = TinyClassifier()
        cb = GradientSketch(dirpath=str(root / "run"), sketch_kind="affd", sketch_dim=32, every_n_steps=2)
        mc = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_last=True, save_top_k=-1)
        cbs = [cb, mc] + ([Crash(crash_at)] if crash_at else [])
        tr = _trainer(root, cbs, max_epochs=3, enable_checkpointing=True)
        tr.fit(model, loader(x, y), ckpt_path=ckpt_path)

    fit(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", crash_at=7)  # after the epoch-1 checkpoint (step 4) and slice step-6
    crashed = SketchStore.open(tmp_path / "b" / "run" / "store")
    assert "step-6" in crashed.checkpoints  # rows written after the checkpoint exist before resume
    fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    a = SketchStore.open(tmp_path / "a" / "run" / "store")
    b = SketchStore.open(tmp_path / "b" / "run" / "store")
    assert a.checkpoints == b.checkpoints == [f"step-{s}" for s in (2, 4, 6, 8, 10, 12)]
    for name in a.checkpoints:
        ia, va = _rows(tmp_path / "a" / "run" / "store", name)
        ib, vb = _rows(tmp_path / "b" / "run" / "store", name)
        assert ia.tolist() == ib.tolist()
        np.testing.assert_array_equal(va, vb)
        assert a.checkpoint_info(name)["lr"] == b.checkpoint_info(name)["lr"]


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nan_gradients_are_skipped_and_counted_or_raise(tmp_path, policy):
    seed_everything(0)
    x, y = _data(16)
    model = TinyClassifier(nan_ids=(3, 11))
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=16, nan_policy=policy)
    tr = _trainer(tmp_path, [cb], max_epochs=1)
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"example ids \[3\] at step 2"):
            tr.fit(model, loader(x, y))
        return
    tr.fit(model, loader(x, y))
    store = SketchStore.open(tmp_path / "run" / "store")
    ids = store.ids("step-2").tolist()
    assert sorted(ids) == [i for i in range(16) if i not in (3, 11)]
    assert np.isfinite(np.asarray(store.vectors("step-2"))).all()
    assert cb.skipped_nonfinite == 2


@pytest.mark.parametrize("ids_fn", [lambda b: b["y"], lambda b: b["index"] % 8],
                         ids=["repeated-within-a-batch", "repeated-across-batches"])
def test_inline_repeated_ids_without_a_resume_raise(tmp_path, ids_fn):
    """Ids that repeat in a fit that resumed nothing (labels as ids, a sampler with replacement) are
    a bug of the ids, not a replay: no row may be dropped silently."""
    x, y = _data(16)
    cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=8, mode="inline",
                        ids_fn=ids_fn, save_weights=False, curvature="none")
    with pytest.raises(DuplicateIdError, match=r"trained twice in slice 'epoch-0'.*check ids_fn"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(TinyClassifier(), loader(x, y))


def test_only_the_first_replay_of_a_committed_id_is_taken():
    cb = GradientSketch(dirpath="unused", sketch_kind="affd", sketch_dim=8, mode="inline")
    cb._writer._replayable = {"epoch-1": (np.array([1, 3, 5]), np.zeros(3, dtype=bool))}
    assert cb._writer.take_replayed("epoch-1", np.array([3, 3, 7, 1])).tolist() == [True, False, False, True]
    assert cb._writer.take_replayed("epoch-1", np.array([5, 3, 0])).tolist() == [True, False, False]
    assert cb._writer.take_replayed("epoch-0", np.array([1, 3])).tolist() == [False, False]  # not the resumed slice


def test_fresh_fit_into_a_non_empty_store_raises(tmp_path):
    x, y = _data(16)
    for attempt in range(2):
        cb = GradientSketch(dirpath=str(tmp_path / "run"), sketch_kind="affd", sketch_dim=16)
        tr = _trainer(tmp_path, [cb], max_epochs=1)
        if attempt == 0:
            tr.fit(TinyClassifier(), loader(x, y))
        else:
            with pytest.raises(StoreWriteError, match="already holds 16 rows"):
                tr.fit(TinyClassifier(), loader(x, y))


def test_argument_and_module_validation(tmp_path):
    with pytest.raises(SketchConfigError, match="`mode` must be"):
        GradientSketch(dirpath="d", mode="online")
    with pytest.raises(SketchConfigError, match="`nan_policy` must be"):
        GradientSketch(dirpath="d", nan_policy="ignore")
    with pytest.raises(SketchConfigError, match="`dtype` must be"):
        GradientSketch(dirpath="d", dtype="float64")
    with pytest.raises(SketchConfigError, match="`sketch_dim` must be a positive int"):
        GradientSketch(dirpath="d", sketch_dim=0)
    with pytest.raises(SketchConfigError, match="`every_n_steps` must be a positive int or None"):
        GradientSketch(dirpath="d", every_n_steps=-2)
    assert GradientSketch(dirpath="d", every_n_epochs=None).every_n_epochs == 1  # the checkpoint-mode default
    with pytest.raises(SketchConfigError, match="`seed` must be an int"):
        GradientSketch(dirpath="d", seed=1.5)

    class NoLoss(TinyClassifier):  # and a training_step whose loss is written by hand: no replay
        per_example_loss = None

        def training_step(self, batch, batch_idx):
            return -torch.log_softmax(self(batch["x"]), -1).gather(1, batch["y"][:, None]).mean()

    x, y = _data(8)
    cb = GradientSketch(dirpath=str(tmp_path / "r"), sketch_kind="affd", sketch_dim=16)
    with pytest.raises(SketchConfigError, match="per_example_loss"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(NoLoss(), loader(x, y))


@pytest.mark.slow
def test_ddp_ranks_write_shards_that_merge_to_the_single_process_store(tmp_path):
    # 2 CPU processes (gloo, ddp_spawn): each rank sketches half of the attribution set into its own
    # shard with global ids; rank 0 merges at fit end. Same rows as a single-process run.
    x, y = _data(16)

    def fit(root, **kw):
        seed_everything(0)
        cb = GradientSketch(dirpath=str(root / "run"), sketch_kind="affd", sketch_dim=16, every_n_epochs=1)
        _trainer(root, [cb], max_epochs=1, **kw).fit(TinyClassifier(), loader(x, y, batch_size=4))

    fit(tmp_path / "ddp", strategy="ddp_spawn", devices=2)
    ddp = SketchStore.open(tmp_path / "ddp" / "run" / "store")
    name = ddp.checkpoints[0]
    ids, vecs = _rows(tmp_path / "ddp" / "run" / "store", name)
    assert ids.tolist() == list(range(16))
    # reference: the single-process sketch of the same set at the weights the DDP run ended with
    weights = torch.load(tmp_path / "ddp" / "run" / "weights" / f"{name}.pt", weights_only=True)
    layout = ParamLayout.from_module(TinyClassifier())
    sketch = make("affd", layout.dim, 16, seed=0)
    want = sketch.apply(_grads_at(weights, full_batch(x, y)).double()).float()
    np.testing.assert_allclose(vecs, want.numpy(), rtol=1e-4, atol=1e-6)


def _fit_run(run, epochs, ckpt_path=None, mode="checkpoint"):
    """One seeded fit whose checkpoints and store live under the run directory ``run``."""
    x, y = _data()
    seed_everything(3)
    model = TinyClassifier()
    cb = GradientSketch(dirpath=str(run / "sketch"), sketch_kind="affd", sketch_dim=32, mode=mode,
                        every_n_steps=2 if mode == "checkpoint" else None)
    mc = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)
    _trainer(run, [cb, mc], max_epochs=epochs, enable_checkpointing=True).fit(
        model, loader(x, y), ckpt_path=ckpt_path
    )
    return cb


def _assert_same_store(a_path, b_path):
    a, b = SketchStore.open(a_path), SketchStore.open(b_path)
    assert a.checkpoints == b.checkpoints and a.checkpoints
    assert a.num_rows == b.num_rows
    for name in a.checkpoints:
        ia, va = _rows(a_path, name)
        ib, vb = _rows(b_path, name)
        assert ia.tolist() == ib.tolist()
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("mode", ["checkpoint", "inline"])
def test_a_moved_run_directory_resumes_to_the_uninterrupted_store(tmp_path, mode):
    _fit_run(tmp_path / "ref", 2, mode=mode)
    _fit_run(tmp_path / "runs" / "a", 1, mode=mode)
    moved = tmp_path / "runs" / "b"
    (tmp_path / "runs" / "a").rename(moved)
    cb = _fit_run(moved, 2, ckpt_path=str(moved / "checkpoints" / "last.ckpt"), mode=mode)
    assert cb._last_step_done >= 0 or mode == "inline"
    _assert_same_store(tmp_path / "ref" / "sketch" / "store", moved / "sketch" / "store")


def test_a_checkpoint_under_the_path_keyed_state_resumes(tmp_path):
    """Checkpoints whose callback state sits under the dirpath-keyed name still resume, moved or not."""
    _fit_run(tmp_path / "ref", 2)
    _fit_run(tmp_path / "a", 1)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if str(k).startswith("GradientSketch")]
    old = "GradientSketch" + repr({"dirpath": str(tmp_path / "a" / "sketch"), "mode": "checkpoint",
                                   "sketch_kind": "affd"})
    state["callbacks"][old] = state["callbacks"].pop(key)
    torch.save(state, ckpt)
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    _fit_run(moved, 2, ckpt_path=str(moved / "checkpoints" / "last.ckpt"))
    _assert_same_store(tmp_path / "ref" / "sketch" / "store", moved / "sketch" / "store")


def test_resume_without_the_store_names_the_missing_store(tmp_path):
    from lightning_sketch.exceptions import StoreNotFoundError

    _fit_run(tmp_path / "a", 1)
    store = tmp_path / "a" / "sketch" / "store"
    (store / "manifest.json").unlink()
    with pytest.raises(StoreNotFoundError, match="store") as err:
        _fit_run(tmp_path / "a", 2, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert str(store) in str(err.value) and "ckpt_path" in str(err.value)
    assert not (store / "manifest.json").exists()  # no empty store left where the run's store belongs
    # the whole store directory gone: the same error
    import shutil
    shutil.rmtree(store)
    with pytest.raises(StoreNotFoundError):
        _fit_run(tmp_path / "a", 2, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    assert not store.exists()


def test_a_compiled_submodule_is_refused_at_setup_naming_it(tmp_path):
    """torch.compile'd modules bypass the hooks and torch.func: refused before any step, not after an epoch."""
    from lightning_sketch.exceptions import UnsupportedModelError

    model = TinyClassifier()
    model.net[2] = torch.compile(model.net[2])  # compiling is lazy: nothing is traced here
    cb = GradientSketch(dirpath=str(tmp_path / "gs"), sketch_kind="dense", sketch_dim=8)
    trainer = _trainer(tmp_path, [cb], max_steps=1)
    with pytest.raises(UnsupportedModelError, match=r"\['net\.2'\] is torch\.compile'd"):
        trainer.fit(model, loader(*_data()))
    assert trainer.global_step == 0
    assert not (tmp_path / "gs" / "store").exists()
