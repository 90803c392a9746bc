"""Data helpers shared by the store tests (a unique module name: pytest imports test
directories by basename)."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int, seed: int, clusters: int = 20) -> np.ndarray:
    """Rows around ``clusters`` random centres (non-isotropic, like gradient sketches)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 3
    scales = rng.uniform(0.2, 1.0, size=clusters)
    lab = rng.integers(0, clusters, size=n)
    return (centres[lab] + rng.normal(size=(n, d)) * scales[lab, None]).astype(np.float32)
