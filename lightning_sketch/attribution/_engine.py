"""The streaming scoring engine behind :class:`~lightning_sketch.attribution.Attributor` (a mixin).

Every method is a per-slice query weight M_{r,c} (:class:`SliceWeight`) applied as
score(z, x) = mean_r Σ_c q_c(z)ᵀ M_{r,c} g_{r,c}(x); the stored rows g are read in blocks from the
store, never all at once. The mixin reads the Attributor's state (``runs``, ``sketches``,
``checkpoints``, ``method``, ``damping``, ``damping_ratio``, ``_ids`` and the caches it sets up).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

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

__all__ = ["ScoringEngine"]

log = logging.getLogger("lightning_sketch.attribution.query")  # the Attributor's logger, as before

#: methods with a per-slice curvature inverse (and a damping).
_CURVED = ("trak", "fisher_if")

#: bytes of float64 scores held per query chunk (``[Q_chunk, T]``).
_SCORE_BYTES = 1 << 27


class ScoringEngine:
    """Streaming scores, self-influence and per-slice weights (mixed into the Attributor)."""

    # The host's state (set by ``Attributor.__init__``), declared here for readers and type checkers.
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
    _pos_cache: dict[tuple[int, str], Tensor]
    _eig_cache: dict[tuple[int, str], tuple[Tensor, Tensor, float]]
    _norms: Tensor | None
    _count_cache: dict[tuple[int, str], int]
    _residual_cache: dict[tuple[int, str], float]
    _row_stats_cache: dict[tuple[int, str], tuple[float, Tensor]]
    _tau_cache: dict[int, float | None]

    if TYPE_CHECKING:  # the host's method (Attributor.query_sketches), declared for type checkers

        def query_sketches(self, batch: Any, run: int = 0) -> list[Tensor]: ...

    def _positions(self, r: int, name: str) -> Tensor:
        key = (r, name)
        if key not in self._pos_cache:
            ids = self.runs[r].ids(name)
            self._pos_cache[key] = torch.from_numpy(np.searchsorted(self._ids.numpy(), ids).astype(np.int64))
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
            common = [n for n in self.runs[0].names if all(n in r.names for r in self.runs)]
            if not common:
                common = self.runs[0].names  # ensembles of runs with different slice names: by position
            checkpoints = common if self.method in ("tracin", "grad_cos", *_CURVED) else common[-1:]
            if not all(set(checkpoints) <= set(r.names) for r in self.runs):
                raise SketchConfigError(
                    "The runs of the ensemble hold different slice names; pass `checkpoints` present in "
                    "every run."
                )
        checkpoints = list(checkpoints)
        unknown = [c for c in checkpoints if any(c not in r.names for r in self.runs)]
        if unknown or not checkpoints:
            raise SketchConfigError(
                f"`checkpoints` {checkpoints} not all in the store's {self.runs[0].names}."
            )
        return checkpoints

    # ------------------------------------------------------------------ per-slice weights
    def _kernel(self, r: int, name: str) -> tuple[Tensor, int]:
        """``(K [D, D] float64, T)``: the slice's kernel and the number of examples summed into it."""
        if self.kernel in ("fisher", "margin", "gauss-newton", "empirical"):
            root = self.runs[r].root
            if root is None:
                raise SketchConfigError(
                    "fisher_if needs a run directory with curvature/; pass the run's path."
                )
            K, meta = CV.read_curvature(root, name, self.sketches[r].spec, store=self.runs[r].store)
            return K, int(meta["count"])
        D = self.sketches[r].sketch_dim
        K, T = torch.zeros(D, D, dtype=torch.float64), 0
        for _, g in self.runs[r].iter_blocks(name):
            K.addmm_(g.T, g)
            T += g.shape[0]
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
            gg, total = 0.0, torch.zeros(self.sketches[r].sketch_dim, dtype=torch.float64)
            for _, g in self.runs[r].iter_blocks(name):
                g = g.to(torch.float64)
                gg += float((g * g).sum())
                total += g.sum(0)
            self._row_stats_cache[key] = (gg, total)
        return self._row_stats_cache[key]

    def _residual(self, r: int, name: str) -> float:
        """√(tr(GᵀG)/tr(K)) of a margin-kernel slice (the RMS residual 1 − p of its examples), else 1.

        One pass over the slice's stored rows G (``[T, D]``), cached: the cost of scoring one query."""
        if self.kernel != "margin":
            return 1.0
        key = (r, name)
        if key not in self._residual_cache:
            s, _, _ = self._eigh(r, name)
            self._residual_cache[key] = residual_scale(self._row_stats(r, name)[0], float(s.sum()))
        return self._residual_cache[key]

    def training_time(self, r: int = 0) -> float | None:
        """τ of run ``r``: the training time of its linearised model, read off its trajectory.

        :func:`~lightning_sketch.attribution.damping.training_time` over every slice of the run with a
        recorded step: the sketched saved weights Φθ_c and the mean stored row of each slice. ``None``
        when the run cannot tell (fewer than two such slices, no saved weights, a degenerate
        trajectory, a slice whose weights are missing or fail their checks: the floor is then off,
        with one log warning), and with an explicit ``damping`` (no floor to set). One pass over the
        run's rows and one read of each slice's weights, cached; τ belongs to the whole run, so every
        slice with a step is read, not only the ``checkpoints`` queried.
        """
        if self.damping is not None:
            return None
        if r not in self._tau_cache:
            self._tau_cache[r] = self._read_training_time(r)
        return self._tau_cache[r]

    def _read_training_time(self, r: int) -> float | None:
        run, sketch, layout = self.runs[r], self.sketches[r], self.layouts[r]
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
        """The unit of ``damping_ratio`` at slice ``name`` of run ``r``:
        u_c = max(tr(K_c)/T_c, T_c/(ρ₀ τ)) / r_c (:mod:`~lightning_sketch.attribution.damping`): the mean
        per-example kernel, floored by the damping that a training time τ (:meth:`training_time`)
        leaves (T_c/τ at the default ratio ρ₀), divided on a margin kernel by the slice's RMS residual
        r_c (:func:`~lightning_sketch.attribution.damping.residual_scale`)."""
        _, _, unit = self._eigh(r, name)
        tau = self.training_time(r)
        if tau is not None:
            unit = max(unit, self._count(r, name) / (DEFAULT_DAMPING_RATIO * tau))
        return unit / self._residual(r, name)

    def slice_damping(self, r: int, name: str) -> float:
        """The λ of slice ``name`` of run ``r`` (``trak``/``fisher_if``): the explicit ``damping``, else
        ``damping_ratio`` × :meth:`damping_unit`; 1 for an all-zero kernel."""
        lam = self.damping if self.damping is not None else self.damping_ratio * self.damping_unit(r, name)
        return lam if lam > 0 else 1.0

    def _weights(self, r: int) -> list[SliceWeight]:
        run, C = self.runs[r], len(self.checkpoints)
        if self.method in ("grad_dot",):
            return [SliceWeight.identity(self.checkpoints[-1], 1.0)]
        if self.method in ("tracin", "grad_cos"):
            missing = [n for n in self.checkpoints if run.lrs[n] is None]
            if missing:
                raise SketchConfigError(
                    f"Checkpoints {missing} record no learning rate, which {self.method} weights by; use "
                    f"grad_dot, trak or fisher_if, or write the slices with their lr."
                )
            return [SliceWeight.identity(n, float(run.lrs[n] or 0.0)) for n in self.checkpoints]
        if self.method == "arnoldi_if":
            assert self._eig is not None  # set in __init__ for arnoldi_if
            return [SliceWeight.eigen(self.checkpoints[-1], *self._eig)]
        out = []
        for n in self.checkpoints:
            s, U, _ = self._eigh(r, n)
            out.append(SliceWeight.damped_inverse(n, s, U, self.slice_damping(r, n), 1.0 / C, rank=self.rank))
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
                    target.index_add_(1, pos[sl], block_scores(a, g))
            if self.method == "grad_cos":
                qn = torch.stack(
                    [w.scale * (qs[r][self.checkpoints.index(w.name)] ** 2).sum(1) for w in weights]
                )
                qn = qn.sum(0).sqrt()
                tn = self._tracin_norms(r)
                target /= qn.clamp_min(1e-300)[:, None] * tn.clamp_min(1e-300)[None, :]
                out += target
        out /= R
        return out

    def self_influence(self) -> tuple[Tensor, Tensor]:
        """Self-influence score(x, x) of every stored example, for mislabel detection.

        Large values flag examples whose own gradient is large and unexplained by the others
        (e.g. flipped labels). ``grad_cos`` is constant by construction, so it uses ``tracin``.

        Returns:
            ``(ids [T], scores [T] float64)``, in :attr:`ids` order, averaged over the runs.
        """
        vals = torch.zeros(len(self._ids), dtype=torch.float64)
        for r in range(len(self.runs)):
            for w in self._weights(r):
                pos = self._positions(r, w.name)
                for sl, g in self.runs[r].iter_blocks(w.name):
                    vals.index_add_(0, pos[sl], w.quad(g))
        return self._ids, vals / len(self.runs)

    def _tracin_norms(self, r: int) -> Tensor:
        if self._norms is None:
            norms = torch.zeros(len(self.runs), len(self._ids), dtype=torch.float64)
            for rr in range(len(self.runs)):
                for n in self.checkpoints:
                    pos = self._positions(rr, n)
                    lr = float(self.runs[rr].lrs[n] or 0.0)  # _weights refuses slices without an lr first
                    for sl, g in self.runs[rr].iter_blocks(n):
                        norms[rr].index_add_(0, pos[sl], lr * (g * g).sum(1))
            self._norms = norms.sqrt()
        return self._norms[r]

    def all_query_sketches(self, batch: Any) -> list[list[Tensor]]:
        """The query's sketched gradients of every run: ``R × C × [Q, D]`` (float64), R runs, C slices.

        Compute them once and pass them as ``sketches=`` to :meth:`top_k`, :meth:`scores` and
        :meth:`damping_info` (and to a :meth:`view` of the same runs) instead of the batch, so that the
        query gradients are not taken again for every answer.
        """
        return [self.query_sketches(batch, run=r) for r in range(len(self.runs))]

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
        R, C = len(self.runs), len(self.checkpoints)
        ok = isinstance(sketches, (list, tuple)) and len(sketches) == R and all(
            isinstance(run_q, (list, tuple)) and len(run_q) == C for run_q in sketches)
        shapes = set()
        for r, run_q in enumerate(sketches if ok else []):
            for q in run_q:
                good = isinstance(q, Tensor) and q.ndim == 2 and q.shape[1] == self.sketches[r].sketch_dim
                ok = ok and good
                shapes.add(q.shape[0] if good else -1)
        if not ok or len(shapes) != 1:
            raise SketchConfigError(
                f"`sketches` must be {R} run(s) × {C} slice(s) ({self.checkpoints}) of [Q, D] query "
                "sketches with one Q, as all_query_sketches(batch) of an Attributor (or of its view) over "
                "the same runs and slices returns."
            )
        return [[q.to(torch.float64) for q in run_q] for run_q in sketches]

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
            values, vectors, spec, meta = top_eigenpairs_from_snapshot(snapshot, with_meta=True)
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
            snap_step, name = meta.get("step"), self.checkpoints[-1]
            last_step = self.runs[0].steps.get(name)
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
                if self.current_weights
                else load_weights(self.runs[0], self.checkpoints[-1], self.layout)
            )
            with swapped_weights(self.model, saved), eval_mode(self.model):
                res = hessian_eigs(
                    self.model,
                    self.loss_fn,
                    list(batches),
                    k=k,
                    sketch=self.sketch,
                    which="LA",
                    layout=self.layout,
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
        """How each slice's λ was set, and how much the answer depends on it (JSON-ready).

        For ``trak``/``fisher_if``: ``rule`` (text), ``ratio`` ρ or the absolute ``damping``,
        ``training_time`` (τ of each run, :meth:`training_time`; ``None`` where the run cannot tell), and
        per slice of every run ``lambda``, ``unit`` (:meth:`damping_unit`; λ = ratio · unit),
        ``trace_over_T`` = tr(K_c)/T_c, ``residual`` (the RMS residual of a margin kernel, else 1),
        ``T``, ``rank`` (of K_c) and
        ``d_eff`` = Σ s_i/(s_i + λ) (:func:`~lightning_sketch.attribution.damping.effective_dimension`),
        with ``d_eff_fraction`` = median d_eff/rank over slices. With a query ``batch``, also
        ``top_k_overlap``: the mean fraction of each query's top-``k`` proponents that stay in the
        top ``k`` when every λ is divided (``"lambda/sqrt10"``) or multiplied (``"lambda*sqrt10"``)
        by √10 — near 1 the ranking does not hinge on the damping; well below 1 it does, and a
        ground truth (:meth:`tune_damping`) is worth having; ``sketches`` (from
        :meth:`all_query_sketches`) stand for the batch. Other methods: ``{"method", "rule": None}``.

        Example (``tests/attribution/test_damping.py`` runs it)::

            info = attributor.damping_info(queries)
            info["slices"][0]["lambda"], info["top_k_overlap"]["lambda*sqrt10"]
        """
        if self.method not in _CURVED:
            return {"method": self.method, "kernel": self.kernel, "rule": None}
        slices: list[dict[str, Any]] = []
        for r in range(len(self.runs)):
            for n in self.checkpoints:
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
            "method": self.method, "kernel": self.kernel,
            "rule": ("absolute damping for every slice" if self.damping is not None else
                     f"lambda_c = ratio * {unit_text} / residual_c" if self.kernel == "margin" else
                     f"lambda_c = ratio * {unit_text}"),
            "training_time": [self.training_time(r) for r in range(len(self.runs))],
            "ratio": None if self.damping is not None else self.damping_ratio,
            "damping": self.damping, "slices": slices,
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
        k = max(1, min(int(k), len(self._ids)))

        saved = (self.damping, self.damping_ratio)

        def top(factor: float) -> Tensor:  # every slice's λ times `factor`: the ratio, or the absolute λ
            if saved[0] is not None:
                self.damping = saved[0] * factor
            else:
                self.damping_ratio = saved[1] * factor
            try:
                out = torch.zeros(qs[0][0].shape[0], len(self._ids), dtype=torch.float64)
                return self._accumulate(qs, out).topk(k, dim=1).indices
            finally:
                self.damping, self.damping_ratio = saved

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
        """Choose the ratio ρ (λ_c = ρ · :meth:`damping_unit`) that maximises ``objective``; returns it.

        For users who have a ground truth: ``objective(scores [Q, T]) -> float`` (higher is better)
        is evaluated on the scores of ``val_batches`` for every candidate ratio (default
        :data:`DAMPING_RATIO_GRID`), e.g. the LDS of validation queries against retrained models
        (:func:`lightning_sketch.evaluation.lds`). Without a ground truth, keep the automatic
        ratio (:data:`~lightning_sketch.attribution.damping.DEFAULT_DAMPING_RATIO`; nothing to call). Sets
        :attr:`damping_ratio` and clears an absolute :attr:`damping`.

        Raises:
            SketchConfigError: if the method has no damping, or ``objective``/``val_batches`` is missing.
        """
        if self.method not in _CURVED:
            raise SketchConfigError(
                f"tune_damping applies to method='trak' or 'fisher_if', not {self.method!r}."
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
        saved = (self.damping, self.damping_ratio)
        values = []
        try:
            self.damping = None
            for rho in cands:
                self.damping_ratio = rho
                s = []
                for qs in sketches:
                    out = torch.zeros(qs[0][0].shape[0], len(self._ids), dtype=torch.float64)
                    s.append(self._accumulate(qs, out))
                values.append(float(objective(torch.cat(s))))
        except Exception:
            self.damping, self.damping_ratio = saved
            raise
        best = cands[int(np.nanargmax(values))]
        self.damping, self.damping_ratio = None, best
        log.info("damping ratio chosen: %.3g (objective %.4g)", best, float(np.nanmax(values)))
        return best
