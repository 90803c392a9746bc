"""The argument checks of ``lightning_sketch._checks``: what each accepts, what it refuses, and the
one message form ``"`name` must be <what>, got <value> (<type>).[ hint]"``."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from lightning_sketch import _checks as C
from lightning_sketch.exceptions import SketchConfigError, SpectrumError, SubspaceError

FORM = re.compile(r"^`(?P<name>[^`]+)` must be (?P<what>.+), got (?P<got>.+) \((?P<type>\w+)\)\.( .+)?$")


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(SketchConfigError) as err:
        fn(*args, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, np.float32(1.0), [1]])
def test_integer_refuses_bools_floats_strings_and_none(bad):
    msg = _message(C.positive_int, "k", bad)
    m = FORM.match(msg)
    assert m is not None, msg
    assert m["name"] == "k" and m["what"] == "a positive int" and m["type"] == type(bad).__name__


def test_integer_accepts_python_and_numpy_ints_and_returns_a_python_int():
    for v in (1, 7, np.int64(7), np.int8(3)):
        out = C.positive_int("k", v)
        assert out == int(v) and type(out) is int


def test_integer_bounds_are_inclusive_and_named_in_the_message():
    assert C.integer("k", 2, minimum=2, maximum=5) == 2 and C.integer("k", 5, minimum=2, maximum=5) == 5
    for v in (1, 6):
        msg = _message(C.integer, "k", v, minimum=2, maximum=5)
        assert msg == f"`k` must be an int in [2, 5], got {v} (int)."
    assert _message(C.positive_int, "n", 0) == "`n` must be a positive int, got 0 (int)."
    assert _message(C.non_negative_int, "n", -1) == "`n` must be a non-negative int, got -1 (int)."
    assert _message(C.positive_int, "m", 5, minimum=6) == "`m` must be an int >= 6, got 5 (int)."
    assert _message(C.integer, "seed", 1.5) == "`seed` must be an int, got 1.5 (float)."
    assert C.integer("seed", -3) == -3  # no bound: any int


def test_none_only_where_allowed_and_said_in_the_message():
    assert C.positive_int("k", None, allow_none=True) is None
    assert C.number("x", None, allow_none=True) is None
    assert C.boolean("b", None, allow_none=True) is None
    assert C.one_of("m", None, ("a", "b"), allow_none=True) is None
    assert C.str_list("p", None, allow_none=True) is None
    msg = _message(C.positive_int, "k", 0, allow_none=True)
    assert msg == "`k` must be a positive int or None, got 0 (int)."
    assert "or None" not in _message(C.positive_int, "k", None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan"), True, "1.0", None])
def test_number_refuses_nan_inf_bool_and_strings(bad):
    msg = _message(C.number, "x", bad)
    assert msg.startswith("`x` must be a finite number, got "), msg


def test_number_infinity_only_where_allowed():
    assert C.number("x", math.inf, allow_inf=True) == math.inf
    with pytest.raises(SketchConfigError):
        C.number("x", math.nan, allow_inf=True)  # NaN is never a number
    with pytest.raises(SketchConfigError, match=r"`x` must be a number > 0"):
        C.finite_positive("x", math.inf)


def test_number_bounds_open_and_closed():
    assert C.number("t", 1.0, low=0, high=1, low_open=True) == 1.0
    assert _message(C.number, "t", 0.0, low=0, high=1, low_open=True) == \
        "`t` must be a number in (0, 1], got 0.0 (float)."
    assert _message(C.number, "t", 1, low=0, high=1, low_open=True, high_open=True).startswith(
        "`t` must be a number in (0, 1), got 1 (int)")
    assert C.number("d", 0, low=0) == 0.0 and type(C.number("d", 0, low=0)) is float
    assert _message(C.number, "d", -0.1, low=0) == "`d` must be a finite number >= 0, got -0.1 (float)."
    assert _message(C.finite_positive, "lr", 0) == "`lr` must be a number > 0, got 0 (int)."
    assert C.number("x", np.float32(0.5), low=0, high=1) == 0.5


@pytest.mark.parametrize("bad", [0, 1, "yes", None, np.bool_(True)])
def test_boolean_accepts_only_true_and_false(bad):
    assert C.boolean("flag", True) is True and C.boolean("flag", False) is False
    assert _message(C.boolean, "flag", bad).startswith("`flag` must be a bool, got ")


def test_one_of_compares_type_and_value_and_lists_the_choices():
    assert C.one_of("mode", "eval", ("eval", "train")) == "eval"
    assert _message(C.one_of, "mode", "test", ("eval", "train")) == \
        "`mode` must be 'eval' or 'train', got 'test' (str)."
    assert _message(C.one_of, "kind", "x", ("a", "b", "c")) == \
        "`kind` must be one of ['a', 'b', 'c'], got 'x' (str)."
    with pytest.raises(SketchConfigError):
        C.one_of("v", True, (1, 2, 3))  # True == 1, but a bool is not one of these ints


def test_str_list_refuses_a_bare_string_and_non_str_items():
    assert C.str_list("include", ("a.*", "b")) == ["a.*", "b"]
    for bad in ("net.*", ["a", 3], 5):
        assert _message(C.str_list, "include", bad).startswith("`include` must be a list of str, got ")
    assert C.string("id_key", "index") == "index"
    msg = _message(C.string, "id_key", "", non_empty=True)
    assert msg == "`id_key` must be a non-empty str, got '' (str)."


def test_hint_follows_the_sentence_and_long_values_are_cut():
    msg = _message(C.positive_int, "k", 0, hint="Use k=10.")
    assert msg == "`k` must be a positive int, got 0 (int). Use k=10."
    msg = _message(C.positive_int, "k", "x" * 500)
    assert FORM.match(msg) and len(msg) < 150 and "..." in msg


@pytest.mark.parametrize("error", [SpectrumError, SubspaceError])
def test_the_error_type_is_the_callers_and_a_sketch_config_error(error):
    with pytest.raises(error, match="`k` must be a positive int"):
        C.positive_int("k", 0, error=error)
    assert issubclass(error, SketchConfigError) and issubclass(error, ValueError)
