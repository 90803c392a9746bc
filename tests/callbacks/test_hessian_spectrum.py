"""HessianSpectrum on a tiny LightningModule: schedule, files, logging, no interference, resume."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from exact_refs import TickClock
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sketch.callbacks import HessianSpectrum, SpectrumNumerics
from lightning_sketch.exceptions import SketchConfigError, UnsupportedModelError, UnsupportedStrategyError
from lightning_sketch.spectrum import load_index, load_snapshot, top_eigenpairs_from_snapshot


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))

    def per_example_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):
        # dropout draws from the global RNG during training: a disturbed RNG would change the run
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoPerExample(TinyModule):
    per_example_loss = None


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


class ListLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _trainer(tmp_path, callbacks, max_steps, logger=False):
    return pl.Trainer(
        max_steps=max_steps, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
        deterministic=True, default_root_dir=tmp_path, accelerator="cpu", callbacks=callbacks,
        enable_model_summary=False,
    )


def _callback(**kw) -> HessianSpectrum:
    args = {"k": 3, "sketch_kind": "dense", "sketch_dim": 32, "at_steps": [0, 2, 5], "every_n_steps": None,
            "probe_batches": 2, "trace": True, "budget": None}
    numerics = {"num_iter": 8, "density_runs": 2, "density_iter": 6, "trace_matvecs": 6}
    numerics.update({k: kw.pop(k) for k in list(kw) if k in numerics or k in ("hvp_method", "dtype", "mode")})
    args.update(kw, numerics=SpectrumNumerics(**numerics))
    return HessianSpectrum(**args)


def test_snapshots_files_logging_and_plot(tmp_path):
    torch.manual_seed(0)
    cb = _callback()
    lg = ListLogger()
    _trainer(tmp_path, [cb], 5, logger=lg).fit(TinyModule(), _loader())
    assert [e["step"] for e in cb.history] == [0, 2, 5]
    d = cb._dir
    assert [e["step"] for e in load_index(d)] == [0, 2, 5]
    snap = load_snapshot(d / "step_00000002.npz")
    assert snap["eigenvalues"].shape == (3,) and snap["eigenvectors"].shape == (3, 32)
    assert snap["residuals"].shape == (3,) and snap["density"].shape == snap["density_grid"].shape
    assert snap["meta"]["sketch_spec"]["kind"] == "dense"
    torch.testing.assert_close(snap["eigenvalues"], torch.tensor(cb.history[1]["eigenvalues"], dtype=torch.float64))
    vals, vecs, spec = top_eigenpairs_from_snapshot(d)  # directory -> latest snapshot
    assert vals.shape == (3,) and vecs.shape == (3, 32) and spec["sketch_dim"] == 32
    assert (d / "spectrum.png").stat().st_size > 1000
    logged = [(s, m) for s, m in lg.records if "hessian/lambda_max" in m]
    assert [s for s, _ in logged] == [0, 2, 5]
    for key in ("rneg", "outliers", "alignment", "trace", "matvecs", "seconds"):
        assert f"hessian/{key}" in logged[0][1]
    # matvecs per snapshot: Lanczos + density + trace, fixed by the arguments
    assert logged[0][1]["hessian/matvecs"] == 8 + 2 * 6 + 6


class CheckingSpectrum(HessianSpectrum):
    """Asserts inside the hook that a snapshot leaves RNG, mode, params and .grad untouched."""

    def snapshot(self, trainer, pl_module, step):
        rng = torch.get_rng_state()
        mode = pl_module.training
        params = [p.detach().clone() for p in pl_module.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
        out = super().snapshot(trainer, pl_module, step)
        assert torch.equal(torch.get_rng_state(), rng)
        assert pl_module.training == mode
        assert all(torch.equal(a, p) for a, p in zip(params, pl_module.parameters()))
        for g0, p in zip(grads, pl_module.parameters()):
            assert (g0 is None and p.grad is None) or torch.equal(g0, p.grad)
        self.checked = getattr(self, "checked", 0) + 1
        return out


def test_training_is_not_disturbed(tmp_path):
    torch.manual_seed(0)
    plain = TinyModule()
    _trainer(tmp_path / "a", [], 6).fit(plain, _loader())
    torch.manual_seed(0)
    watched = TinyModule()
    cb = CheckingSpectrum(k=2, sketch_kind="dense", sketch_dim=16, at_steps=[0, 3, 6], every_n_steps=None,
                          numerics=SpectrumNumerics(num_iter=6, density_runs=1, density_iter=6), density=True,
                          probe_batches=1, plot=False)  # default budget: its timing pass must not disturb
    _trainer(tmp_path / "b", [cb], 6).fit(watched, _loader())
    assert cb.checked == 3
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)


def test_resume_continues_history(tmp_path):
    torch.manual_seed(0)
    model = TinyModule()
    cb1 = _callback(at_steps=[0, 2, 4, 6], density=False, trace=False, plot=False, dirpath=str(tmp_path / "spec"))
    t1 = _trainer(tmp_path, [cb1], 3)
    t1.fit(model, _loader())
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    assert [e["step"] for e in cb1.history] == [0, 2]
    cb2 = _callback(at_steps=[0, 2, 4, 6], density=False, trace=False, plot=True, dirpath=str(tmp_path / "spec"))
    _trainer(tmp_path, [cb2], 6).fit(TinyModule(), _loader(), ckpt_path=ckpt)
    assert [e["step"] for e in cb2.history] == [0, 2, 4, 6]
    assert [e["step"] for e in load_index(tmp_path / "spec")] == [0, 2, 4, 6]
    assert (tmp_path / "spec" / "spectrum.png").exists()


def test_every_n_steps_and_exact_operator(tmp_path):
    torch.manual_seed(0)
    cb = _callback(sketch_kind=None, at_steps=[], every_n_steps=2, density=False, trace=False, plot=False,
                   probe_batches=1)
    _trainer(tmp_path, [cb], 4).fit(TinyModule(), _loader())
    assert [e["step"] for e in cb.history] == [0, 2, 4]
    snap = load_snapshot(cb.history[0]["file"])
    assert snap["meta"]["sketch_spec"] is None and snap["eigenvectors"].shape == (3, 67)


def test_cache_graph_off_gives_the_same_snapshots(tmp_path):
    """The default keeps the graph of ∇L for a snapshot's HVPs; turning it off recomputes the graph per HVP.
    The operator is the same (eval mode, fixed probe set), so the snapshots agree to round-off."""
    runs = []
    for cache in (True, False):
        torch.manual_seed(0)
        cb = _callback(at_steps=[0, 3], density=False, trace=False, plot=False, dirpath=str(tmp_path / f"s{cache}"))
        cb.numerics = SpectrumNumerics(num_iter=8, cache_graph=cache)
        _trainer(tmp_path / str(cache), [cb], 3).fit(TinyModule(), _loader())
        runs.append(torch.tensor([e["eigenvalues"] for e in cb.history], dtype=torch.float64))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(SketchConfigError, match="cache_graph"):
        SpectrumNumerics(cache_graph="yes")


def test_missing_per_example_loss(tmp_path):
    with pytest.raises(UnsupportedModelError, match="per_example_loss"):
        _trainer(tmp_path, [_callback()], 1).fit(NoPerExample(), _loader())


def test_refuses_fsdp_without_finite_difference():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UnsupportedStrategyError, match="hvp_method='finite_difference'"):
        _callback().setup(trainer, TinyModule(), "fit")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 0}, "`k` must be a positive int"),
        ({"sketch_dim": -1}, "`sketch_dim` must be a positive int"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int or None"),
        ({"num_iter": 0}, "`num_iter` must be a positive int or None"),
        ({"probe_batches": 0}, "`probe_batches` must be a positive int"),
        ({"trace_matvecs": 3}, "`trace_matvecs` must be an int >= 6"),
        ({"sketch_kind": "gauss"}, "`sketch_kind` must be one of"),
        ({"seed": 1.5}, "`seed` must be an int"),
        ({"at_steps": [-1]}, "`at_steps` must be a list of non-negative ints"),
        ({"hvp_method": "magic"}, "`hvp_method` must be"),
        ({"dtype": "float16"}, "`dtype` must be 'float32' or 'float64'"),
        ({"mode": "test"}, "`mode` must be 'eval' or 'train'"),
        ({"outlier_threshold": 1.5}, r"`outlier_threshold` must be a number in \(0, 1\)"),
        ({"loss_fn": 3}, "`loss_fn` must be callable"),
    ],
)
def test_argument_errors(kw, match):
    numerics = {k: kw.pop(k) for k in list(kw) if k in SpectrumNumerics.__dataclass_fields__}
    with pytest.raises(SketchConfigError, match=match):
        HessianSpectrum(**kw, numerics=SpectrumNumerics(**numerics) if numerics else None)


def test_default_schedule_is_the_papers():
    cb = HessianSpectrum()
    assert cb.at_steps == [0, 10, 50, 100, 150, 200, 250, 500] and cb.every_n_steps == 1000
    assert cb.should_run(0) and cb.should_run(2000) and not cb.should_run(11)


def test_progress_bar_counts_every_matvec(tmp_path, capsys):
    """With the trainer's progress bar on, each snapshot shows a bar over its HVPs whose total is
    the snapshot's matvec count (Lanczos + density + trace + the probe gradient)."""
    torch.manual_seed(0)
    cb = _callback(at_steps=[0], plot=False)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_progress_bar=True, enable_checkpointing=False, deterministic=True,
        default_root_dir=tmp_path, accelerator="cpu", callbacks=[cb], enable_model_summary=False,
    )
    trainer.fit(TinyModule(), _loader())
    err = capsys.readouterr().err
    total = 8 + 2 * 6 + 6 + 1  # num_iter + density_runs * density_iter + trace_matvecs + probe gradient
    assert "HessianSpectrum step 0" in err
    assert f"0/{total} " in err  # the bar's total is the snapshot's matvec count


