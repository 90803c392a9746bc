"""The streaming scoring engine that each :class:`~lightning_sketch.attribution.Attributor` owns.

Every method is a per-slice query weight M_{r,c} (:class:`SliceWeight`) applied as
score(z, x) = mean_r Σ_c q_c(z)ᵀ M_{r,c} g_{r,c}(x); the stored rows g are read in blocks from the
store, never all at once. :class:`ScoringEngine` is a component: the Attributor builds one
(``Attributor._engine``) with a back-reference to itself and delegates its scoring, self-influence
and damping methods to it. The engine reads the Attributor's state (``runs``, ``sketches``,
``checkpoints``, ``method``, ``damping``, ``damping_ratio``, ``_ids``: :class:`EngineHost`) and owns
the caches of what it reads from the store. It does not import the Attributor's module.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sketch.attribution import curvature as CV
from lightning_sketch.attribution._stored import Run, load_weights, swapped_weights
from lightning_sketch.attribution.damping import (
    DAMPING_RATIO_GRID,
    DEFAULT_DAMPING_RATIO,
    effective_dimension,
    residual_scale,
    training_time,
)
from lightning_sketch.attribution.scores import SliceWeight, block_scores, kernel_eigh
from lightning_sketch.exceptions import (
    LayoutMismatchError,
    LightningSketchError,
    SketchConfigError,
    SpectrumError,
)
from lightning_sketch.gradients import eval_mode
from lightning_sketch.layout import ParamLayout
from lightning_sketch.sketches import Sketch
from lightning_sketch.spectrum import hessian_eigs, top_eigenpairs_from_snapshot

__all__ = ["EngineHost", "ScoringEngine"]

log = logging.getLogger("lightning_sketch.attribution.query")  # the Attributor's logger, as before

#: methods with a per-slice curvature inverse (and a damping).
_CURVED = ("trak", "fisher_if")

#: bytes of float64 scores held per query chunk (``[Q_chunk, T]``).
_SCORE_BYTES = 1 << 27


class EngineHost(Protocol):
    """What the engine reads off the Attributor that owns it (set by ``Attributor.__init__``).

    ``damping`` and ``damping_ratio`` are written back: :meth:`ScoringEngine.tune_damping` sets them, and
    the damping sensitivity varies them for a moment."""

    runs: list[Run]
    models: list[nn.Module]
    model: nn.Module
    sketches: list[Sketch]
    sketch: Sketch
    layouts: list[ParamLayout]
    layout: ParamLayout
    loss_fn: Callable[[nn.Module, Any], Tensor]
    checkpoints: list[str]
    method: str
    kernel: str | None
    damping: float | None
    damping_ratio: float
    rank: int | None
    current_weights: bool
    _ids: Tensor
    _eig: tuple[Tensor, Tensor] | None

    def query_sketches(self, batch: Any, run: int = 0) -> list[Tensor]: ...


class ScoringEngine:
    """Streaming scores, self-influence and per-slice weights of one Attributor (its ``_engine``).

    It owns the caches of what it reads from the store (kernels' eigendecompositions, counts,
    residuals, row sums, training times, score positions, tracin norms); the runs, slices and
    method settings are read from ``host``, the Attributor, when used.
    """

    def __init__(self, host: EngineHost) -> None:
        #: the Attributor whose runs, slices and settings are scored.
        self.host = host
        self._pos_cache: dict[tuple[int, str], Tensor] = {}
        self._eig_cache: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
        self._count_cache: dict[tuple[int, str], int] = {}
        self._residual_cache: dict[tuple[int, str], float] = {}
        self._row_stats_cache: dict[tuple[int, str], tuple[float, Tensor]] = {}
        self._tau_cache: dict[int, float | None] = {}
        self._norms: Tensor | None = None

    def _positions(self, r: int, name: str) -> Tensor:
        key = (r, name)
        if key not in self._pos_cache:
            ids = self.host.runs[r].ids(name)
            pos = np.searchsorted(self.host._ids.numpy(), ids).astype(np.int64)
            self._pos_cache[key] = torch.from_numpy(pos)
        return self._pos_cache[key]

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _estimators(run: Run) -> dict[str, str | None]:
        """Slice name → the curvature estimator its sidecar records (``None``: no file); one read each."""
        root = run.root
        return {n: None if root is None else CV.curvature_estimator(root, n, store=run.store)
                for n in run.names}

    @staticmethod
    def _curvature_kind(est: set[str | None]) -> str | None:
        """The kernel every estimator in ``est`` names (:func:`~.curvature.kernel_kind`), else ``None``."""
        kinds = {CV.kernel_kind(e) for e in est}
        return None if len(kinds) != 1 else kinds.pop()

    def _select(self, checkpoints: Sequence[str] | None) -> list[str]:
        if checkpoints is None:
            common = [n for n in self.host.runs[0].names if all(n in r.names for r in self.host.runs)]
            if not common:
                common = self.host.runs[0].names  # ensembles of runs with different slice names: by position
            checkpoints = common if self.host.method in ("tracin", "grad_cos", *_CURVED) else common[-1:]
            if not all(set(checkpoints) <= set(r.names) for r in self.host.runs):
                raise SketchConfigError(
                    "The runs of the ensemble hold different slice names; pass `checkpoints` present in "
                    "every run."
                )
        checkpoints = list(checkpoints)
        unknown = [c for c in checkpoints if any(c not in r.names for r in self.host.runs)]
        if unknown or not checkpoints:
            raise SketchConfigError(
                f"`checkpoints` {checkpoints} not all in the store's {self.host.runs[0].names}."
            )
        return checkpoints

    # ------------------------------------------------------------------ per-slice weights
    def _kernel(self, r: int, name: str) -> tuple[Tensor, int]:
        """``(K [D, D] float64, T)``: the slice's kernel and the number of examples summed into it."""
        if self.host.kernel in ("fisher", "margin", "gauss-newton", "empirical"):
            root = self.host.runs[r].root
            if root is None:
                raise SketchConfigError(
                    "fisher_if needs a run directory with curvature/; pass the run's path."
                )
            K, meta = CV.read_curvature(root, name, self.host.sketches[r].spec, store=self.host.runs[r].store)
            return K, int(meta["count"])
        D = self.host.sketches[r].sketch_dim
        K, T = torch.zeros(D, D, dtype=torch.float64), 0
        total = torch.zeros(D, dtype=torch.float64)
        for _, g in self.host.runs[r].iter_blocks(name):
            K.addmm_(g.T, g)
            total += g.sum(0)
            T += g.shape[0]
        # the same pass gives the rows' statistics (:meth:`_row_stats`): Σ‖g_t‖² = tr(GᵀG) = tr(K)
        self._row_stats_cache.setdefault((r, name), (float(K.trace()), total))
        return K, T

    def _eigh(self, r: int, name: str) -> tuple[Tensor, Tensor, float]:
        """``(eigenvalues, eigenvectors, tr(K)/T)`` of the slice's kernel."""
        key = (r, name)
        if key not in self._eig_cache:
            K, T = self._kernel(r, name)
            self._count_cache[key] = T
            self._eig_cache[key] = kernel_eigh(K, T)
        return self._eig_cache[key]

    def _row_stats(self, r: int, name: str) -> tuple[float, Tensor]:
        """``(Σ_t ‖g_t‖², Σ_t g_t [D] float64)`` of a slice's stored rows: one pass, cached."""
        key = (r, name)
        if key not in self._row_stats_cache:
            gg, total = 0.0, torch.zeros(self.host.sketches[r].sketch_dim, dtype=torch.float64)
            for _, g in self.host.runs[r].iter_blocks(name):
                g = g.to(torch.float64)
                gg += float((g * g).sum())
                total += g.sum(0)
            self._row_stats_cache[key] = (gg, total)
        return self._row_stats_cache[key]

    def _residual(self, r: int, name: str) -> float:
        """√(tr(GᵀG)/tr(K)) of a margin-kernel slice (the RMS residual 1 − p of its examples), else 1.

        One pass over the slice's stored rows G (``[T, D]``), cached: the cost of scoring one query."""
        if self.host.kernel != "margin":
            return 1.0
        key = (r, name)
        if key not in self._residual_cache:
            s, _, _ = self._eigh(r, name)
            self._residual_cache[key] = residual_scale(self._row_stats(r, name)[0], float(s.sum()))
        return self._residual_cache[key]

    def share_run_facts(self, other: ScoringEngine) -> None:
        """Take what ``other`` read off the same runs and is independent of the method: the stored
        rows' statistics and the runs' training times (a :meth:`Attributor.view`)."""
        self._row_stats_cache.update(other._row_stats_cache)
        self._tau_cache.update(other._tau_cache)

    def training_time(self, r: int = 0) -> float | None:
        """τ of run ``r``, read once (``Attributor.training_time``)."""
        if self.host.damping is not None:
            return None
        if r not in self._tau_cache:
            self._tau_cache[r] = self._read_training_time(r)
        return self._tau_cache[r]

    def _read_training_time(self, r: int) -> float | None:
        run, sketch, layout = self.host.runs[r], self.host.sketches[r], self.host.layouts[r]
        stepped = [n for n in run.names if run.steps.get(n) is not None]
        names = sorted(stepped, key=lambda n: run.steps[n] or 0)
        if len(names) < 2:
            return None
        positions, means = [], []
        for n in names:
            try:
                saved = load_weights(run, n, layout)
            except LightningSketchError as err:  # the scores do not need this slice's weights: say so, go on
                saved = None
                log.warning("The training-time floor of the damping is off for run %d: the weights of "
                            "slice %r cannot be read (%s).", r, n, err)
            if saved is None:
                return None
            flat = layout.flatten({k: saved[k].detach().to("cpu", torch.float64) for k in layout.names})
            positions.append(sketch.apply(flat))
            count = len(run.ids(n))
            means.append(self._row_stats(r, n)[1] / max(count, 1))
        steps = [int(run.steps[n] or 0) for n in names]
        lrs = [run.lrs.get(n) for n in names]
        tau = training_time(positions, means, steps,
                            None if any(lr is None for lr in lrs) else [float(lr or 0.0) for lr in lrs])
        return tau if math.isfinite(tau) and tau > 0 else None

    def damping_unit(self, r: int, name: str) -> float:
        """The unit of ``damping_ratio`` at a slice (``Attributor.damping_unit``)."""
        _, _, unit = self._eigh(r, name)
        tau = self.training_time(r)
        if tau is not None:
            unit = max(unit, self._count(r, name) / (DEFAULT_DAMPING_RATIO * tau))
        return unit / self._residual(r, name)

    def slice_damping(self, r: int, name: str) -> float:
        """The λ of a slice (``Attributor.slice_damping``)."""
        damping = self.host.damping
        lam = damping if damping is not None else self.host.damping_ratio * self.damping_unit(r, name)
        return lam if lam > 0 else 1.0

    def _weights(self, r: int) -> list[SliceWeight]:
        run, C = self.host.runs[r], len(self.host.checkpoints)
        if self.host.method in ("grad_dot",):
            return [SliceWeight.identity(self.host.checkpoints[-1], 1.0)]
        if self.host.method in ("tracin", "grad_cos"):
            missing = [n for n in self.host.checkpoints if run.lrs[n] is None]
            if missing:
                raise SketchConfigError(
                    f"Checkpoints {missing} record no learning rate, which {self.host.method} weights by; "
                    f"use grad_dot, trak or fisher_if, or write the slices with their lr."
                )
            return [SliceWeight.identity(n, float(run.lrs[n] or 0.0)) for n in self.host.checkpoints]
        if self.host.method == "arnoldi_if":
            assert self.host._eig is not None  # set in __init__ for arnoldi_if
            return [SliceWeight.eigen(self.host.checkpoints[-1], *self.host._eig)]
        out = []
        for n in self.host.checkpoints:
            s, U, _ = self._eigh(r, n)
            out.append(SliceWeight.damped_inverse(n, s, U, self.slice_damping(r, n), 1.0 / C,
                                                  rank=self.host.rank))
        return out

    # ------------------------------------------------------------------ scoring engine
    def _accumulate(self, qs: list[list[Tensor]], out: Tensor) -> Tensor:
        """Add mean_r Σ_c (q_c M_c) G_cᵀ into ``out`` ``[Q, T]``."""
        R = len(self.host.runs)
        for r in range(R):
            weights = self._weights(r)
            target = torch.zeros_like(out) if self.host.method == "grad_cos" else out
            for w in weights:
                a = w.apply(qs[r][self.host.checkpoints.index(w.name)])
                pos = self._positions(r, w.name)
                for sl, g in self.host.runs[r].iter_blocks(w.name):
                    target.index_add_(1, pos[sl], block_scores(a, g))
            if self.host.method == "grad_cos":
                qn = torch.stack(
                    [w.scale * (qs[r][self.host.checkpoints.index(w.name)] ** 2).sum(1) for w in weights]
                )
                qn = qn.sum(0).sqrt()
                tn = self._tracin_norms(r)
                target /= qn.clamp_min(1e-300)[:, None] * tn.clamp_min(1e-300)[None, :]
                out += target
        out /= R
        return out

    def self_influence(self) -> tuple[Tensor, Tensor]:
        """``(ids, self-influence)`` of every stored example (``Attributor.self_influence``)."""
        vals = torch.zeros(len(self.host._ids), dtype=torch.float64)
        for r in range(len(self.host.runs)):
            for w in self._weights(r):
                pos = self._positions(r, w.name)
                for sl, g in self.host.runs[r].iter_blocks(w.name):
                    vals.index_add_(0, pos[sl], w.quad(g))
        return self.host._ids, vals / len(self.host.runs)

    def _tracin_norms(self, r: int) -> Tensor:
        if self._norms is None:
            norms = torch.zeros(len(self.host.runs), len(self.host._ids), dtype=torch.float64)
            for rr in range(len(self.host.runs)):
                for n in self.host.checkpoints:
                    pos = self._positions(rr, n)
                    # _weights refuses slices without an lr first
                    lr = float(self.host.runs[rr].lrs[n] or 0.0)
                    for sl, g in self.host.runs[rr].iter_blocks(n):
                        norms[rr].index_add_(0, pos[sl], lr * (g * g).sum(1))
            self._norms = norms.sqrt()
        return self._norms[r]

    def all_query_sketches(self, batch: Any) -> list[list[Tensor]]:
        """``R × C × [Q, D]`` query sketches (``Attributor.all_query_sketches``)."""
        return [self.host.query_sketches(batch, run=r) for r in range(len(self.host.runs))]

    def _sketches_of(self, batch: Any, sketches: list[list[Tensor]] | None) -> list[list[Tensor]]:
        """``sketches`` after a shape check, else :meth:`all_query_sketches` of ``batch``.

        Raises:
            SketchConfigError: neither is given, or ``sketches`` is not ``R × C × [Q, D]`` for this
                Attributor's runs, slices and sketch dimensions.
        """
        if sketches is None:
            if batch is None:
                raise SketchConfigError("Pass a query batch, or its `sketches` from "
                                        "all_query_sketches(batch).")
            return self.all_query_sketches(batch)
        R, C = len(self.host.runs), len(self.host.checkpoints)
        ok = isinstance(sketches, (list, tuple)) and len(sketches) == R and all(
            isinstance(run_q, (list, tuple)) and len(run_q) == C for run_q in sketches)
        shapes = set()
        for r, run_q in enumerate(sketches if ok else []):
            for q in run_q:
                good = (isinstance(q, Tensor) and q.ndim == 2
                        and q.shape[1] == self.host.sketches[r].sketch_dim)
                ok = ok and good
                shapes.add(q.shape[0] if good else -1)
        if not ok or len(shapes) != 1:
            raise SketchConfigError(
                f"`sketches` must be {R} run(s) × {C} slice(s) ({self.host.checkpoints}) of [Q, D] query "
                "sketches with one Q, as all_query_sketches(batch) of an Attributor (or of its view) over "
                "the same runs and slices returns."
            )
        return [[q.to(torch.float64) for q in run_q] for run_q in sketches]

    def _chunks(self, Q: int) -> Iterable[slice]:
        step = max(1, _SCORE_BYTES // (8 * max(1, len(self.host._ids))))
        for s in range(0, Q, step):
            yield slice(s, min(Q, s + step))

    # ------------------------------------------------------------------ arnoldi_if
    def _eigenpairs(self, eigenpairs: Any, snapshot: Any, batches: Any, k: int) -> tuple[Tensor, Tensor]:
        D = self.host.sketch.sketch_dim
        if eigenpairs is not None:
            values, vectors = (torch.as_tensor(t) for t in eigenpairs)
        elif snapshot is not None:
            values, vectors, spec, meta = top_eigenpairs_from_snapshot(snapshot, with_meta=True)
            if spec is not None and dict(spec) != dict(self.host.sketch.spec):
                raise SpectrumError(
                    f"The spectrum snapshot {snapshot} was sketched with {spec}, the store with "
                    f"{self.host.sketch.spec}; take the snapshot with the store's sketch spec."
                )
            fp = meta.get("layout_fingerprint")
            if fp is not None and fp != self.host.layout.fingerprint():
                raise LayoutMismatchError(
                    f"The spectrum snapshot {snapshot} covers other parameters than the store; give "
                    f"HessianSpectrum the same include=/exclude= as GradientSketch."
                )
            snap_step, name = meta.get("step"), self.host.checkpoints[-1]
            last_step = self.host.runs[0].steps.get(name)
            if snap_step is not None and last_step is not None and int(snap_step) != last_step:
                warnings.warn(
                    f"The spectrum snapshot {snapshot} was taken at step {int(snap_step)}, the last "
                    f"stored slice {name!r} at step {last_step}; arnoldi_if pairs that slice's "
                    f"gradients with this curvature. Take a spectrum snapshot at step {last_step} "
                    f"(HessianSpectrum(at_steps=[{last_step}])).",
                    UserWarning,
                    stacklevel=3,
                )
        elif batches is not None:
            saved = (
                None
                if self.host.current_weights
                else load_weights(self.host.runs[0], self.host.checkpoints[-1], self.host.layout)
            )
            with swapped_weights(self.host.model, saved), eval_mode(self.host.model):
                res = hessian_eigs(
                    self.host.model,
                    self.host.loss_fn,
                    list(batches),
                    k=k,
                    sketch=self.host.sketch,
                    which="LA",
                    layout=self.host.layout,
                )
            values, vectors = torch.as_tensor(res.eigenvalues), torch.as_tensor(res.eigenvectors)
        else:
            raise SpectrumError(
                "method='arnoldi_if' needs `eigenpairs`, a spectrum `snapshot` file, or `hessian_batches` "
                "to compute the top eigenpairs of the sketched Hessian."
            )
        if vectors.ndim == 2 and vectors.shape[0] != D and vectors.shape[1] == D:
            vectors = vectors.T  # accept [k, D] rows as well as [D, k] columns
        if (
            vectors.ndim != 2
            or vectors.shape[0] != D
            or values.ndim != 1
            or values.shape[0] != vectors.shape[1]
        ):
            raise SpectrumError(
                f"Eigenvectors must be D={D}-dimensional (sketched with the store's sketch) with one "
                "eigenvalue "
                f"each, got shapes {tuple(values.shape)} and {tuple(vectors.shape)}; compute the "
                "spectrum with "
                f"the same sketch spec."
            )
        return values, vectors

    # ------------------------------------------------------------------ damping
    def damping_info(
        self, batch: Any | None = None, k: int = 10, sketches: list[list[Tensor]] | None = None
    ) -> dict[str, Any]:
        """How each slice's λ was set (``Attributor.damping_info``)."""
        if self.host.method not in _CURVED:
            return {"method": self.host.method, "kernel": self.host.kernel, "rule": None}
        slices: list[dict[str, Any]] = []
        for r in range(len(self.host.runs)):
            for n in self.host.checkpoints:
                s, _, trace_over_t = self._eigh(r, n)
                lam, unit = self.slice_damping(r, n), self.damping_unit(r, n)
                rank = int((s > 1e-10 * float(s.max().clamp_min(1e-300))).sum()) if s.numel() else 0
                slices.append({"run": r, "slice": n, "lambda": lam, "unit": unit, "T": self._count(r, n),
                               "trace_over_T": trace_over_t,
                               "residual": self._residual(r, n), "rank": rank,
                               "d_eff": effective_dimension(s, lam)})
        fr = [x["d_eff"] / x["rank"] for x in slices if x["rank"] > 0]
        unit_text = f"max(tr(K_c)/T_c, T_c/({DEFAULT_DAMPING_RATIO:.3g} tau))"
        out: dict[str, Any] = {
            "method": self.host.method, "kernel": self.host.kernel,
            "rule": ("absolute damping for every slice" if self.host.damping is not None else
                     f"lambda_c = ratio * {unit_text} / residual_c" if self.host.kernel == "margin" else
                     f"lambda_c = ratio * {unit_text}"),
            "training_time": [self.training_time(r) for r in range(len(self.host.runs))],
            "ratio": None if self.host.damping is not None else self.host.damping_ratio,
            "damping": self.host.damping, "slices": slices,
            "d_eff_fraction": float(np.median(fr)) if fr else None,
        }
        if batch is not None or sketches is not None:
            out["top_k_overlap"] = self._damping_sensitivity(self._sketches_of(batch, sketches), k)
        return out

    def _count(self, r: int, name: str) -> int:
        self._eigh(r, name)  # reads the kernel once, with its count
        return self._count_cache[(r, name)]

    def _damping_sensitivity(self, qs: list[list[Tensor]], k: int) -> dict[str, float]:
        """Mean top-k overlap of the proponents at λ/√10 and λ·√10 with those at λ (same query sketches)."""
        k = max(1, min(int(k), len(self.host._ids)))

        saved = (self.host.damping, self.host.damping_ratio)

        def top(factor: float) -> Tensor:  # every slice's λ times `factor`: the ratio, or the absolute λ
            if saved[0] is not None:
                self.host.damping = saved[0] * factor
            else:
                self.host.damping_ratio = saved[1] * factor
            try:
                out = torch.zeros(qs[0][0].shape[0], len(self.host._ids), dtype=torch.float64)
                return self._accumulate(qs, out).topk(k, dim=1).indices
            finally:
                self.host.damping, self.host.damping_ratio = saved

        ref = top(1.0)
        res = {}
        for label, f in (("lambda/sqrt10", 10**-0.5), ("lambda*sqrt10", 10**0.5)):
            other = top(f)
            same = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref, other)]
            res[label] = float(np.mean(same))
        return res

    def tune_damping(
        self,
        val_batches: Iterable[Any] | None = None,
        candidates: Sequence[float] | None = None,
        objective: Callable[[Tensor], float] | None = None,
    ) -> float:
        """Set and return the best damping ratio (``Attributor.tune_damping``)."""
        if self.host.method not in _CURVED:
            raise SketchConfigError(
                f"tune_damping applies to method='trak' or 'fisher_if', not {self.host.method!r}."
            )
        if objective is None or val_batches is None:
            raise SketchConfigError(
                "tune_damping needs `val_batches` and an `objective` (e.g. a validation LDS); without a "
                f"ground truth the automatic ratio {DEFAULT_DAMPING_RATIO:.3g} is already in use."
            )
        cands = list(DAMPING_RATIO_GRID) if candidates is None else [float(c) for c in candidates]
        if not cands or any(not math.isfinite(c) or c <= 0 for c in cands):
            raise SketchConfigError(f"damping `candidates` must be finite ratios > 0, got {cands}.")
        sketches = [self.all_query_sketches(b) for b in val_batches]  # once: only λ changes
        saved = (self.host.damping, self.host.damping_ratio)
        values = []
        try:
            self.host.damping = None
            for rho in cands:
                self.host.damping_ratio = rho
                s = []
                for qs in sketches:
                    out = torch.zeros(qs[0][0].shape[0], len(self.host._ids), dtype=torch.float64)
                    s.append(self._accumulate(qs, out))
                values.append(float(objective(torch.cat(s))))
        except Exception:
            self.host.damping, self.host.damping_ratio = saved
            raise
        best = cands[int(np.nanargmax(values))]
        self.host.damping, self.host.damping_ratio = None, best
        log.info("damping ratio chosen: %.3g (objective %.4g)", best, float(np.nanmax(values)))
        return best
