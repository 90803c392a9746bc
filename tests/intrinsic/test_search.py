"""The doubling search state machine (arXiv 2402.03994, Listing 9) and the classic binary search."""

from __future__ import annotations

import json
import math

import pytest

from lightning_sketch.exceptions import SearchFailedError, SubspaceError
from lightning_sketch.intrinsic import Action, DoublingSearch, binary_search_dimension


def test_continue_while_gaining_then_double_when_gain_below_delta():
    s = DoublingSearch(d_min=2, d_max=32, delta=0.1, target=0.9)
    s.baseline(0.1)
    assert s.update(0.3, step=10) is Action.CONTINUE and s.d == 2
    assert s.update(0.35, step=20) is Action.DOUBLE and s.d == 4  # gain 0.05 < 0.1
    assert s.update(0.5, step=30) is Action.CONTINUE and s.d == 4
    assert s.update(0.55, step=40) is Action.DOUBLE and s.d == 8
    assert s.update(0.91, step=50) is Action.DONE
    assert s.d_star == 8 and s.finished and s.status == "done"
    assert [h["d"] for h in s.history] == [2, 2, 2, 4, 4, 8]
    assert s.history[-1] == {"round": 5, "step": 50, "d": 8, "metric": 0.91, "action": "done", "next_d": 8}


def test_done_at_first_round_and_exact_target_counts():
    s = DoublingSearch(d_min=4, d_max=4, delta=0.0, target=0.5)
    assert s.update(0.5) is Action.DONE and s.d_star == 4


def test_fail_when_d_max_exceeded_and_clamped_last_round():
    s = DoublingSearch(d_min=3, d_max=10, delta=0.1, target=0.9)
    s.baseline(0.0)
    assert s.update(0.05) is Action.DOUBLE and s.d == 6
    assert not s.clamped and "clamped" not in s.history[-1]
    assert s.update(0.06) is Action.DOUBLE and s.d == 10  # clamped to d_max
    assert s.clamped and s.history[-1]["clamped"] is True and s.history[-1]["next_d"] == 10  # and said so
    assert s.update(0.07) is Action.FAIL and s.status == "failed" and s.d_star is None
    assert DoublingSearch.from_state_dict(json.loads(json.dumps(s.state_dict()))).clamped
    with pytest.raises(SubspaceError, match="already failed"):
        s.update(0.99)


def test_without_baseline_first_round_never_doubles():
    s = DoublingSearch(d_min=1, d_max=8, delta=0.5, target=1.0)
    assert s.update(0.0) is Action.CONTINUE
    assert s.update(0.1) is Action.DOUBLE


def test_lower_is_better_direction():
    s = DoublingSearch(d_min=1, d_max=8, delta=0.1, target=0.2, higher_is_better=False)
    s.baseline(2.0)
    assert s.update(1.0) is Action.CONTINUE
    assert s.update(0.95) is Action.DOUBLE  # loss fell by only 0.05
    assert s.update(0.2) is Action.DONE and s.d_star == 2


def test_state_dict_round_trip_is_json_and_continues_identically():
    a = DoublingSearch(d_min=2, d_max=64, delta=0.1, target=0.9)
    a.baseline(0.0)
    for m in (0.3, 0.32):
        a.update(m)
    state = json.loads(json.dumps(a.state_dict()))
    b = DoublingSearch.from_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for m in (0.5, 0.52, 0.95):
        assert a.update(m) is b.update(m)
    assert a.d_star == b.d_star == 8
    with pytest.raises(SubspaceError, match="lacks key"):
        DoublingSearch.from_state_dict({"d_min": 1})
    bad = dict(state, d=1000)
    with pytest.raises(SubspaceError, match="Invalid DoublingSearch state"):
        DoublingSearch.from_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_min": 0, "d_max": 4, "delta": 0.1, "target": 1.0}, "`d_min` must be a positive int"),
        ({"d_min": 8, "d_max": 4, "delta": 0.1, "target": 1.0}, "`d_min` must be <= `d_max`"),
        ({"d_min": 1, "d_max": 4, "delta": -0.1, "target": 1.0}, "`delta` must be a finite number >= 0"),
        ({"d_min": 1, "d_max": 4, "delta": 0.1, "target": math.nan}, "`target` must be a finite number"),
        ({"d_min": 1, "d_max": 4, "delta": 0.1, "target": 1.0, "higher_is_better": "yes"}, "higher_is_better"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(SubspaceError, match=match):
        DoublingSearch(**kwargs)


def test_invalid_metric_and_late_baseline():
    s = DoublingSearch(d_min=1, d_max=4, delta=0.1, target=1.0)
    with pytest.raises(SubspaceError, match="`metric` must be a finite number"):
        s.update(float("inf"))
    s.update(0.1)
    with pytest.raises(SubspaceError, match="before the first `update`"):
        s.baseline(0.0)


def test_binary_search_finds_smallest_power_of_two_against_brute_force():
    for threshold in (1, 3, 40, 64, 65, 1000):
        res = binary_search_dimension(lambda d: float(d >= threshold), 1, 1024, target=1.0)
        brute = min(2**j for j in range(11) if 2**j >= threshold)
        assert res.d_star == brute
        assert len(res.runs) <= 5  # 1 + ceil(log2(11))
    res = binary_search_dimension(lambda d: 1.0 / d, 1, 64, target=0.1, higher_is_better=False)
    assert res.d_star == 16
    with pytest.raises(SearchFailedError, match="raise `d_hi`"):
        binary_search_dimension(lambda d: 0.0, 1, 64, target=0.5)
