"""How many Hessian-vector products a spectrum snapshot may spend: a time budget turned into a plan.

A snapshot's cost is almost all HVPs (Lanczos for the top-k pairs, the SLQ density, the trace). The
:class:`~lightning_sketch.callbacks.HessianSpectrum` callback keeps the snapshots of a fit together
within ``budget`` times the fit's training time; this module holds the arithmetic, without
Lightning and without clocks, so that every rule has an exact test:

- :func:`snapshot_seconds`: the share of the fit's budget left to one snapshot;
- :func:`affordable_matvecs`: seconds → HVPs at a measured cost per HVP;
- :func:`lanczos_steps`: the most Lanczos steps, the top eigenpairs being served first;
- :func:`density_plan`: SLQ probes and steps from the HVPs Lanczos left over;
- :func:`plan_matvecs`: both, for a snapshot of a given number of HVPs.

Explicit settings (a given ``num_iter``, ``density_runs``, ``density_iter``, ``density=True``)
are kept as they are; only the unset ones (None) are chosen from the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_sketch._checks import number, positive_int
from lightning_sketch.exceptions import SpectrumError

__all__ = [
    "DEFAULT_DENSITY_ITER",
    "DEFAULT_DENSITY_RUNS",
    "DEFAULT_PROBE_BATCHES",
    "HVP_STEP_COST",
    "MIN_DENSITY_ITER",
    "MatvecPlan",
    "affordable_matvecs",
    "affordable_probe_batches",
    "default_lanczos_steps",
    "density_plan",
    "lanczos_steps",
    "plan_matvecs",
    "snapshot_seconds",
]

#: SLQ probes and steps per probe when nothing limits them (Ghorbani et al. 2019 use a few probes).
DEFAULT_DENSITY_RUNS = 4
DEFAULT_DENSITY_ITER = 40
#: fewest Lanczos steps of one SLQ probe chosen by a budget: below it the quadrature has too few nodes
#: to show more than the outliers, which the top-k pairs already give.
MIN_DENSITY_ITER = 20


#: probe batches of a snapshot when ``probe_batches`` is left unset and the budget pays for them.
DEFAULT_PROBE_BATCHES = 4
#: one Hessian-vector product over one probe batch, in training steps of that batch: a double backward
#: is about two forward+backward passes (measured 1.3 on a CNN, 2.2 on MiniLM; RESULTS.md).
HVP_STEP_COST = 2.0


@dataclass(frozen=True)
class MatvecPlan:
    """HVPs of one snapshot.

    Attributes:
        lanczos: most Lanczos steps for the top-k pairs (fewer when they converge first).
        density_runs: SLQ probes (0: no density).
        density_iter: Lanczos steps per SLQ probe (0 when ``density_runs`` is 0).
    """

    lanczos: int
    density_runs: int
    density_iter: int

    @property
    def total(self) -> int:
        """HVPs of the plan when Lanczos runs all its steps."""
        return self.lanczos + self.density_runs * self.density_iter


def _nonneg(name: str, value: float) -> float:
    return float(number(name, value, low=0, error=SpectrumError))


def _pos_int(name: str, value: object, minimum: int = 1) -> int:
    return int(positive_int(name, value, minimum=minimum, error=SpectrumError))


def snapshot_seconds(
    budget: float, step_seconds: float, train_steps: float, spent_seconds: float, snapshots_left: int
) -> float:
    """Seconds one snapshot may spend: an equal share of what the fit's budget has left.

    .. math::
        \\max(0,\\ \\text{budget} \\cdot t_\\text{step} \\cdot S - \\text{spent})
        \\,/\\, \\text{snapshots left}

    Args:
        budget: snapshots together may cost ``budget`` times the training time (1.0: the fit takes
            at most about twice as long as without them).
        step_seconds: mean wall time of one training step.
        train_steps: S, the fit's training steps (``Trainer.estimated_stepping_batches``).
        spent_seconds: what the fit's earlier snapshots took.
        snapshots_left: scheduled snapshots from this one to the end of the fit, this one included.

    Returns:
        The seconds left to this snapshot (0.0 when the budget is spent). The share a snapshot does
        not use goes to the later ones.

    Raises:
        SpectrumError: on a negative or non-finite time or budget, or ``snapshots_left < 1``.

    Example:
        >>> snapshot_seconds(1.0, 0.5, 100, spent_seconds=10.0, snapshots_left=4)
        10.0
    """
    total = _nonneg("budget", budget) * _nonneg("step_seconds", step_seconds)
    total *= _nonneg("train_steps", train_steps)
    left = total - _nonneg("spent_seconds", spent_seconds)
    return max(0.0, left) / _pos_int("snapshots_left", snapshots_left)


def affordable_matvecs(seconds: float, seconds_per_matvec: float) -> int:
    """⌊seconds / seconds_per_matvec⌋: the HVPs that fit in ``seconds`` (a huge number for a free HVP).

    Raises:
        SpectrumError: on a negative or non-finite time.

    Example:
        >>> affordable_matvecs(1.0, 0.3), affordable_matvecs(0.0, 0.3)
        (3, 0)
    """
    s, per = _nonneg("seconds", seconds), _nonneg("seconds_per_matvec", seconds_per_matvec)
    if per == 0.0:
        return 2**31 - 1
    return int(math.floor(s / per + 1e-9))


def default_lanczos_steps(k: int, dim: int) -> int:
    """``min(dim, max(4k, 40))``: the most Lanczos steps when neither ``num_iter`` nor a budget sets them."""
    return min(_pos_int("dim", dim), max(4 * _pos_int("k", k), 40))


def lanczos_steps(affordable: int, k: int, dim: int, num_iter: int | None = None) -> int:
    """The most Lanczos steps of a snapshot that may spend ``affordable`` HVPs.

    The top-k pairs come first: an explicit ``num_iter`` is kept (capped at ``dim``); otherwise the
    steps are ``affordable`` clamped to ``[k, default_lanczos_steps(k, dim)]`` (at least k, so that
    there are k Ritz pairs; whether they converge is then recorded and warned about).

    Raises:
        SpectrumError: on ``k > dim`` or a non-positive ``k``/``dim``/``num_iter``.

    Example:
        >>> lanczos_steps(25, k=10, dim=1024), lanczos_steps(3, k=10, dim=1024), lanczos_steps(500, 10, 1024)
        (25, 10, 40)
    """
    _pos_int("affordable", affordable, 0)
    if _pos_int("k", k) > _pos_int("dim", dim):
        raise SpectrumError(f"`k` must be <= `dim` (got k={k} > dim={dim}).")
    if num_iter is not None:
        return min(_pos_int("num_iter", num_iter), dim)
    return max(k, min(affordable, default_lanczos_steps(k, dim)))


def density_plan(
    remaining: int,
    dim: int,
    density: bool | None = None,
    density_runs: int | None = None,
    density_iter: int | None = None,
) -> tuple[int, int]:
    """``(runs, iter)`` of the SLQ density from the ``remaining`` HVPs of a snapshot.

    Rules, in order:

    - ``density=False``: ``(0, 0)``.
    - Steps per probe: ``density_iter`` if given, else ``min(DEFAULT_DENSITY_ITER, dim)``.
    - Probes: ``density_runs`` if given; else as many as fit, at most ``DEFAULT_DENSITY_RUNS``.
    - When no probe of that length fits and ``density_iter`` is not given: one probe of all the
      remaining steps, if they are at least ``min(MIN_DENSITY_ITER, dim)``.
    - If still no probe fits: ``(0, 0)`` when ``density`` is None (on when affordable), one probe
      when ``density=True`` (an explicit request wins over the budget).

    Raises:
        SpectrumError: on a negative ``remaining`` or a non-positive ``dim``, ``density_runs`` or
            ``density_iter``.

    Example:
        >>> density_plan(200, 1024), density_plan(90, 1024), density_plan(30, 1024), density_plan(10, 1024)
        ((4, 40), (2, 40), (1, 30), (0, 0))
    """
    _pos_int("remaining", remaining, 0)
    _pos_int("dim", dim)
    if density is False:
        return 0, 0
    steps = min(_pos_int("density_iter", density_iter), dim) if density_iter is not None else min(
        DEFAULT_DENSITY_ITER, dim)
    if density_runs is not None:
        return _pos_int("density_runs", density_runs), steps
    runs = min(DEFAULT_DENSITY_RUNS, remaining // steps)
    if runs == 0 and density_iter is None and remaining >= min(MIN_DENSITY_ITER, dim):
        return 1, min(remaining, dim)
    if runs == 0:
        return (1, steps) if density else (0, 0)
    return runs, steps


def affordable_probe_batches(
    share_seconds: float, step_seconds: float, k: int, dim: int, most: int = DEFAULT_PROBE_BATCHES
) -> int:
    """Probe batches over which a snapshot allowed ``share_seconds`` can still run the unbudgeted
    Lanczos steps for its top-k pairs; at least 1, at most ``most``.

    .. math::
        p = \\min\\bigl(\\text{most},\\ \\max\\bigl(1,\\ \\lfloor s / (c \\cdot L \\cdot
        t_\\text{step}) \\rfloor\\bigr)\\bigr)

    with L = ``default_lanczos_steps(k, dim)`` and c = :data:`HVP_STEP_COST`.

    Top-k pairs that converge on fewer probe examples tell more than unconverged ones on more: on a
    CNN whose budget paid 10 HVPs over 4 batches, 0–2 of 10 pairs converged; over 1 batch, 10–24 HVPs
    and up to 7 of 10 (RESULTS.md, "HessianSpectrum with its defaults under the time budget").

    Raises:
        SpectrumError: on a negative or non-finite time, or a non-positive ``k``, ``dim`` or ``most``.

    Example:
        >>> affordable_probe_batches(10.0, 0.01, k=10, dim=1024)
        4
        >>> affordable_probe_batches(2.0, 0.01, k=10, dim=1024)
        2
        >>> affordable_probe_batches(0.1, 0.01, k=10, dim=1024)
        1
    """
    share, step = _nonneg("share_seconds", share_seconds), _nonneg("step_seconds", step_seconds)
    most = _pos_int("most", most)
    per_batch = HVP_STEP_COST * default_lanczos_steps(k, dim) * step
    if per_batch == 0.0:
        return most
    return min(most, max(1, int(math.floor(share / per_batch + 1e-9))))


def plan_matvecs(
    affordable: int,
    k: int,
    dim: int,
    *,
    num_iter: int | None = None,
    density: bool | None = None,
    density_runs: int | None = None,
    density_iter: int | None = None,
) -> MatvecPlan:
    """The HVPs of a snapshot allowed ``affordable`` of them: Lanczos first, the density from the rest.

    With ``affordable`` unbounded (no budget) this is the unbudgeted snapshot: ``default_lanczos_steps``
    Lanczos steps and 4 density probes of 40 steps unless set otherwise.

    Raises:
        SpectrumError: as :func:`lanczos_steps` and :func:`density_plan`.

    Example:
        >>> plan_matvecs(60, k=10, dim=1024)
        MatvecPlan(lanczos=40, density_runs=1, density_iter=20)
        >>> plan_matvecs(60, k=10, dim=1024, num_iter=60, density_runs=2)
        MatvecPlan(lanczos=60, density_runs=2, density_iter=40)
    """
    steps = lanczos_steps(affordable, k, dim, num_iter)
    runs, per = density_plan(max(0, affordable - steps), dim, density, density_runs, density_iter)
    return MatvecPlan(steps, runs, per)
