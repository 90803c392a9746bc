"""The streaming scoring engine behind :class:`~lightning_sketch.attribution.Attributor` (a mixin).

Every method is a per-slice query weight M_{r,c} (:class:`SliceWeight`) applied as
score(z, x) = mean_r Σ_c q_c(z)ᵀ M_{r,c} g_{r,c}(x); the stored rows g are read in blocks from the
store, never all at once. The mixin reads the Attributor's state (``runs``, ``sketches``,
``checkpoints``, ``method``, ``damping``, ``damping_ratio``, ``_ids`` and the caches it sets up).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_sketch.attribution import curvature as CV
from lightning_sketch.attribution._stored import load_weights, swapped_weights
from lightning_sketch.exceptions import LayoutMismatchError, SketchConfigError, SpectrumError
from lightning_sketch.gradients import eval_mode

__all__ = ["ScoringEngine", "SliceWeight"]

#: bytes of float64 scores held per query chunk (``[Q_chunk, T]``).
_SCORE_BYTES = 1 << 27


@dataclass
class SliceWeight:
    """One slice's query weight M: a scalar, or ``(s, U, λ)`` meaning U diag(1/(s + λ)) Uᵀ · scale."""

    name: str
    scale: float
    s: Tensor | None = None
    U: Tensor | None = None
    lam: float = 0.0

    def apply(self, q: Tensor) -> Tensor:
        if self.U is None:
            return q * self.scale
        return ((q @ self.U) / (self.s + self.lam)) @ self.U.T * self.scale

    def quad(self, g: Tensor) -> Tensor:
        if self.U is None:
            return (g * g).sum(1) * self.scale
        return ((g @ self.U) ** 2 / (self.s + self.lam)).sum(1) * self.scale



