"""Lightning callbacks: thin adapters over the pure-PyTorch packages.

- :class:`GradientSketch`: streams per-example gradient sketches into a :class:`~lightning_sketch.store.SketchStore`.
- :class:`HessianSpectrum`: snapshots of the top Hessian eigenvalues and the spectral density.
- :class:`IntrinsicDimension`: subspace training θ = θ0 + Φᵀω and the paper's doubling search.
"""

from __future__ import annotations

from lightning_sketch.callbacks.gradient_sketch import GradientSketch
from lightning_sketch.callbacks.hessian_spectrum import HessianSpectrum
from lightning_sketch.callbacks.intrinsic_dimension import IntrinsicDimension

__all__ = ["GradientSketch", "HessianSpectrum", "IntrinsicDimension"]
