"""lightning_sketch: gradient sketches for training data attribution, Hessian spectra and
intrinsic dimension, as PyTorch Lightning callbacks (Schioppa, NeurIPS 2024, arXiv 2402.03994).

The numerical packages (``sketches``, ``gradients``, ``store``, ``attribution``, ``spectrum``,
``intrinsic``) are pure PyTorch (+FAISS); ``callbacks`` and ``cli`` adapt them to Lightning.
"""

from __future__ import annotations

from lightning_sketch import exceptions
from lightning_sketch._version import __version__
from lightning_sketch.data import IndexedDataset
from lightning_sketch.sketches import Sketch, make

__all__ = ["IndexedDataset", "Sketch", "__version__", "exceptions", "make"]