class ScoringEngine:
    """Streaming scores, self-influence and per-slice weights (mixed into the Attributor)."""

    def _positions(self, r: int, name: str) -> Tensor:
        key = (r, name)
        if key not in self._pos_cache:
            ids = self.runs[r].ids(name)
            self._pos_cache[key] = torch.from_numpy(np.searchsorted(self._ids.numpy(), ids).astype(np.int64))
        return self._pos_cache[key]

    # ------------------------------------------------------------------ per-slice weights
    def _kernel(self, r: int, name: str) -> tuple[Tensor, int]:
        """``(K [D, D] float64, T)``: the slice's kernel and the number of examples summed into it."""
        if self.method == "fisher_if":
            K, meta = CV.read_curvature(self.runs[r].root, name, self.sketches[r].spec)
            return K, int(meta["count"])
        D = self.sketches[r].sketch_dim
        K, T = torch.zeros(D, D, dtype=torch.float64), 0
        for _, g in self.runs[r].iter_blocks(name):
            K.addmm_(g.T, g)
            T += g.shape[0]
        return K, T

    def _eigh(self, r: int, name: str) -> tuple[Tensor, Tensor, float]:
        """``(eigenvalues, eigenvectors, scale)`` of the slice's kernel; scale = tr(K)/T, the damping unit."""
        key = (r, name)
        if key not in self._eig_cache:
            K, T = self._kernel(r, name)
            s, U = torch.linalg.eigh(K)
            scale = float(K.trace()) / max(T, 1)
            self._eig_cache[key] = (s.clamp_min(0), U, scale)
        return self._eig_cache[key]

    def _weights(self, r: int) -> list[SliceWeight]:
        run, C = self.runs[r], len(self.checkpoints)
        if self.method in ("grad_dot",):
            return [SliceWeight(self.checkpoints[-1], 1.0)]
        if self.method in ("tracin", "grad_cos"):
            missing = [n for n in self.checkpoints if run.lrs[n] is None]
            if missing:
                raise SketchConfigError(
                    f"Checkpoints {missing} record no learning rate, which {self.method} weights by; use "
                    f"grad_dot, trak or fisher_if, or write the slices with their lr."
                )
            return [SliceWeight(n, run.lrs[n]) for n in self.checkpoints]
        if self.method == "arnoldi_if":
            values, vectors = self._eig
            keep = values > 0
            if not bool(keep.any()):
                raise SpectrumError(f"No positive eigenvalue among {values.tolist()}; arnoldi_if needs positive curvature.")
            return [SliceWeight(self.checkpoints[-1], 1.0, values[keep].to(torch.float64), vectors[:, keep].to(torch.float64))]
        out = []
        for n in self.checkpoints:
            s, U, scale = self._eigh(r, n)
            lam = self.damping if self.damping is not None else self.damping_ratio * scale
            if self.rank is not None:  # project on the top-`rank` curvature directions (eigh is ascending)
                s, U = s[-self.rank:], U[:, -self.rank:]
            if lam <= 0:  # an all-zero kernel (no rows): fall back to an identity weight
                lam = 1.0
            out.append(SliceWeight(n, 1.0 / C, s, U, lam))
        return out

    # ------------------------------------------------------------------ scoring engine
    def _accumulate(self, qs: list[list[Tensor]], out: Tensor) -> Tensor:
        """Add mean_r Σ_c (q_c M_c) G_cᵀ into ``out`` ``[Q, T]``."""
        R = len(self.runs)
        for r in range(R):
            weights = self._weights(r)
            target = torch.zeros_like(out) if self.method == "grad_cos" else out
            for w in weights:
                a = w.apply(qs[r][self.checkpoints.index(w.name)])
                pos = self._positions(r, w.name)
                for sl, g in self.runs[r].iter_blocks(w.name):
                    target.index_add_(1, pos[sl], a @ g.T)
            if self.method == "grad_cos":
                qn = sum(w.scale * (qs[r][self.checkpoints.index(w.name)] ** 2).sum(1) for w in weights).sqrt()
                tn = self._tracin_norms(r)
                target /= qn.clamp_min(1e-300)[:, None] * tn.clamp_min(1e-300)[None, :]
                out += target
        out /= R
        return out

    def _tracin_norms(self, r: int) -> Tensor:
        if self._norms is None:
            self._norms = torch.zeros(len(self.runs), len(self._ids), dtype=torch.float64)
            for rr in range(len(self.runs)):
                for n in self.checkpoints:
                    pos = self._positions(rr, n)
                    for sl, g in self.runs[rr].iter_blocks(n):
                        self._norms[rr].index_add_(0, pos[sl], self.runs[rr].lrs[n] * (g * g).sum(1))
            self._norms = self._norms.sqrt()
        return self._norms[r]

    def _all_query_sketches(self, batch: Any) -> list[list[Tensor]]:
        return [self.query_sketches(batch, run=r) for r in range(len(self.runs))]

    def _chunks(self, Q: int) -> Iterable[slice]:
        step = max(1, _SCORE_BYTES // (8 * max(1, len(self._ids))))
        for s in range(0, Q, step):
            yield slice(s, min(Q, s + step))

    # ------------------------------------------------------------------ arnoldi_if
    def _eigenpairs(self, eigenpairs: Any, snapshot: Any, batches: Any, k: int) -> tuple[Tensor, Tensor]:
        D = self.sketch.sketch_dim
        if eigenpairs is not None:
            values, vectors = (torch.as_tensor(t) for t in eigenpairs)
        elif snapshot is not None:
            from lightning_sketch import spectrum

            values, vectors, spec, meta = spectrum.top_eigenpairs_from_snapshot(snapshot, with_meta=True)
            if spec is not None and dict(spec) != dict(self.sketch.spec):
                raise SpectrumError(
                    f"The spectrum snapshot {snapshot} was sketched with {spec}, the store with "
                    f"{self.sketch.spec}; take the snapshot with the store's sketch spec."
                )
            fp = meta.get("layout_fingerprint")
            if fp is not None and fp != self.layout.fingerprint():
                raise LayoutMismatchError(
                    f"The spectrum snapshot {snapshot} covers other parameters than the store; give "
                    f"HessianSpectrum the same include=/exclude= as GradientSketch."
                )
        elif batches is not None:
            from lightning_sketch.spectrum import hessian_eigs

            saved = None if self.current_weights else load_weights(self.runs[0], self.checkpoints[-1], self.layout)
            with swapped_weights(self.model, saved), eval_mode(self.model):
                res = hessian_eigs(
                    self.model, self.loss_fn, list(batches), k=k, sketch=self.sketch, which="LA", layout=self.layout
                )
            values, vectors = torch.as_tensor(res.eigenvalues), torch.as_tensor(res.eigenvectors)
        else:
            raise SpectrumError(
                "method='arnoldi_if' needs `eigenpairs`, a spectrum `snapshot` file, or `hessian_batches` "
                "to compute the top eigenpairs of the sketched Hessian."
            )
        if vectors.ndim == 2 and vectors.shape[0] != D and vectors.shape[1] == D:
            vectors = vectors.T  # accept [k, D] rows as well as [D, k] columns
        if vectors.ndim != 2 or vectors.shape[0] != D or values.ndim != 1 or values.shape[0] != vectors.shape[1]:
            raise SpectrumError(
                f"Eigenvectors must be D={D}-dimensional (sketched with the store's sketch) with one eigenvalue "
                f"each, got shapes {tuple(values.shape)} and {tuple(vectors.shape)}; compute the spectrum with "
                f"the same sketch spec."
            )
        return values, vectors
