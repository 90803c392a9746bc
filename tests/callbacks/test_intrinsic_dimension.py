"""IntrinsicDimension callback: a tiny search run, JSON output, resume mid-search, fixed mode, errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.callbacks import IntrinsicDimension, SearchCriteria
from lightning_sketch.callbacks.intrinsic_dimension import measure_reference_score
from lightning_sketch.exceptions import SketchConfigError, SubspaceError, UnsupportedStrategyError
from lightning_sketch.intrinsic import Subspace


def _blobs(n: int, seed: int):
    """Four Gaussian blobs in 8-d: an easy 4-class task."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2.0
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 8, generator=g), y


class Blobs(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # an ordinary optimiser over all parameters

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_blobs(256, 1)), batch_size=32)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*_blobs(256, 2)), batch_size=256)


def _trainer(tmp_path, max_steps, callbacks, **kw):
    args = dict(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        deterministic=True, default_root_dir=tmp_path, accelerator="cpu", enable_model_summary=False,
        callbacks=callbacks, val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
    )
    return pl.Trainer(**{**args, **kw})


@pytest.mark.parametrize("sanity", [0, 2])
def test_search_measures_the_baseline_itself(tmp_path, sanity):
    """Listing 9 starts from metric(θ0): recorded whatever num_sanity_val_steps the Trainer was given."""
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=64, seed=0, dirpath=str(tmp_path),
                            criteria=SearchCriteria(d_min=1, delta=0.05, target=0.9))
    model = Blobs()
    x, y = _blobs(256, 2)
    with torch.no_grad():
        acc0 = float((model(x).argmax(-1) == y).float().mean())
    _trainer(tmp_path, 8, [cb], num_sanity_val_steps=sanity).fit(model)
    assert cb.history[0]["action"] == "baseline" and cb.history[0]["step"] == 0
    assert cb.history[0]["metric"] == pytest.approx(acc0, abs=1e-6)  # the whole validation set at θ0
    assert cb.search.history[1]["round"] == 1 and cb.search.history[0]["action"] == "baseline"
    assert "clamped" in cb.summary() and cb.summary()["clamped"] is False


