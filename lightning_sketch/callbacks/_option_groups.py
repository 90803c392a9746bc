"""One merge rule for a callback's dataclass option group and its deprecated flat keywords.

``HessianSpectrum(numerics=SpectrumNumerics(...))`` and ``IntrinsicDimension(criteria=SearchCriteria(...))``
keep accepting their old flat keyword arguments (``num_iter=...``, ``target=...``) from Python, with a
deprecation warning; jsonargparse reads only the group, so YAML uses the group's mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation

__all__ = ["merge_flat_options"]

G = TypeVar("G")


def merge_flat_options(
    group_cls: type[G],
    group: G | None,
    flat: dict[str, Any],
    *,
    owner: str,
    arg: str,
    what: str,
    error: type[Exception],
) -> G:
    """``group``, or a ``group_cls`` built from the deprecated flat keywords ``flat`` (not both).

    Args:
        group_cls: the option dataclass (e.g. ``SearchCriteria``).
        group: the instance passed as ``arg`` (or None).
        flat: the flat keyword arguments the callback received in ``**kwargs``.
        owner: the callback's name, for messages (``"IntrinsicDimension"``).
        arg: the group's argument name (``"criteria"``).
        what: what the group holds, for messages (``"search settings"``).
        error: the callback's typed error for a wrong ``group`` or a double specification.

    Raises:
        TypeError: a flat keyword that is no field of ``group_cls`` (as Python would).
        error: ``group`` is not a ``group_cls``, or both ``group`` and flat keywords were given.
    """
    fields = {f.name for f in dataclasses.fields(group_cls)}  # type: ignore[arg-type]  # a dataclass
    unknown = sorted(set(flat) - fields)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword argument(s) {unknown}.")
    if group is not None and not isinstance(group, group_cls):
        raise error(f"`{arg}` must be a {group_cls.__name__}, got {type(group).__name__}.")
    if not flat:
        return group if group is not None else group_cls()
    if group is not None:
        raise error(
            f"Pass the {what} once: either `{arg}` or the deprecated keyword arguments {sorted(flat)}."
        )
    names = ", ".join(f"{k}=..." for k in sorted(flat))
    rank_zero_deprecation(
        f"{owner}({names}) is deprecated; pass {arg}={group_cls.__name__}({names}) (in YAML: a `{arg}:` "
        "mapping)."
    )
    return group_cls(**flat)
