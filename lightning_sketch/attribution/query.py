"""The :class:`Attributor`: training data attribution queries against one or several stored runs.

Every method is one bilinear form per checkpoint slice c, summed over slices and averaged over
runs (an ensemble, as TRAK averages over models; Park et al. 2023, §3):

    score(z, x) = mean_r Σ_c  q_c(z)ᵀ M_{r,c} g_{r,c}(x),

with q_c(z) the query's sketched gradient at slice c's weights, g_{r,c}(x) the stored row and
M_{r,c} a ``[D, D]`` weight: η_c I (``tracin``), I at the last slice (``grad_dot``),
(K_c + λ_c I)⁻¹ / C with K_c = G_cᵀG_c (``trak``) or K_c = the sampled-label Fisher Φ F_c Φᵀ
(``fisher_if``), and U diag(1/λ) Uᵀ over the top eigenpairs of Φ H Φᵀ (``arnoldi_if``).
``grad_cos`` divides ``tracin`` by both feature norms. Rows are streamed in blocks from the store
(memory-mapped), so memory is bounded by one block plus the ``[Q, T]`` scores of a query chunk,
never by a float64 copy of the store.

Sign convention: a **positive** score means that training on the example lowers the query's loss
(for ``trak``/``fisher_if`` with a model that defines ``per_example_margin``: raises its margin);
opponents are the most negative scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sketch._checks import boolean, integer
from lightning_sketch.attribution import curvature as CV
from lightning_sketch.attribution._engine import _CURVED, ScoringEngine
from lightning_sketch.attribution._stored import (
    Run,
    _sketch_and_layout,
    load_weights,
    negative_margin,
    negative_margin_of,
    open_run,
    swapped_weights,
    union_ids,
    verify_runs,
)
from lightning_sketch.attribution.damping import DEFAULT_DAMPING_RATIO
from lightning_sketch.attribution.methods import (
    METHODS,
    ArnoldiIF,
    AttributionMethod,
    FisherIF,
    GradCos,
    GradDot,
    TracIn,
    Trak,
    _int_at_least,
    _positive_real,
    method_from_name,
)
from lightning_sketch.attribution.task import AttributionTask, check_query_targets, resolve_task
from lightning_sketch.exceptions import (
    LightningSketchError,
    SketchConfigError,
    SketchInputError,
    StoreNotFoundError,
)
from lightning_sketch.gradients import eval_mode, module_loss_fn, sketch_gradients
from lightning_sketch.gradients.per_example import hook_capture

__all__ = [
    "METHODS",
    "Attributor",
    "negative_margin",
    "negative_margin_of",
]


Method = Literal["auto", "grad_dot", "tracin", "grad_cos", "trak", "fisher_if", "arnoldi_if"]
#: what ``Attributor(method=...)`` takes: ``"auto"``, a name of :data:`METHODS` or a method object.
MethodArg = Union[Method, AttributionMethod]
LossFn = Callable[[nn.Module, Any], Tensor]

#: the Attributor's shorthand keywords → the method objects' argument names.
_SHORTHAND = {"damping": "damping", "damping_ratio": "damping_ratio", "rank": "rank", "arnoldi_k": "k",
              "eigenpairs": "eigenpairs", "snapshot": "snapshot", "hessian_batches": "hessian_batches",
              "index": "index"}
_METHOD_TYPES = (GradDot, TracIn, GradCos, Trak, FisherIF, ArnoldiIF)
_FIELDS = {c.name: tuple(f.name for f in fields(c)) for c in _METHOD_TYPES}


def _requested_method(method: Any, shorthand: dict[str, Any]) -> AttributionMethod | dict[str, Any]:
    """The method object that ``method`` and the shorthand keywords name; for ``"auto"``, the
    keywords for the ``trak``/``fisher_if`` object that the runs will decide (checked already).

    Raises:
        SketchConfigError: for an unknown method, a bad argument, a keyword the method does not use,
            or a keyword beside a method object.
    """
    given = {k: v for k, v in shorthand.items() if v is not None}
    if isinstance(method, _METHOD_TYPES):
        if given:
            raise SketchConfigError(
                f"{sorted(given)} given beside the method object {method!r}; set them on the object "
                f"(e.g. {type(method).__name__}(...)) and drop the keywords."
            )
        return method
    if "arnoldi_k" in given:
        _int_at_least("Attributor", "arnoldi_k", given["arnoldi_k"], 1, none_ok=False)
    kwargs = {_SHORTHAND[k]: v for k, v in given.items()}
    if isinstance(method, str) and method == "auto":
        for k in ("damping", "damping_ratio"):  # the type checks first, with the keyword's name
            _positive_real("Attributor", k, kwargs.get(k))
        unused = sorted(k for k in given if k not in ("damping", "damping_ratio", "rank"))
        if unused:
            raise SketchConfigError(
                f"{unused} given with method='auto', which chooses trak or fisher_if (they take damping, "
                "damping_ratio and rank); name the method that uses them, e.g. method=ArnoldiIF(k=...)."
            )
        Trak(**kwargs)  # the same checks as FisherIF's
        return kwargs
    if not isinstance(method, str) or method not in METHODS:
        raise SketchConfigError(
            f"`method` must be 'auto' or one of {METHODS}, or a method object "
            f"({', '.join(c.__name__ for c in _METHOD_TYPES)}), got {method!r}."
        )
    keywords = {k for k, f in _SHORTHAND.items() if f in _FIELDS[method]}
    unused = sorted(set(given) - keywords)
    if unused:
        raise SketchConfigError(
            f"method={method!r} does not use {unused}; it takes {sorted(keywords) or 'no argument'}."
        )
    return method_from_name(method, **kwargs)


def _check_options(chunk_size: Any, verify: Any, task: Any) -> None:
    """Refuse a bad ``chunk_size``, ``verify`` or ``task`` before any run is opened."""
    _int_at_least("Attributor", "chunk_size", chunk_size, 1, none_ok=True)
    boolean("verify", verify)
    if task is not None and not isinstance(task, AttributionTask):
        raise SketchConfigError(
            "`task` must be a lightning_sketch.attribution.AttributionTask or None, got "
            f"{type(task).__name__}."
        )


class Attributor:
    """Attribute queries to training examples through stored sketched gradients.

    Methods (``method``: an object of :mod:`~lightning_sketch.attribution.methods`, or its name):

    - ``"auto"`` (default): ``fisher_if`` when every run holds only the sampled-label Fisher
      (``GradientSketch(curvature="fisher")``), else ``trak`` (on TRAK's margin kernel, which
      ``GradientSketch`` gathers by default for classifiers).
    - ``fisher_if``: influence functions with the sketched Gauss–Newton / true Fisher of sampled
      labels, Σ_c q_cᵀ (Φ F_c Φᵀ + λ_c I)⁻¹ g_c / C (Koh & Liang 2017; Grosse et al. 2023 use the
      same sampled-label curvature in EK-FAC), averaged over the slices like TRAK's ensemble.
    - ``trak``: TRAK (Park et al. 2023): Σ_c q_cᵀ (K_c + λ_c I)⁻¹ g_c / C with K_c = Σ_t φ_t φ_tᵀ the
      kernel of the sketched margin gradients φ_t of the training examples, gathered during fit
      (the stored loss gradients are g_t = −(1 − p_t) φ_t, TRAK's out-to-loss weighting). Runs
      without that kernel use K_c = GᵀG of the stored loss gradients (:attr:`kernel` says which).
    - ``tracin``: Σ_c η_c ⟨Φg_c(z), Φg_c(x)⟩ (Pruthi et al. 2020); ``grad_cos``: its cosine;
      ``grad_dot``: the last slice only.
    - ``arnoldi_if``: Σ_i λ_i⁻¹⟨u_i, Φg(z)⟩⟨u_i, Φg(x)⟩ over the top eigenpairs of the sketched
      Hessian at the last slice (Schioppa et al. 2022).

    Damping (``Trak``, ``FisherIF``): with ``damping=None`` each slice uses λ_c = ``damping_ratio`` ·
    u_c (:meth:`damping_unit`): u_c = tr(K_c)/T_c, T_c the examples summed into the slice's kernel K_c,
    floored by T_c/(ρ₀ τ) where τ is the run's training time (:meth:`training_time`: a short run is
    damped more), and divided on TRAK's margin kernel by the RMS residual of the slice's examples (a
    well-fitted set is damped more); default ratio ρ₀ = :data:`DEFAULT_DAMPING_RATIO` = 10^-0.5
    (:mod:`~lightning_sketch.attribution.damping` says how it was chosen). :meth:`damping_info` reports
    each λ and how much the top-k depends on it. An explicit ``damping`` is an absolute λ for every
    slice; :meth:`tune_damping` picks the ratio on a user-supplied objective (e.g. a validation LDS).

    Ensembles: pass a list of runs (``GradientSketch`` run directories or stores) and either one
    model (its architecture; each run's saved slice weights are loaded into it) or one model per
    run. Scores are the mean over runs, aligned by example id.

    Args:
        store: a run directory, a store directory or a :class:`~lightning_sketch.store.SketchStore`;
            or a list of them (an ensemble).
        model: the model (or one model per run) whose gradients were stored.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` per-example losses; default
            ``model.per_example_loss(batch)``.
        method: ``"auto"``, a method object (:class:`~.methods.Trak`, :class:`~.methods.FisherIF`,
            :class:`~.methods.TracIn`, :class:`~.methods.GradCos`, :class:`~.methods.GradDot`,
            :class:`~.methods.ArnoldiIF`: each holds the arguments of its method), or one of
            :data:`METHODS`, shorthand for that object with its defaults (``"trak"`` is ``Trak()``).
        query_loss_fn: the queries' per-example "loss"; default ``loss_fn``, or for ``trak`` and
            ``fisher_if`` the negative margin: the model's ``per_example_margin(batch)``, or the
            logits' margin when the runs' kernel was built from it (classification convention).
        checkpoints: names of the slices to use (default: all for ``tracin``, ``grad_cos``,
            ``trak``, ``fisher_if``; the last for ``grad_dot`` and ``arnoldi_if``); every run must
            hold them.
        weights_dir: folder of ``<slice>.pt`` parameter files (default: the run's ``weights/``;
            single-run only).
        chunk_size: examples per ``vmap`` call for the query gradients.
        current_weights: take every slice's query gradients at the model's current weights.
        task: the attribution task (:class:`~.task.AttributionTask`); default: recognised from the
            model and the first query batch where the query needs it.
        verify: recompute the stored rows of each run's probe examples with ``model`` at every slice in
            use and raise :class:`~lightning_sketch.exceptions.SliceMismatchError` when they differ
            (:func:`~lightning_sketch.attribution._stored.verify_runs`; runs without probe are skipped).
        damping, damping_ratio, rank, arnoldi_k, eigenpairs, snapshot, hessian_batches, index:
            shorthand for the method object's arguments, with a string ``method`` (or ``"auto"``,
            which takes ``damping``, ``damping_ratio`` and ``rank``): ``method="trak", damping=0.1``
            is ``method=Trak(damping=0.1)``; ``arnoldi_k`` is ``ArnoldiIF(k=...)``. One that the
            method does not use, or any of them beside a method object, is refused.

    Raises:
        SketchConfigError: for an unknown method or a bad argument.
        LayoutMismatchError: if a model's parameter layout differs from a store's.
        SliceMismatchError: if a model does not reproduce a run's stored probe rows (``verify``).
        StoreNotFoundError: for ``fisher_if`` on a run without sampled-label Fisher files.
        SpectrumError: for ``arnoldi_if`` without eigenpairs, or with eigenpairs of another sketch.

    Example:
        >>> # see tests/attribution/test_attributor.py, examples/attribution_digits.py and README.md
    """

    def __init__(
        self,
        store: Any,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: LossFn | None = None,
        method: MethodArg = "auto",
        *,
        query_loss_fn: LossFn | None = None,
        checkpoints: Sequence[str] | None = None,
        weights_dir: str | Path | None = None,
        chunk_size: int | None = None,
        current_weights: bool = False,
        task: AttributionTask | None = None,
        verify: bool = True,
        damping: float | None = None,
        damping_ratio: float | None = None,
        rank: int | None = None,
        arnoldi_k: int | None = None,
        eigenpairs: tuple[Tensor, Tensor] | None = None,
        snapshot: str | Path | None = None,
        hessian_batches: Sequence[Any] | None = None,
        index: str | None = None,
    ) -> None:
        requested = _requested_method(method, {
            "damping": damping, "damping_ratio": damping_ratio, "rank": rank, "arnoldi_k": arnoldi_k,
            "eigenpairs": eigenpairs, "snapshot": snapshot, "hessian_batches": hessian_batches,
            "index": index,
        })
        _check_options(chunk_size, verify, task)
        #: the streaming scoring engine (scores, self-influence, per-slice weights and damping, with
        #: the caches of what it reads from the store); it reads this Attributor's runs and settings.
        self._engine = ScoringEngine(self)
        self._open_runs(store, model, loss_fn, weights_dir)
        #: the attribution task (loss, query measurement, kernel): given, or recognised from the model
        #: and the first query batch when the query needs it (:func:`~.task.resolve_task`).
        self.task: AttributionTask | None = task
        run_estimators = [ScoringEngine._estimators(r) for r in self.runs]
        if isinstance(requested, dict):  # "auto": the runs' curvature decides
            kinds = {ScoringEngine._curvature_kind(set(e.values())) for e in run_estimators}
            requested = method_from_name("fisher_if" if kinds == {"fisher"} else "trak", **requested)
        self._use_method(requested)
        self.chunk_size = chunk_size
        self.current_weights = bool(current_weights)
        self.checkpoints = self._engine._select(checkpoints)
        # one hook capture per run, reused by every query: its check against autograd
        # (gradients._capture_check) runs once, on the first eval-mode batch it serves
        self._captures = [hook_capture(m, sk, lay) for m, sk, lay in
                          zip(self.models, self.sketches, self.layouts)]
        if verify:
            verify_runs(self.runs, self.models, self.sketches, self.layouts, self.loss_fn, self.checkpoints,
                        captures=self._captures,
                        current_weights=self.current_weights)
        #: the per-slice kernel K_c of ``trak``/``fisher_if``, gathered during fit: ``"margin"``
        #: (TRAK's kernel of margin gradients), ``"gauss-newton"`` (of the model's output: regressions,
        #: language models), ``"fisher"`` (sampled-label Fisher), ``"empirical"`` (the empirical
        #: Fisher, for models whose task was not recognised), or ``"gradients"`` (GᵀG of the stored
        #: loss gradients, when the runs hold no common kernel); ``None`` for the other methods.
        self.kernel: str | None = self._kernel_name(run_estimators)
        self._set_query_function(query_loss_fn)
        self._ids = torch.from_numpy(union_ids(self.runs, [self.checkpoints] * len(self.runs)))
        self._eig: tuple[Tensor, Tensor] | None = None
        if isinstance(requested, ArnoldiIF):
            self._eig = self._engine._eigenpairs(requested.eigenpairs, requested.snapshot,
                                                 requested.hessian_batches, requested.k)

    # ------------------------------------------------------------------ set-up steps of __init__
    def _open_runs(self, store: Any, model: nn.Module | Sequence[nn.Module], loss_fn: LossFn | None,
                   weights_dir: str | Path | None) -> None:
        """Open every run and read each with its own sketch and layout (``runs``, ``models``, ...)."""
        stores = list(store) if isinstance(store, (list, tuple)) else [store]
        if not stores:
            raise SketchConfigError("`store` is an empty list; pass at least one run directory.")
        models: list[nn.Module] = [model] if isinstance(model, nn.Module) else list(model)
        if len(models) not in (1, len(stores)):
            raise SketchConfigError(
                f"Pass one model or one per run: got {len(models)} models for {len(stores)} runs."
            )
        self.runs: list[Run] = [open_run(s) for s in stores]
        if weights_dir is not None:
            if len(self.runs) > 1:
                raise SketchConfigError(
                    "`weights_dir` applies to a single run; ensembles use each run's weights/."
                )
            self.runs[0].weights_dir = Path(weights_dir)
            self.runs[0].explicit_weights = True
        self.models = models if len(models) == len(stores) else models * len(stores)
        self.model = models[0]
        self.loss_fn = module_loss_fn(self.model, loss_fn, who="Attributor ")
        self.store = self.runs[0].store
        # Each run is read with its own sketch and layout (runs trained with different seeds may
        # have been sketched with different seeds too): a score only pairs a run's rows with queries
        # sketched by that run's Φ, and the ensemble averages the scores.
        pairs = [_sketch_and_layout(run.store, m) for run, m in zip(self.runs, self.models)]
        self.sketches = [p[0] for p in pairs]
        self.layouts = [p[1] for p in pairs]
        self.sketch, self.layout = pairs[0]
        for run in self.runs:
            if not run.names:
                raise StoreNotFoundError(
                    "A store holds no checkpoint slice; run the GradientSketch callback first."
                )

    def _use_method(self, spec: AttributionMethod) -> None:
        """Set the method's name and its arguments as the attributes the scoring engine reads."""
        if isinstance(spec, ArnoldiIF) and len(self.runs) > 1:
            raise SketchConfigError(
                "method='arnoldi_if' takes one run (its eigenpairs belong to one sketch); "
                "use fisher_if or trak for ensembles."
            )
        #: the method object in use (``"auto"`` and string shorthands resolved); :meth:`tune_damping`
        #: changes :attr:`damping_ratio`, not this record of the arguments given.
        self.method_spec: AttributionMethod = spec
        #: the method's name, one of :data:`METHODS`.
        self.method: str = spec.name
        damped = spec if isinstance(spec, (Trak, FisherIF)) else None
        self.damping = None if damped is None or damped.damping is None else float(damped.damping)
        ratio = None if damped is None else damped.damping_ratio
        self.damping_ratio = DEFAULT_DAMPING_RATIO if ratio is None else float(ratio)
        self.rank = None if damped is None else damped.rank
        self.index_kind = spec.index if isinstance(spec, GradDot) else "flat"

    def _kernel_name(self, run_estimators: list[dict[str, str | None]]) -> str | None:
        """The kernel K_c that ``trak``/``fisher_if`` invert on the slices in use (``None`` otherwise).

        Raises:
            StoreNotFoundError: for ``fisher_if`` on a run that holds no sampled-label Fisher.
        """
        run_kinds = [ScoringEngine._curvature_kind({e[n] for n in self.checkpoints}) for e in run_estimators]
        kinds = set(run_kinds)
        if self.method == "fisher_if":
            if not kinds <= {"fisher", "empirical"}:
                missing = [str(r.root) for r, k in zip(self.runs, run_kinds)
                           if k not in ("fisher", "empirical")]
                raise StoreNotFoundError(
                    "method='fisher_if' needs the sampled-label Fisher that "
                    f"GradientSketch(curvature='fisher') writes; {missing} hold none (or TRAK's margin "
                    "kernel). Use method='trak', or re-run with curvature='fisher'."
                )
            return "fisher" if kinds == {"fisher"} else "empirical"
        if self.method == "trak":
            one = next(iter(kinds)) if len(kinds) == 1 else None
            kernel = one if one is not None else "gradients"
            if kernel == "gradients":
                _warn_unrecorded_curvature(self.runs)
            return kernel
        return None

    def _set_query_function(self, query_loss_fn: LossFn | None) -> None:
        """Choose the queries' function: given, the model's margin (``trak``/``fisher_if``), or the loss."""
        #: which query function the scores measure: ``"given"`` (``query_loss_fn``), ``"margin"`` (the
        #: model's ``per_example_margin``, or the recognised task's margin) or ``"loss"`` (``loss_fn``).
        self.query_function: str = "given" if query_loss_fn is not None else "loss"
        if query_loss_fn is None and self.method in _CURVED:
            if callable(getattr(self.model, "per_example_margin", None)):
                query_loss_fn = negative_margin_of(self.model)
                self.query_function = "margin"
        #: the queries' per-example function (minus the measurement); ``None`` until the first query
        #: when it comes from the recognised task (a margin kernel recorded from the model's logits).
        self.query_loss_fn: LossFn | None = query_loss_fn
        if query_loss_fn is None and not (self.method in _CURVED and self.kernel == "margin"):
            self.query_loss_fn = self.loss_fn
        elif query_loss_fn is None:
            self.query_function = "margin"

    @property
    def ids(self) -> Tensor:
        """``[T]`` example ids (sorted ascending) in the order of the score columns."""
        return self._ids

    # ------------------------------------------------------------------ query gradients
    def query_sketches(self, batch: Any, run: int = 0) -> list[Tensor]:
        """The query's sketched gradients at each slice in use of run ``run``: ``C × [Q, D]`` (float64).

        Raises:
            SketchInputError: if a query gradient is NaN or infinite (e.g. NaN inputs), or if the
                query's loss fails on ``batch`` (missing keys, wrong dtypes or shapes for the model),
                or if a classification's targets are floats with non-integer values.
        """
        model, rn, sketch, layout = self.models[run], self.runs[run], self.sketches[run], self.layouts[run]
        out = []
        for name in self.checkpoints:
            saved = None if self.current_weights else load_weights(rn, name, layout)
            if (
                saved is None
                and not self.current_weights
                and (len(self.checkpoints) > 1 or len(self.runs) > 1)
            ):
                raise StoreNotFoundError(
                    f"No saved weights for checkpoint {name!r} of run {rn.root}; multi-checkpoint "
                    "methods and "
                    "ensembles need GradientSketch(save_weights=True), `weights_dir`, or "
                    "`current_weights=True`."
                )
            with swapped_weights(model, saved), eval_mode(model):
                query_loss = self._query_loss(batch)
                if self.task is not None:
                    check_query_targets(self.task, batch)
                # mode="auto": factorised for per_layer, module hooks otherwise,
                # vmap only where hooks cannot see
                q = sketch_gradients(
                    model,
                    _checked_query_loss(query_loss, batch),
                    batch,
                    sketch,
                    mode="auto",
                    layout=layout,
                    chunk_size=self.chunk_size,
                    capture=self._captures[run],
                )
            q = q.detach().to(torch.float64)
            if not bool(torch.isfinite(q).all()):
                bad = (~torch.isfinite(q).all(dim=1)).nonzero().flatten()[:5].tolist()
                raise SketchInputError(
                    f"The gradients of queries {bad} are NaN or infinite at checkpoint {name!r}; check "
                    "the query "
                    f"inputs (NaN/inf values) and labels."
                )
            out.append(q)
        return out

    def view(self, method: MethodArg) -> Attributor:
        """The same runs, models and slices scored by another ``method``: a second view of the queries.

        The view scores what an ``Attributor(method=method)`` of these runs would (its own query
        function: the margin for ``trak``/``fisher_if`` where the model has one, else the loss), on
        this Attributor's slices, without verifying the models again. A method name keeps this
        Attributor's arguments where the view's method takes them (the damping and rank between
        ``trak`` and ``fisher_if``, the index of ``grad_dot``); a method object is used as given.
        Where both measure the same
        function (:meth:`shares_queries`), pass this Attributor's :meth:`all_query_sketches` as the
        view's ``sketches=``; otherwise the view needs its own (once). The margin and the loss
        differ in more than scale over several slices: ∇ℓ = −(1 − p_c)∇m at slice c, and 1 − p_c
        shrinks as training fits the query (benchmarks/RESULTS.md, "What a proponent means").
        A view of ``arnoldi_if`` needs eigenpairs: this Attributor's, or an :class:`ArnoldiIF` object
        with a source of its own; a view of a ``grad_cos`` default with ``trak`` uses all the
        default's slices.

        Raises:
            SketchConfigError: for an unknown method, or ``"arnoldi_if"`` without eigenpairs.
        """
        spec = self._view_spec(method)
        multi = len(self.runs) > 1
        other = Attributor(
            [r.store for r in self.runs] if multi else self.runs[0].store,
            self.models if multi else self.model,
            loss_fn=self.loss_fn, method=spec,
            query_loss_fn=self.query_loss_fn if self.query_function == "given" else None,
            checkpoints=self.checkpoints, chunk_size=self.chunk_size, current_weights=self.current_weights,
            task=self.task, verify=False,
        )
        for mine, theirs in zip(self.runs, other.runs):
            theirs.weights_dir, theirs.explicit_weights = mine.weights_dir, mine.explicit_weights
        if other.shares_queries(self) and self.query_loss_fn is not None:
            other.query_loss_fn = self.query_loss_fn
        other._engine.share_run_facts(self._engine)  # the same rows and weights: read once
        return other

    def _view_spec(self, method: MethodArg) -> MethodArg:
        """The method object of a :meth:`view`: an object as given; a name with this one's arguments."""
        if isinstance(method, ArnoldiIF):
            sources = (method.eigenpairs, method.snapshot, method.hessian_batches)
            if all(x is None for x in sources) and self._eig is not None:
                return ArnoldiIF(k=method.k, eigenpairs=self._eig)
            return method
        if isinstance(method, _METHOD_TYPES):
            return method
        if method == "arnoldi_if":
            if self._eig is None:
                raise SketchConfigError(
                    "A view cannot use method='arnoldi_if' (it needs the Hessian's eigenpairs); build an "
                    "Attributor(method=ArnoldiIF(snapshot=...)) or ArnoldiIF(hessian_batches=...), or "
                    "pass such an object to view()."
                )
            return ArnoldiIF(eigenpairs=self._eig)
        if method in _CURVED and self.method in _CURVED:
            ratio = None if self.damping is not None else self.damping_ratio
            return method_from_name(method, damping=self.damping, damping_ratio=ratio, rank=self.rank)
        if method == "grad_dot":
            return GradDot(index=self.index_kind)
        return method  # a name with its defaults ("auto" included); the Attributor checks it

    def shares_queries(self, other: Attributor) -> bool:
        """Whether ``other``'s :meth:`all_query_sketches` are this Attributor's: the same runs, slices
        and query function (:attr:`query_function`; a ``"given"`` one must be the same object)."""
        pairs = zip(self.runs, other.runs)
        same_runs = len(self.runs) == len(other.runs) and all(
            a.store is b.store or (a.root is not None and a.root == b.root) for a, b in pairs)
        same_models = all(a is b for a, b in zip(self.models, other.models))
        return (same_runs and same_models and self.checkpoints == other.checkpoints
                and self.current_weights == other.current_weights
                and self.query_function == other.query_function
                and (self.query_function != "given" or self.query_loss_fn is other.query_loss_fn))

    def _query_loss(self, batch: Any) -> LossFn:
        """The queries' function: explicit, else the margin of the recognised task (margin kernels)."""
        if self.query_loss_fn is not None:
            return self.query_loss_fn
        task = self.task if self.task is not None else resolve_task(self.model, batch, self.loss_fn)
        if not task.kernel.startswith("margin"):
            raise SketchConfigError(
                f"The runs hold TRAK's margin kernel, but the queries' task is not a classification "
                f"({task.describe()}). Pass query batches with integer labels, `query_loss_fn`, or "
                f"`task=`."
            )
        self.task = task
        self.query_loss_fn = task.query_loss
        return task.query_loss

    def scores(self, batch: Any, sketches: list[list[Tensor]] | None = None) -> Tensor:
        """Dense ``[Q, T]`` scores of every query against every stored example (float64).

        Columns follow :attr:`ids`. Positive = training on the example lowers the query's loss.
        ``sketches`` (:meth:`all_query_sketches`) stand for ``batch`` (then pass ``batch=None``).
        """
        qs = self._engine._sketches_of(batch, sketches)
        Q = qs[0][0].shape[0]
        out = torch.zeros(Q, len(self._ids), dtype=torch.float64)
        for sl in self._engine._chunks(Q):
            self._engine._accumulate([[q[sl] for q in run_q] for run_q in qs], out[sl])
        return out

    def top_k(
        self, batch: Any, k: int = 10, opponents: bool = False, sketches: list[list[Tensor]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` strongest proponents (or opponents: most negative scores) of each query.

        Exact: scores are streamed over the stored rows in blocks and reduced to the top ``k``
        per query chunk. A single-run ``grad_dot`` query goes through the store's FAISS index
        instead (``index=``), whose approximate hits the store re-ranks exactly. ``sketches``
        (:meth:`all_query_sketches`, ``R × C × [Q, D]``) stand for ``batch`` (then pass ``batch=None``):
        the proponents, the opponents, :meth:`damping_info` and a :meth:`view` then share one
        computation of the query gradients.

        Returns:
            ``(ids [Q, k] int64, scores [Q, k] float64)``, strongest first; opponent scores keep
            their true (negative) sign.

        Raises:
            SketchConfigError: if ``k`` is not in ``[1, T]``, or ``sketches`` do not fit the runs.
        """
        k = self._checked_k(k)
        return self._ranked(self._engine._sketches_of(batch, sketches), k, (opponents,))[0]

    def proponents_opponents(
        self, batch: Any, k: int = 10, sketches: list[list[Tensor]] | None = None
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The ``k`` proponents and the ``k`` opponents of each query from one pass over the stored rows.

        Equal to ``(top_k(batch, k), top_k(batch, k, opponents=True))``: each query chunk's scores
        are accumulated once from the streamed rows and both ends are taken from them. A
        single-run ``grad_dot`` through an approximate FAISS index searches that index twice (its
        search is the pass). ``sketches`` stand for ``batch`` as in :meth:`top_k`.

        Returns:
            ``((ids [Q, k] int64, scores [Q, k] float64), (ids, scores))``: proponents, then
            opponents, each strongest first; opponent scores keep their true (negative) sign.

        Raises:
            SketchConfigError: if ``k`` is not in ``[1, T]``, or ``sketches`` do not fit the runs.
        """
        k = self._checked_k(k)
        pro, opp = self._ranked(self._engine._sketches_of(batch, sketches), k, (False, True))
        return pro, opp

    def _checked_k(self, k: Any) -> int:
        T = len(self._ids)
        return int(integer("k", k, minimum=1, maximum=T, hint=f"The run stores {T} examples."))

    def _ranked(self, qs: list[list[Tensor]], k: int, ends: tuple[bool, ...]) -> list[tuple[Tensor, Tensor]]:
        """``(ids [Q, k], scores [Q, k])`` per entry of ``ends`` (``True``: opponents), from one pass."""
        if self.method == "grad_dot" and len(self.runs) == 1 and hasattr(self.store, "search"):
            found = []
            for opponents in ends:
                sign = -1.0 if opponents else 1.0
                s, i = self.store.search(
                    (sign * qs[0][-1]).to(torch.float32).numpy(),
                    k,
                    checkpoint=self.checkpoints[-1],
                    index=self.index_kind,
                )
                s, i = torch.as_tensor(np.asarray(s), dtype=torch.float64), torch.as_tensor(np.asarray(i))
                found.append((i.to(torch.long), sign * s))
            return found
        Q, T = qs[0][0].shape[0], len(self._ids)
        parts: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in ends]
        for sl in self._engine._chunks(Q):
            part = torch.zeros(sl.stop - sl.start, T, dtype=torch.float64)
            self._engine._accumulate([[q[sl] for q in run_q] for run_q in qs], part)
            for (ids_out, s_out), opponents in zip(parts, ends):
                sign = -1.0 if opponents else 1.0
                top, pos = (sign * part).topk(k, dim=1)
                ids_out.append(self._ids[pos])
                s_out.append(sign * top)
        return [(torch.cat(ids_out), torch.cat(s_out)) for ids_out, s_out in parts]

    # ------------------------------------------------------------------ the engine's answers
    def all_query_sketches(self, batch: Any) -> list[list[Tensor]]:
        """The query's sketched gradients of every run: ``R × C × [Q, D]`` (float64), R runs, C slices.

        Compute them once and pass them as ``sketches=`` to :meth:`top_k`, :meth:`scores` and
        :meth:`damping_info` (and to a :meth:`view` of the same runs) instead of the batch, so that the
        query gradients are not taken again for every answer.
        """
        return self._engine.all_query_sketches(batch)

    def self_influence(self) -> tuple[Tensor, Tensor]:
        """Self-influence score(x, x) of every stored example, for mislabel detection.

        Large values flag examples whose own gradient is large and unexplained by the others
        (e.g. flipped labels). ``grad_cos`` is constant by construction, so it uses ``tracin``.

        Returns:
            ``(ids [T], scores [T] float64)``, in :attr:`ids` order, averaged over the runs.
        """
        return self._engine.self_influence()

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
        return self._engine.training_time(r)

    def damping_unit(self, r: int, name: str) -> float:
        """The unit of ``damping_ratio`` at slice ``name`` of run ``r``:
        u_c = max(tr(K_c)/T_c, T_c/(ρ₀ τ)) / r_c (:mod:`~lightning_sketch.attribution.damping`): the mean
        per-example kernel, floored by the damping that a training time τ (:meth:`training_time`)
        leaves (T_c/τ at the default ratio ρ₀), divided on a margin kernel by the slice's RMS residual
        r_c (:func:`~lightning_sketch.attribution.damping.residual_scale`)."""
        return self._engine.damping_unit(r, name)

    def slice_damping(self, r: int, name: str) -> float:
        """The λ of slice ``name`` of run ``r`` (``trak``/``fisher_if``): the explicit ``damping``, else
        ``damping_ratio`` × :meth:`damping_unit`; 1 for an all-zero kernel."""
        return self._engine.slice_damping(r, name)

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
        return self._engine.damping_info(batch=batch, k=k, sketches=sketches)

    def tune_damping(
        self,
        val_batches: Iterable[Any] | None = None,
        candidates: Sequence[float] | None = None,
        objective: Callable[[Tensor], float] | None = None,
    ) -> float:
        """Choose the ratio ρ (λ_c = ρ · :meth:`damping_unit`) that maximises ``objective``; returns it.

        For users who have a ground truth: ``objective(scores [Q, T]) -> float`` (higher is better)
        is evaluated on the scores of ``val_batches`` for every candidate ratio (default
        :data:`~lightning_sketch.attribution.damping.DAMPING_RATIO_GRID`), e.g. the LDS of validation
        queries against retrained models (:func:`lightning_sketch.evaluation.lds`). Without a ground
        truth, keep the automatic ratio
        (:data:`~lightning_sketch.attribution.damping.DEFAULT_DAMPING_RATIO`; nothing to call). Sets
        :attr:`damping_ratio` and clears an absolute :attr:`damping`.

        Raises:
            SketchConfigError: if the method has no damping, or ``objective``/``val_batches`` is missing.
        """
        return self._engine.tune_damping(val_batches=val_batches, candidates=candidates, objective=objective)


