"""``SearchCriteria``: the search settings of :class:`~lightning_sketch.callbacks.IntrinsicDimension`.

An option group (a dataclass, which ``LightningCLI``/jsonargparse reads as a nested mapping), so the
callback keeps a short signature::

    IntrinsicDimension(sketch_dim=4096, criteria=SearchCriteria(d_min=16, delta=0.05, reference_score=0.98))

    # YAML
    init_args:
      sketch_dim: 4096
      criteria:
        d_min: 16
        delta: 0.05
        target_fraction: 0.9
        reference_score: 0.98
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_sketch._checks import number, positive_int
from lightning_sketch.exceptions import SubspaceError

__all__ = ["SearchCriteria"]


@dataclass(frozen=True)
class SearchCriteria:
    """Where the doubling search starts, when it doubles d and when it is done (arXiv 2402.03994, Listing 9).

    The search starts at ``d_min`` active coordinates, doubles d after a round that gained less than
    ``delta`` and stops once the metric reaches the target: ``target`` if given, else
    ``target_fraction × reference_score``. In fixed mode only the target is used (to record whether
    it was reached); ``d_min`` and ``delta`` apply to search mode.

    Args:
        d_min: first active size of the search (a positive int, at most the callback's ``sketch_dim``).
        delta: minimum gain of the monitored metric per round below which d doubles (metric units, >= 0).
        target: absolute value of the metric that counts as solved; overrides the fraction.
        target_fraction: target = target_fraction × reference_score when ``target`` is None, in (0, 1].
        reference_score: the full fine-tuning score (see
            :func:`~lightning_sketch.callbacks.intrinsic_dimension.measure_reference_score`).

    Raises:
        SubspaceError: on an invalid value.
    """

    d_min: int = 16
    delta: float = 0.01
    target: float | None = None
    target_fraction: float = 0.9
    reference_score: float | None = None

    def __post_init__(self) -> None:
        positive_int("d_min", self.d_min, error=SubspaceError)
        number("delta", self.delta, low=0, error=SubspaceError, hint="A gain in metric units.")
        number("target", self.target, allow_none=True, error=SubspaceError)
        number("reference_score", self.reference_score, allow_none=True, error=SubspaceError)
        number("target_fraction", self.target_fraction, low=0, high=1, low_open=True, error=SubspaceError)

    @property
    def resolved_target(self) -> float | None:
        """``target``, else ``target_fraction × reference_score``, else None (no target)."""
        if self.target is not None:
            return self.target
        if self.reference_score is not None:
            return self.target_fraction * self.reference_score
        return None
