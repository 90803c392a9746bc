"""The intrinsic-dimension searches as pure state machines (arXiv 2402.03994, Listing 9; Li et al. 2018).

:class:`DoublingSearch` is the paper's single-run search (arXiv 2402.03994, Listing 9): one
projection of size D_max is drawn once, training starts on the first ``d_min`` coordinates of ω,
and after every round of c optimiser steps the monitored metric decides whether to go on, to
double the active size d (unmasking coordinates, learned values kept), to stop because the target
is reached (D* = d), or to fail because d cannot grow past D_max. The class only decides; training
and evaluation belong to the caller (the :class:`~lightning_sketch.callbacks.IntrinsicDimension`
callback, a benchmark loop, or a test).

:func:`binary_search_dimension` is the classic alternative, one full training run per candidate d
(bisection over powers of two), kept as the reference the single-run search is benchmarked against.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_sketch._checks import boolean, number, positive_int
from lightning_sketch.exceptions import SearchFailedError, SubspaceError

__all__ = ["Action", "BinarySearchResult", "DoublingSearch", "binary_search_dimension"]


class Action(str, enum.Enum):
    """What :meth:`DoublingSearch.update` asks the caller to do next."""

    CONTINUE = "continue"  #: train another round at the same d
    DOUBLE = "double"  #: the round gained less than δ: d was doubled, train on
    DONE = "done"  #: the target is reached; D* = :attr:`DoublingSearch.d_star`
    FAIL = "fail"  #: the round gained less than δ and d is already D_max


def _check_dims(d_min: Any, d_max: Any) -> tuple[int, int]:
    d_min = positive_int("d_min", d_min, error=SubspaceError)
    d_max = positive_int("d_max", d_max, error=SubspaceError)
    if d_min > d_max:
        raise SubspaceError(f"`d_min` must be <= `d_max` (got {d_min} > {d_max}); lower `d_min` or raise "
                            f"`d_max`.")
    return d_min, d_max


def _check_float(name: str, v: Any) -> float:
    return float(number(name, v, error=SubspaceError))


@dataclass
class DoublingSearch:
    """The paper's single-run doubling search for the intrinsic dimension (arXiv 2402.03994, Listing 9).

    Call :meth:`update` with the metric measured *before* training (θ = θ0; optional, it seeds the
    "previous" value) and then after every round of c optimiser steps::

        if metric reaches target:          DONE  (D* = d, within 2x of D_int)
        elif metric - previous < delta:    d <- min(2d, d_max), DOUBLE   (FAIL if d was d_max)
        else:                              CONTINUE
        previous <- metric

    ``higher_is_better=False`` flips both comparisons (e.g. for a loss). Listing 9 starts from
    ``previous = metric(θ0)``: call :meth:`baseline` first (the
    :class:`~lightning_sketch.callbacks.IntrinsicDimension` callback measures it before training);
    without a baseline the first round is compared against -inf and cannot double. When 2d would
    pass ``d_max`` the doubling is clamped at ``d_max``, so the last round trains the whole
    projection; :attr:`clamped` then becomes True and that round's :attr:`history` entry carries
    ``"clamped": True``. D* stays within a factor 2 of the smallest working d because d/2 (or the
    previous d) already failed to gain δ.

    Args:
        d_min: first active size (>= 1).
        d_max: size of the drawn projection, D_max (>= d_min).
        delta: minimum gain per round, in metric units (>= 0).
        target: absolute metric value that counts as solved (e.g. 0.9 x full fine-tuning accuracy).
        higher_is_better: direction of the metric.

    Example:
        >>> s = DoublingSearch(d_min=4, d_max=64, delta=0.05, target=0.9)
        >>> [s.update(m).value for m in (0.10, 0.50, 0.52, 0.80, 0.95)]
        ['continue', 'continue', 'double', 'continue', 'done']
        >>> s.d_star
        8
    """

    d_min: int
    d_max: int
    delta: float
    target: float
    higher_is_better: bool = True
    d: int = field(init=False)
    previous: float | None = field(init=False, default=None)
    rounds: int = field(init=False, default=0)
    status: str = field(init=False, default="running")
    d_star: int | None = field(init=False, default=None)
    clamped: bool = field(init=False, default=False)
    history: list[dict[str, Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.d_min, self.d_max = _check_dims(self.d_min, self.d_max)
        self.delta = number("delta", self.delta, low=0, error=SubspaceError, hint="A gain in metric units.")
        self.target = _check_float("target", self.target)
        boolean("higher_is_better", self.higher_is_better, error=SubspaceError)
        self.d = self.d_min

    @property
    def finished(self) -> bool:
        """True once the search is ``done`` or ``failed``."""
        return self.status != "running"

    def reached(self, metric: float) -> bool:
        """Whether ``metric`` meets the target in the configured direction."""
        return metric >= self.target if self.higher_is_better else metric <= self.target

    def _gain(self, metric: float) -> float:
        if self.previous is None:
            return math.inf
        return metric - self.previous if self.higher_is_better else self.previous - metric

    def baseline(self, metric: float) -> None:
        """Record the metric at θ = θ0 (before any training) as the first "previous" value.

        Raises:
            SubspaceError: if the metric is not finite or the search already ran a round.
        """
        metric = _check_float("metric", metric)
        if self.rounds:
            raise SubspaceError("`baseline` must be called before the first `update`; the search already ran "
                                "a round.")
        self.previous = metric
        self.history.append({"round": 0, "d": self.d, "metric": metric, "action": "baseline"})

    def update(self, metric: float, step: int | None = None) -> Action:
        """Feed the metric measured after a round of training at the current d; returns the next action.

        Args:
            metric: the monitored metric after the round.
            step: optional optimiser step, recorded in :attr:`history`.

        Raises:
            SubspaceError: if ``metric`` is not finite, or the search has already finished.
        """
        metric = _check_float("metric", metric)
        if self.finished:
            raise SubspaceError(f"The search is already {self.status} (D* = {self.d_star}); build a new "
                                f"DoublingSearch.")
        self.rounds += 1
        d_round = self.d
        clamped = False
        if self.reached(metric):
            self.status, self.d_star, action = "done", self.d, Action.DONE
        elif self._gain(metric) < self.delta:
            if self.d >= self.d_max:
                self.status, action = "failed", Action.FAIL
            else:
                clamped = 2 * self.d > self.d_max
                self.d, action = min(2 * self.d, self.d_max), Action.DOUBLE
                self.clamped = self.clamped or clamped
        else:
            action = Action.CONTINUE
        self.previous = metric
        entry = {
            "round": self.rounds, "step": step, "d": d_round, "metric": metric,
            "action": action.value, "next_d": self.d,
        }
        if clamped:
            entry["clamped"] = True
        self.history.append(entry)
        return action

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (JSON-serialisable) for checkpoints."""
        return {
            "d_min": self.d_min,
            "d_max": self.d_max,
            "delta": self.delta,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "d": self.d,
            "previous": self.previous,
            "rounds": self.rounds,
            "status": self.status,
            "d_star": self.d_star,
            "clamped": self.clamped,
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DoublingSearch:
        """Rebuild a search from :meth:`state_dict`.

        Raises:
            SubspaceError: if a key is missing or a value is invalid.
        """
        try:
            s = cls(
                state["d_min"], state["d_max"], state["delta"], state["target"], state["higher_is_better"]
            )
            d, status = int(state["d"]), str(state["status"])
            s.previous, s.rounds, s.d_star = state["previous"], int(state["rounds"]), state["d_star"]
            s.history = [dict(h) for h in state["history"]]
            s.clamped = bool(state.get("clamped", False))
        except KeyError as err:
            raise SubspaceError(
                f"DoublingSearch state lacks key {err}; it was not written by `state_dict()`."
            ) from err
        if not s.d_min <= d <= s.d_max or status not in ("running", "done", "failed"):
            raise SubspaceError(
                f"Invalid DoublingSearch state: d={d}, status={status!r} (d_min={s.d_min}, d_max={s.d_max})."
            )
        s.d, s.status = d, status
        return s


@dataclass(frozen=True)
class BinarySearchResult:
    """Outcome of :func:`binary_search_dimension`.

    Attributes:
        d_star: smallest power-of-two d (times ``d_lo``) whose run reached the target.
        runs: list of ``(d, metric)`` in the order the training runs were made.
    """

    d_star: int
    runs: tuple[tuple[int, float], ...]


def binary_search_dimension(
    train_and_eval: Callable[[int], float],
    d_lo: int,
    d_hi: int,
    target: float,
    higher_is_better: bool = True,
) -> BinarySearchResult:
    """Classic intrinsic-dimension search: one full training run per candidate d (Li et al. 2018).

    Bisects over the exponents of ``d_lo · 2^j <= d_hi``, assuming the metric is monotone in d,
    and returns the smallest candidate that reaches ``target``. Costs about
    ⌈log2(log2(d_hi/d_lo) + 1)⌉ + 1 runs.

    Args:
        train_and_eval: trains a fresh subspace model at active size d and returns its metric.
        d_lo: smallest candidate.
        d_hi: largest candidate.
        target: the metric value that counts as solved.
        higher_is_better: direction of the metric.

    Raises:
        SubspaceError: on invalid dimensions or target.
        SearchFailedError: if even ``d_hi`` (the largest candidate) misses the target.

    Example:
        >>> res = binary_search_dimension(lambda d: float(d >= 40), 1, 1024, target=1.0)
        >>> res.d_star, len(res.runs)
        (64, 5)
    """
    d_lo, d_hi = _check_dims(d_lo, d_hi)
    target = _check_float("target", target)
    cands = [d_lo * 2**j for j in range(int(math.log2(d_hi / d_lo)) + 1)]
    runs: list[tuple[int, float]] = []

    def ok(d: int) -> bool:
        m = float(train_and_eval(d))
        runs.append((d, m))
        return m >= target if higher_is_better else m <= target

    if not ok(cands[-1]):
        raise SearchFailedError(
            f"The largest candidate d = {cands[-1]} missed the target {target} (metric {runs[-1][1]}); "
            f"raise `d_hi` or lower the target."
        )
    lo, hi = -1, len(cands) - 1  # invariant: cands[hi] works; cands[lo] (if >= 0) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(cands[mid]):
            hi = mid
        else:
            lo = mid
    return BinarySearchResult(cands[hi], tuple(runs))