def test_search_finds_d_star_writes_json_and_trains_only_omega(tmp_path):
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=64, seed=0, dirpath=str(tmp_path),
                            criteria=SearchCriteria(d_min=1, delta=0.05, target=0.9))
    model = Blobs()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, 400, [cb])
    trainer.fit(model)
    assert cb.status == "done" and cb.d_star is not None and 1 <= cb.d_star <= 64
    assert trainer.global_step < 400  # stopped when the target was reached
    last = cb.history[-1]
    assert last["metric"] >= 0.9 and last["d"] == cb.d_star and cb.history[0]["action"] == "baseline"
    ds = [h["d"] for h in cb.history]
    assert ds == sorted(ds) and all(b in (a, 2 * a) for a, b in zip(ds, ds[1:]))
    out = json.loads((tmp_path / "intrinsic_dimension.json").read_text())
    assert out["d_star"] == cb.d_star and out["status"] == "done" and out["history"] == cb.history
    assert out["spec"]["sketch"]["kind"] == "dense" and out["num_params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert (tmp_path / "intrinsic_dimension.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # θ0 is untouched, only ω moved, and ω beyond the final d never did
    sub = cb.subspace
    assert torch.equal(model.net[0].parametrizations.weight.original, theta0["net.0.weight"])
    assert torch.all(sub.omega[cb.d_star:] == 0) and sub.omega[: cb.d_star].abs().sum() > 0
    # an independent re-evaluation of the trained subspace model gives the reported metric
    x, y = _blobs(256, 2)
    with torch.no_grad():
        assert abs((model(x).argmax(-1) == y).float().mean().item() - last["metric"]) < 1e-6


def _search_cb():
    # delta = 1 forces a doubling after every round, so the run is mid-search at any checkpoint
    return IntrinsicDimension(sketch_kind="dense", sketch_dim=64, seed=3, plot=False,
                              criteria=SearchCriteria(d_min=1, delta=1.0, target=0.999))


def test_resume_mid_search_continues_with_same_d_and_omega(tmp_path):
    full_cb = _search_cb()
    full = Blobs()
    _trainer(tmp_path / "a", 24, [full_cb]).fit(full)

    class SaveAfterValidation(pl.Callback):
        """Checkpoint after the round at step 8 was decided (ModelCheckpoint's every_n_train_steps
        saves at train-batch end, before that step's validation, which a resume then skips)."""

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and trainer.global_step == 8:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    first_cb = _search_cb()
    _trainer(tmp_path / "b", 12, [first_cb, SaveAfterValidation()]).fit(Blobs())
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    state = saved["callbacks"][first_cb.state_key]
    assert state["search"]["d"] > 1 and state["status"] == "running"  # mid-search: d has already doubled
    path = tmp_path / "mid.ckpt"

    resumed_cb = _search_cb()
    resumed = Blobs()
    _trainer(tmp_path / "c", 24, [resumed_cb]).fit(resumed, ckpt_path=str(path))
    assert resumed_cb.history == full_cb.history and resumed_cb.active == full_cb.active
    assert torch.equal(resumed_cb.subspace.omega, full_cb.subspace.omega)
    assert resumed_cb.projection_checksum() == full_cb.projection_checksum()
    with pytest.raises(SubspaceError, match="after the trainer's setup"):
        _search_cb().projection_checksum()


def test_fixed_mode_verification_run_and_reference_helper(tmp_path):
    ref = measure_reference_score(_trainer(tmp_path / "ref", 24, []), Blobs(), monitor="val_acc")
    assert 0.0 <= ref <= 1.0
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=64, mode="fixed", d=1,
                            criteria=SearchCriteria(reference_score=ref, target_fraction=0.99),
                            stop_when_done=False, dirpath=str(tmp_path), plot=False)
    _trainer(tmp_path, 8, [cb]).fit(Blobs())
    assert cb.active == 1 and cb.subspace.active == 1 and cb.target == pytest.approx(0.99 * ref)
    assert cb.reached is (cb.history[-1]["metric"] >= cb.target)
    assert [h["d"] for h in cb.history] == [1, 1]
    assert json.loads((tmp_path / "intrinsic_dimension.json").read_text())["mode"] == "fixed"
    assert not (tmp_path / "intrinsic_dimension.png").exists()
    with pytest.raises(SubspaceError, match="val_nope"):
        measure_reference_score(_trainer(tmp_path / "ref2", 1, []), Blobs(), monitor="val_nope")


def test_setup_is_idempotent_and_validate_after_fit_works(tmp_path):
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=32, mode="fixed")
    model = Blobs()
    trainer = _trainer(tmp_path, 4, [cb])
    trainer.fit(model)
    sub = cb.subspace
    trainer.validate(model, verbose=False)
    assert Subspace.of(model) is sub


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "grid"}, "`mode` must be"),
        ({"sketch_dim": 0}, "`sketch_dim` must be a positive int"),
        ({"mode": "fixed", "d": 99, "sketch_dim": 8}, r"`d` must be an int in \[1, 8\] or None"),
        ({"eval_every_n_steps": 0, "criteria": SearchCriteria(target=1.0)}, "`eval_every_n_steps`"),
        ({}, "Search mode needs a target"),
        ({"sketch_dim": 8, "criteria": SearchCriteria(d_min=64, target=1.0)}, "`d_min` must be <="),
        ({"criteria": {"target": 1.0}}, "`criteria` must be a SearchCriteria"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(SubspaceError, match=match):
        IntrinsicDimension(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_fraction": 1.5}, r"`target_fraction` must be a number in \(0, 1\]"),
        ({"target_fraction": 0}, r"`target_fraction` must be a number in \(0, 1\]"),
        ({"target": float("nan")}, "`target` must be a finite number or None, got nan"),
        ({"target": True}, "`target` must be a finite number or None, got True"),
        ({"reference_score": "0.9"}, "`reference_score` must be a finite number or None"),
        ({"reference_score": float("inf")}, "`reference_score` must be a finite number or None, got inf"),
        ({"delta": -0.1}, "`delta` must be a finite number >= 0"),
        ({"delta": None}, "`delta` must be a finite number >= 0, got None"),
        ({"d_min": 0}, "`d_min` must be a positive int"),
        ({"d_min": 2.0}, "`d_min` must be a positive int"),
    ],
)
def test_search_criteria_validate_their_values(kwargs, match):
    with pytest.raises(SubspaceError, match=match):
        SearchCriteria(**kwargs)


