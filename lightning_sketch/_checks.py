"""Argument checks shared by every public entry point: one helper per kind of value, one message form.

Each function returns the validated value (normalised: ``int`` for integers, ``float`` for numbers)
or raises ``error`` (default :class:`~lightning_sketch.exceptions.SketchConfigError`; the analysis
packages pass their subclasses ``SpectrumError``/``SubspaceError``) with the message::

    `name` must be <what>, got <value!r> (<type>).[ <hint>]

The vocabulary of ``<what>``:

* integers: ``an int``, ``a positive int`` (>= 1), ``a non-negative int`` (>= 0), ``an int >= m``,
  ``an int in [lo, hi]``;
* numbers: ``a finite number``, ``a number > 0``, ``a finite number >= 0``, ``a number in (0, 1)``
  (bounds written as intervals, open or closed);
* ``a bool``; ``'a' or 'b'`` / ``one of ['a', 'b', 'c']``; ``a str``; ``a list of str``;

each followed by `` or None`` where ``None`` is allowed. ``bool`` is never accepted as an int or a
number, and NaN is never a number; infinities only where ``allow_inf=True``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

from lightning_sketch.exceptions import SketchConfigError

__all__ = [
    "boolean",
    "finite_positive",
    "integer",
    "is_int",
    "non_negative_int",
    "number",
    "one_of",
    "positive_int",
    "refuse",
    "str_list",
    "string",
]

T = TypeVar("T")

_REPR_CAP = 80


def _shown(value: Any) -> str:
    """``repr(value)`` capped at 80 characters, then the type name (a tensor's repr can be pages)."""
    text = repr(value)
    if len(text) > _REPR_CAP:
        text = text[: _REPR_CAP - 3] + "..."
    return f"{text} ({type(value).__name__})"


def refuse(
    name: str,
    what: str,
    value: Any,
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Exception:
    """The error (to ``raise``) for a value the helpers here cannot express, in their message form.

    Example:
        >>> str(refuse("at_steps", "a list of non-negative ints", 5))
        '`at_steps` must be a list of non-negative ints, got 5 (int).'
    """
    none = " or None" if allow_none else ""
    tail = f" {hint}" if hint else ""
    return error(f"`{name}` must be {what}{none}, got {_shown(value)}.{tail}")


def _fail(error: type[Exception], name: str, what: str, value: Any, allow_none: bool, hint: str) -> Exception:
    return refuse(name, what, value, allow_none=allow_none, error=error, hint=hint)


def _int_what(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if maximum is not None:
        return f"an int <= {maximum}"
    if minimum == 1:
        return "a positive int"
    if minimum == 0:
        return "a non-negative int"
    if minimum is not None:
        return f"an int >= {minimum}"
    return "an int"


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer, False for ``bool`` (and everything else)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (each bound optional), or ``None`` if allowed.

    Accepts Python and NumPy integers, never ``bool`` (``True`` is not the int 1 here) nor floats
    (``64.0`` is refused, not truncated).

    Raises:
        error: naming ``name``, the expected range and the value given.
    """
    if value is None and allow_none:
        return None
    if (not is_int(value) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        raise _fail(error, name, _int_what(minimum, maximum), value, allow_none, hint)
    return int(value)


def positive_int(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as an ``int >= minimum`` (default 1), or ``None`` if allowed; see :func:`integer`."""
    return integer(name, value, minimum=minimum, allow_none=allow_none, error=error, hint=hint)


def non_negative_int(
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as an ``int >= 0``, or ``None`` where ``allow_none``; see :func:`integer`."""
    return integer(name, value, minimum=0, allow_none=allow_none, error=error, hint=hint)


def _bound(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _number_what(
    low: float | None, high: float | None, low_open: bool, high_open: bool, allow_inf: bool
) -> str:
    finite = "" if allow_inf else "finite "
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"a number in {left}{_bound(low)}, {_bound(high)}{right}"
    if low is not None:
        return f"a {finite if not low_open else ''}number {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f"a {finite if not high_open else ''}number {'<' if high_open else '<='} {_bound(high)}"
    return f"a {finite}number"


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as a ``float`` within the given bounds (``low_open``/``high_open``: strict), or ``None``.

    Accepts Python and NumPy reals, never ``bool``, NaN, or (unless ``allow_inf``) an infinity.
    A lower bound written ``a number > 0`` excludes ``+inf`` all the same unless ``allow_inf``.

    Raises:
        error: naming ``name``, the expected range and the value given.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        x = float(value)
        ok = not math.isnan(x) and (allow_inf or math.isfinite(x))
        if ok and low is not None:
            ok = x > low if low_open else x >= low
        if ok and high is not None:
            ok = x < high if high_open else x <= high
    if not ok:
        what = _number_what(low, high, low_open, high_open, allow_inf)
        raise _fail(error, name, what, value, allow_none, hint)
    return float(value)


def finite_positive(
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as a finite ``float > 0``, or ``None`` where ``allow_none``; see :func:`number`."""
    return number(name, value, low=0, low_open=True, allow_none=allow_none, error=error, hint=hint)


def boolean(
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not ``"yes"``), or ``None`` where ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise _fail(error, name, "a bool", value, allow_none, hint)
    return value


def _choices_what(choices: tuple[Any, ...]) -> str:
    if len(choices) == 2:
        return f"{choices[0]!r} or {choices[1]!r}"
    return f"one of {list(choices)!r}"


def one_of(
    name: str,
    value: Any,
    choices: Iterable[T],
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` if it equals one of ``choices`` (same type: ``True`` is not ``1``), or ``None``."""
    options = tuple(choices)
    if value is None and allow_none:
        return None
    if not any(type(value) is type(c) and value == c for c in options):
        raise _fail(error, name, _choices_what(options), value, allow_none, hint)
    return value


def string(
    name: str,
    value: Any,
    *,
    non_empty: bool = False,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` if it is a ``str`` (non-empty where ``non_empty``), or ``None`` where ``allow_none``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or (non_empty and not value):
        raise _fail(error, name, "a non-empty str" if non_empty else "a str", value, allow_none, hint)
    return value


def str_list(
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    error: type[Exception] = SketchConfigError,
    hint: str = "",
) -> Any:
    """``value`` as a ``list[str]`` from a list or tuple of str (a bare str is refused), or ``None``."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(error, name, "a list of str", value, allow_none, hint)
    return list(value)
