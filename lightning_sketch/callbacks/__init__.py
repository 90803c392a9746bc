"""Lightning callbacks: thin adapters over the pure-PyTorch packages.

- :class:`GradientSketch`: streams per-example gradient sketches into a
  :class:`~lightning_sketch.store.SketchStore`.
- :class:`HessianSpectrum`: snapshots of the top Hessian eigenvalues and the spectral density
  (numerical settings in the :class:`SpectrumNumerics` option group).
- :class:`IntrinsicDimension`: subspace training θ = θ0 + Φᵀω and the paper's doubling search
  (its settings in the :class:`SearchCriteria` option group).

The classes are imported on first access so that ``lightning_sketch.callbacks.X`` class paths in
LightningCLI configs resolve without importing the other callbacks' dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_CALLBACKS = {
    "GradientSketch": "gradient_sketch",
    "HessianSpectrum": "hessian_spectrum",
    "IntrinsicDimension": "intrinsic_dimension",
    "SearchCriteria": "intrinsic_dimension",
    "SpectrumNumerics": "hessian_spectrum",
}

__all__ = list(_CALLBACKS)


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module(f"lightning_sketch.callbacks.{_CALLBACKS[name]}"), name)
    raise AttributeError(f"module 'lightning_sketch.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CALLBACKS])
