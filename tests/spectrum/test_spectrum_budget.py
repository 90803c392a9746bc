"""The spectrum budget's arithmetic (``spectrum.budget``) and its use by ``spectrum_snapshot``."""

from __future__ import annotations

import pytest
import torch
from exact_refs import TickClock
from torch import nn

from lightning_sketch.exceptions import SpectrumError
from lightning_sketch.spectrum import spectrum_snapshot
from lightning_sketch.spectrum.budget import (
    affordable_probe_batches,
    MatvecPlan,
    affordable_matvecs,
    default_lanczos_steps,
    density_plan,
    lanczos_steps,
    plan_matvecs,
    snapshot_seconds,
)


def test_snapshot_seconds_is_an_equal_share_of_what_is_left():
    # budget 1.0, 0.5 s steps, 100 steps: 50 s for all snapshots
    assert snapshot_seconds(1.0, 0.5, 100, spent_seconds=0.0, snapshots_left=4) == 12.5
    assert snapshot_seconds(1.0, 0.5, 100, spent_seconds=20.0, snapshots_left=3) == 10.0
    assert snapshot_seconds(2.0, 0.5, 100, spent_seconds=20.0, snapshots_left=1) == 80.0
    assert snapshot_seconds(1.0, 0.5, 100, spent_seconds=60.0, snapshots_left=2) == 0.0  # spent: nothing left
    with pytest.raises(SpectrumError, match="`snapshots_left` must be a positive int"):
        snapshot_seconds(1.0, 0.5, 100, 0.0, 0)
    with pytest.raises(SpectrumError, match="`budget` must be a finite number >= 0"):
        snapshot_seconds(float("nan"), 0.5, 100, 0.0, 1)


@pytest.mark.parametrize(("share", "step", "k", "dim", "most", "expected"), [
    (80.0, 1.0, 10, 1024, 4, 1),    # 2 units per HVP-batch x 40 Lanczos steps = 80: one batch
    (159.9, 1.0, 10, 1024, 4, 1),
    (160.0, 1.0, 10, 1024, 4, 2),
    (1e6, 1.0, 10, 1024, 4, 4),     # at most `most`
    (1e6, 1.0, 10, 1024, 3, 3),
    (1.0, 1.0, 10, 1024, 4, 1),     # at least one
    (64.0, 1.0, 3, 32, 4, 1),       # L = min(dim, max(4k, 40)) = 32: 2 x 32 = 64 per batch
    (128.0, 1.0, 3, 32, 4, 2),
    (5.0, 0.0, 10, 1024, 4, 4),     # a free step: every batch
])
def test_affordable_probe_batches(share, step, k, dim, most, expected):
    assert affordable_probe_batches(share, step, k, dim, most) == expected


def test_affordable_probe_batches_errors():
    with pytest.raises(SpectrumError):
        affordable_probe_batches(-1.0, 1.0, 10, 1024)
    with pytest.raises(SpectrumError):
        affordable_probe_batches(1.0, float("nan"), 10, 1024)
    with pytest.raises(SpectrumError):
        affordable_probe_batches(1.0, 1.0, 10, 1024, most=0)


def test_affordable_matvecs():
    assert affordable_matvecs(1.0, 0.25) == 4
    assert affordable_matvecs(0.3, 0.1) == 3  # 0.3 / 0.1 = 2.9999999999999996 in floating point
    assert affordable_matvecs(0.99, 0.25) == 3
    assert affordable_matvecs(0.0, 0.25) == 0
    assert affordable_matvecs(1.0, 0.0) == 2**31 - 1
    with pytest.raises(SpectrumError, match="`seconds_per_matvec`"):
        affordable_matvecs(1.0, -1.0)


@pytest.mark.parametrize(
    ("affordable", "k", "dim", "num_iter", "expected"),
    [
        (25, 10, 1024, None, 25),  # within [k, 40]: all of it
        (3, 10, 1024, None, 10),  # below k: k steps, so that there are k Ritz pairs
        (500, 10, 1024, None, 40),  # above the default max(4k, 40)
        (500, 20, 1024, None, 80),  # 4k
        (500, 10, 32, None, 32),  # capped at the operator's dimension
        (3, 10, 1024, 60, 60),  # an explicit num_iter is kept
        (3, 10, 32, 60, 32),  # ... capped at the dimension
    ],
)
def test_lanczos_steps(affordable, k, dim, num_iter, expected):
    assert lanczos_steps(affordable, k, dim, num_iter) == expected