def test_search_criteria_resolve_the_target():
    assert SearchCriteria().resolved_target is None
    assert SearchCriteria(reference_score=0.8).resolved_target == pytest.approx(0.72)
    assert SearchCriteria(target=0.5, reference_score=0.8).resolved_target == 0.5  # the absolute target wins


def test_criteria_is_the_only_way_to_pass_search_settings():
    with pytest.raises(TypeError, match="unexpected keyword"):
        IntrinsicDimension(sketch_kind="dense", sketch_dim=16, target=0.9)  # type: ignore[call-arg]
    with pytest.raises(SubspaceError, match="must be a SearchCriteria"):
        IntrinsicDimension(sketch_kind="dense", sketch_dim=16, criteria={"target": 0.9})  # type: ignore[arg-type]
    with pytest.raises(SubspaceError, match="`delta` must be a finite number >= 0"):
        IntrinsicDimension(criteria=SearchCriteria(target=0.9, delta=-1.0))


def test_unknown_kind_fails_at_construction():
    with pytest.raises(SketchConfigError, match="Unknown sketch kind"):
        IntrinsicDimension(sketch_kind="fastfood", criteria=SearchCriteria(target=0.9))


def test_missing_monitor_and_unsupported_strategy(tmp_path):
    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=16, criteria=SearchCriteria(target=0.9),
                            monitor="val_nope")
    with pytest.raises(SubspaceError, match="val_nope"):
        _trainer(tmp_path, 8, [cb]).fit(Blobs())

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(UnsupportedStrategyError, match="FSDP"):
        IntrinsicDimension(sketch_kind="dense", sketch_dim=16, criteria=SearchCriteria(target=0.9)).setup(
            SimpleNamespace(strategy=FSDPStrategy()), Blobs(), "fit")


def test_strategies_are_checked_by_type_not_by_name():
    """A DDP strategy passes whatever its class is called; a renamed FSDP subclass is still refused."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_sketch.callbacks._intrinsic_support import _check_strategy

    class FSDPLookingDDP(DDPStrategy):  # the name alone used to be refused
        pass

    class Sharded(FSDPStrategy):  # the name alone used to pass
        pass

    _check_strategy(DDPStrategy())
    _check_strategy(FSDPLookingDDP())
    with pytest.raises(UnsupportedStrategyError, match="Sharded"):
        _check_strategy(Sharded())


def test_kind_is_no_argument():
    with pytest.raises(TypeError, match="unexpected keyword"):
        IntrinsicDimension(kind="dense", sketch_dim=16, criteria=SearchCriteria(target=0.9))  # type: ignore[call-arg]


def test_warnings_come_from_rank_zero_only(tmp_path, monkeypatch):
    """The 'no validation round' warning goes through rank_zero_warn: silent on other ranks."""
    import warnings

    from lightning.pytorch.utilities import rank_zero

    cb = IntrinsicDimension(sketch_kind="dense", sketch_dim=16, criteria=SearchCriteria(target=0.9),
                            dirpath=str(tmp_path), plot=False)
    trainer = SimpleNamespace(is_global_zero=False)  # rank 0 alone writes files
    monkeypatch.setattr(rank_zero.rank_zero_only, "rank", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_end(trainer, Blobs())
    monkeypatch.setattr(rank_zero.rank_zero_only, "rank", 0)
    with pytest.warns(UserWarning, match="no validation round ran"):
        cb.on_train_end(trainer, Blobs())