def _warn_unrecorded_curvature(runs: list[Run]) -> None:
    """Warn when a run directory holds curvature files that its store manifest does not record."""
    stray = [str(r.root) for r in runs
             if r.root is not None and not CV.curvature_slices(r.root, store=r.store)
             and any((Path(r.root) / CV.CURVATURE_DIR).glob("*.npy"))]
    if stray:
        warnings.warn(
            f"{stray} hold curvature files that their store manifests do not record (a killed write, or "
            "a run written by an earlier version of lightning_sketch); they are ignored and trak inverts "
            "GᵀG of the stored loss gradients (kernel='gradients'). Re-run the fit to gather the kernel.",
            stacklevel=3,
        )


def _describe_batch(batch: Any) -> str:
    """A short account of a batch's structure: keys or positions with tensor shapes and dtypes."""

    def leaf(v: Any) -> str:
        if isinstance(v, Tensor):
            return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__

    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {leaf(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} [" + ", ".join(leaf(v) for v in batch) + "]"
    return leaf(batch)


def _checked_query_loss(loss_fn: LossFn, batch: Any) -> LossFn:
    """``loss_fn`` whose failures on the query ``batch`` are raised as :class:`SketchInputError`.

    The user's model and loss see the query batch here, so a ``KeyError``, ``IndexError``,
    ``TypeError`` or ``RuntimeError`` raised inside them means the batch does not look like a
    training batch (a missing key, float labels, a wrong feature width). The library's own typed
    errors, out-of-memory and ``NotImplementedError`` pass through unchanged.
    """

    def checked(module: nn.Module, b: Any) -> Tensor:
        try:
            return loss_fn(module, b)
        except (LightningSketchError, torch.OutOfMemoryError, NotImplementedError):
            raise
        except (KeyError, IndexError, TypeError, RuntimeError) as err:
            first = (str(err).splitlines() or [""])[0][:300]
            raise SketchInputError(
                f"The query's loss failed on the query batch {_describe_batch(batch)} "
                f"({type(err).__name__}: {first}). A query batch must look like a training batch: the "
                "same keys, the same input feature shapes and dtypes, and integer class labels where the "
                "loss expects them."
            ) from err

    return checked