def test_unconverged_snapshots_warn_once_per_fit(tmp_path):
    """Three snapshots with only k = 3 Lanczos steps all miss the tolerance: one warning, naming the
    first step, the converged count, the largest relative residual and the options to change."""
    torch.manual_seed(0)
    cb = _callback(num_iter=3, plot=False, density=False, trace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], 5).fit(TinyModule(), _loader())
    msgs = [str(w.message) for w in caught if "eigenpairs converged" in str(w.message)]
    assert [e["step"] for e in cb.history] == [0, 2, 5]
    assert all(e["scalars"]["converged"] < 3 for e in cb.history)
    assert len(msgs) == 1
    first = cb.history[0]["scalars"]
    assert "at step 0 only" in msgs[0] and f"{int(first['converged'])} of 3" in msgs[0]
    assert f"{first['max_rel_residual']:.3g}" in msgs[0] and "tol=0.001" in msgs[0]
    assert "num_iter" in msgs[0] and "`k`" in msgs[0]
    # a second fit with the same callback warns again (its new snapshot step 6)
    cb.at_steps = [0, 2, 5, 6]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _trainer(tmp_path / "second", [cb], 7).fit(TinyModule(), _loader())
    assert sum("eigenpairs converged" in str(w.message) for w in again) == 1


def test_converged_snapshots_stop_early_and_record_the_steps(tmp_path):
    torch.manual_seed(0)
    cb = _callback(num_iter=32, plot=False, density=False, trace=False, at_steps=[0])
    cb.numerics = SpectrumNumerics(num_iter=32, tol=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], 1).fit(TinyModule(), _loader())
    assert not [w for w in caught if "eigenpairs converged" in str(w.message)]
    s = cb.history[0]["scalars"]
    assert s["converged"] == 3 and s["max_rel_residual"] <= 1e-2
    assert s["lanczos_matvecs"] == s["matvecs"] < 32
    meta = load_snapshot(cb.history[0]["file"])["meta"]
    assert meta["lanczos_matvecs"] == s["lanczos_matvecs"] and meta["tol"] == 1e-2
    # the same snapshot without early stopping: 32 steps, the same top eigenvalues to the tolerance
    full = _callback(num_iter=32, plot=False, density=False, trace=False, at_steps=[0])
    full.numerics = SpectrumNumerics(num_iter=32, tol=1e-2, stop_early=False)
    torch.manual_seed(0)
    _trainer(tmp_path / "full", [full], 1).fit(TinyModule(), _loader())
    assert full.history[0]["scalars"]["lanczos_matvecs"] == 32
    lam = torch.tensor(full.history[0]["eigenvalues"])
    got = torch.tensor(cb.history[0]["eigenvalues"])
    torch.testing.assert_close(got, lam, rtol=0, atol=1e-2 * float(lam[0]))