def test_lanczos_steps_errors_and_default():
    assert default_lanczos_steps(10, 1024) == 40 and default_lanczos_steps(10, 16) == 16
    with pytest.raises(SpectrumError, match="`k` must be <= `dim`"):
        lanczos_steps(10, 5, 4)


@pytest.mark.parametrize(
    ("remaining", "dim", "kw", "expected"),
    [
        (200, 1024, {}, (4, 40)),  # at most 4 probes of 40
        (159, 1024, {}, (3, 40)),
        (40, 1024, {}, (1, 40)),
        (39, 1024, {}, (1, 39)),  # no full probe: one probe of all that is left
        (20, 1024, {}, (1, 20)),
        (19, 1024, {}, (0, 0)),  # below MIN_DENSITY_ITER: no density
        (19, 1024, {"density": True}, (1, 40)),  # an explicit density=True is kept
        (0, 1024, {"density": False}, (0, 0)),
        (500, 1024, {"density": False}, (0, 0)),
        (0, 1024, {"density_runs": 2}, (2, 40)),  # explicit probes are kept
        (0, 1024, {"density_runs": 2, "density_iter": 7}, (2, 7)),
        (100, 1024, {"density_iter": 30}, (3, 30)),
        (20, 1024, {"density_iter": 30}, (0, 0)),  # explicit steps are not shortened to fit
        (100, 16, {}, (4, 16)),  # steps capped at the dimension
        (15, 16, {}, (0, 0)),
        (16, 16, {}, (1, 16)),
    ],
)
def test_density_plan(remaining, dim, kw, expected):
    assert density_plan(remaining, dim, **kw) == expected


def test_plan_matvecs():
    assert plan_matvecs(2**31 - 1, 10, 1024) == MatvecPlan(40, 4, 40)  # no budget: the unbudgeted snapshot
    assert plan_matvecs(2**31 - 1, 10, 1024).total == 200
    assert plan_matvecs(100, 10, 1024) == MatvecPlan(40, 1, 40)  # 60 left: one full probe
    assert plan_matvecs(30, 10, 1024) == MatvecPlan(30, 0, 0)
    assert plan_matvecs(5, 10, 1024) == MatvecPlan(10, 0, 0)
    assert plan_matvecs(5, 10, 1024, num_iter=50, density_runs=1) == MatvecPlan(50, 1, 40)


# --------------------------------------------------------------------------- spectrum_snapshot under a budget


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
               for _ in range(2)]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    return model, loss_fn, batches


@pytest.mark.parametrize("budget", [12, 30, 60, 150])
def test_snapshot_keeps_to_its_budget(budget):
    """Without the kept graph every HVP runs one forward per probe batch (2 units here), so the
    plan is known exactly: at most ``budget // 2`` HVPs, at least k Lanczos steps, Lanczos first."""
    model, loss_fn, batches = _problem()
    clock = TickClock(model)
    gen = torch.Generator().manual_seed(0)
    snap = spectrum_snapshot(model, loss_fn, batches, k=4, sketch=None, generator=gen, density=None,
                             density_runs=None, density_iter=None, cache_graph=False, tol=1e-12,
                             stop_early=True, max_seconds=float(budget), clock=clock)
    dim = sum(p.numel() for p in model.parameters())
    assert snap.seconds_per_matvec == 2.0
    affordable = budget // 2
    lanczos_plan = lanczos_steps(affordable - 1, 4, dim)  # one HVP's time kept for the probe gradient
    assert snap.eigs.num_matvecs == lanczos_plan  # tol 1e-12 never stops Lanczos before its plan
    runs, steps = density_plan(max(0, affordable - lanczos_plan - 1), dim)
    assert (0 if snap.density is None else snap.density.nodes.shape) == (0 if runs == 0 else (runs, steps))
    assert snap.num_matvecs == lanczos_plan + runs * steps
    # the whole snapshot (HVPs and the probe gradient, one forward per batch) stays within the budget,
    # except when even k Lanczos steps do not fit
    assert snap.seconds <= max(budget, 2 * 4 + 2)


def test_snapshot_without_budget_is_unchanged():
    model, loss_fn, batches = _problem()
    a = spectrum_snapshot(model, loss_fn, batches, k=4, generator=torch.Generator().manual_seed(0))
    b = spectrum_snapshot(model, loss_fn, batches, k=4, generator=torch.Generator().manual_seed(0),
                          density=None, density_runs=None, density_iter=None)
    assert a.eigs.num_matvecs == b.eigs.num_matvecs == 40 and a.num_matvecs == b.num_matvecs == 40 + 4 * 40
    torch.testing.assert_close(a.eigs.eigenvalues, b.eigs.eigenvalues, rtol=0, atol=0)