# --------------------------------------------------------------------------- the default budget


def _budget_fit(tmp_path, budget, **kw):
    torch.manual_seed(0)
    module = TinyModule()
    args = {"k": 3, "sketch_kind": "dense", "sketch_dim": 32, "at_steps": [0, 10, 20], "every_n_steps": None,
            "probe_batches": 2, "plot": False, "budget": budget,
            "numerics": SpectrumNumerics(cache_graph=False, tol=1e-12)}
    args.update(kw)
    cb = HessianSpectrum(**args)
    cb.clock = TickClock(module.net)  # training_step and the HVPs call the net, not the LightningModule
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [cb], 20).fit(module, _loader())
    return cb, [str(w.message) for w in caught if "HessianSpectrum" in str(w.message)]


def test_default_budget_bounds_each_snapshot(tmp_path):
    """budget=1.0 (the default): 20 training steps of 1 unit give the snapshots 20 units, less the one
    forward+backward (1 unit) that stands in for a step before the first; an HVP costs 2 units (two
    probe batches), the probe gradient 2. Step 0 gets (20 - 1) / 3 = 6.33 units: its k = 3 Lanczos
    steps (6) already exceed it by the end of the gradient (8); step 10 gets (20 - 9) / 2 = 5.5 and the
    whole fit still has 11 >= 3 HVPs, so k steps again (spent 17); step 20 has 3 units left, less than
    k HVPs (6): skipped, with one warning."""
    assert HessianSpectrum().budget == 1.0
    cb, msgs = _budget_fit(tmp_path, 1.0)
    assert [e["step"] for e in cb.history] == [0, 10] and cb.skipped == [20]
    for e, share in zip(cb.history, (19 / 3, 11 / 2)):
        s = e["scalars"]
        assert s["budget_seconds"] == pytest.approx(share)
        assert s["lanczos_matvecs"] == s["matvecs"] == 3  # at least k; nothing left for a density
        assert s["seconds_per_matvec"] == 2.0 and s["seconds"] == 8.0
    assert sum("skipped the snapshot at step 20" in m for m in msgs) == 1
    unconverged = [m for m in msgs if "eigenpairs converged" in m]
    assert len(unconverged) == 1 and "raise `budget` (now 1: it allowed 3 Lanczos steps)" in unconverged[0]
    assert not [m for m in msgs if "explicit settings" in m]


@pytest.mark.parametrize(("budget", "batches"), [(1.0, 1), (10.0, 1), (20.0, 2), (100.0, 4), (None, 4)])
def test_unset_probe_batches_follow_the_first_snapshots_share(tmp_path, budget, batches):
    """probe_batches=None: 4 batches unless the first snapshot's share cannot pay the unbudgeted
    Lanczos steps over them: L = min(32, max(4k, 40)) = 32 HVPs of 2 units per batch (one unit per
    batch's forward and backward here, a step costs 1): batches = ⌊share / 64⌋ in [1, 4], share =
    (20·budget − 1) / 3 at step 0. Fixed for the fit; recorded in every snapshot's meta."""
    cb, _ = _budget_fit(tmp_path, budget, probe_batches=None)
    if budget is not None:
        share = (20 * budget - 1) / 3
        assert cb.history[0]["scalars"]["budget_seconds"] == pytest.approx(share)
        assert max(1, min(4, int(share // 64))) == batches
    assert cb._probe is None  # released at teardown
    metas = [load_snapshot(e["file"])["meta"] for e in cb.history]
    assert metas and all(m["probe_batches"] == batches for m in metas)
    if budget is not None:  # an HVP costs one unit per probe batch
        per = [e["scalars"]["seconds_per_matvec"] for e in cb.history]
        assert per == [float(batches)] * len(per)


def test_larger_budget_buys_lanczos_steps_then_density(tmp_path):
    """budget=5: 100 units. Each snapshot's Lanczos steps follow the rule exactly: at the k-th step
    (6 units in), the HVPs that fit in the rest of its share, less one for the gradient."""
    from lightning_sketch.spectrum.budget import affordable_matvecs, lanczos_steps

    cb, _ = _budget_fit(tmp_path, 5.0)
    assert [e["step"] for e in cb.history] == [0, 10, 20] and cb.skipped == []
    spent = 1.0  # the stand-in forward+backward before step 0
    for e, left in zip(cb.history, (3, 2, 1)):
        s = e["scalars"]
        share = (100 - spent) / left
        assert s["budget_seconds"] == pytest.approx(share)
        steps = lanczos_steps(3 + affordable_matvecs(share - 6, 2.0) - 1, 3, 32)
        assert s["lanczos_matvecs"] == steps
        assert s["seconds"] == 2 * s["matvecs"] + 2 <= share + 1e-9  # the snapshot kept to its share
        spent += s["seconds"]
    assert spent <= 100


def test_explicit_counts_win_over_the_budget_and_warn_once(tmp_path):
    numerics = SpectrumNumerics(num_iter=12, density_runs=1, density_iter=5, cache_graph=False)
    cb, msgs = _budget_fit(tmp_path, 1.0, numerics=numerics)
    assert [e["step"] for e in cb.history] == [0, 10, 20] and cb.skipped == []  # never skipped
    assert all(e["scalars"]["lanczos_matvecs"] <= 12 and e["scalars"]["matvecs"] > 12 for e in cb.history)
    explicit = [m for m in msgs if "explicit settings" in m]
    assert len(explicit) == 1
    assert "numerics.num_iter, numerics.density_runs, numerics.density_iter" in explicit[0]


def test_budget_argument_errors():
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(SketchConfigError, match="`budget` must be a number > 0"):
            HessianSpectrum(budget=bad)
    with pytest.raises(SketchConfigError, match="`density` must be a bool or None"):
        HessianSpectrum(density="yes")
    assert HessianSpectrum(budget=None).budget is None and HessianSpectrum(budget=2).budget == 2.0


def test_snapshots_left_counts_the_schedule():
    """The budget's share divides by the scheduled snapshots left: explicit steps and multiples of
    ``every_n_steps`` in [step, last], each counted once (a brute-force count is the reference)."""
    cb = HessianSpectrum(at_steps=[0, 10, 50, 100, 150], every_n_steps=100)
    for step, last in ((0, 300), (60, 300), (100, 100), (151, 1000), (7, 9)):
        brute = sum(1 for s in range(step, last + 1) if s in cb.at_steps or s % 100 == 0)
        assert cb._snapshots_left(step, last) == max(1, brute)
    only = HessianSpectrum(at_steps=[0, 10, 50], every_n_steps=None)
    assert only._snapshots_left(0, 40) == 2 and only._snapshots_left(11, 60) == 1
