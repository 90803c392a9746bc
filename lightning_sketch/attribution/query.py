"""The :class:`Attributor`: training data attribution queries against a :class:`SketchStore`.

A thin object over :mod:`lightning_sketch.attribution.scores`: it reads the stored sketched
training gradients, sketches the query's loss gradients with the store's sketch at each stored
checkpoint's weights, turns both into feature vectors whose inner product is the method's score,
and searches them with FAISS (exact re-ranking of approximate hits is done by the store).

Sign convention: a **positive** score means that training on the example lowers the query's loss
(for ``trak``, raises its margin); opponents are the most negative scores.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sketch.attribution import scores as S
from lightning_sketch.attribution._stored import (
    StoredRows,
    _checkpoints,
    _eval_mode,
    _method_loss,
    _sketch_and_layout,
    load_rows,
    negative_margin,
    negative_margin_of,
    open_run,
)
from lightning_sketch.exceptions import (
    LayoutMismatchError,
    SketchConfigError,
    SpectrumError,
    StoreNotFoundError,
)

__all__ = ["METHODS", "Attributor", "negative_margin", "negative_margin_of"]

log = logging.getLogger(__name__)

METHODS = ("grad_dot", "tracin", "grad_cos", "trak", "arnoldi_if")
Method = Literal["grad_dot", "tracin", "grad_cos", "trak", "arnoldi_if"]
LossFn = Callable[[nn.Module, Any], Tensor]

#: Damping candidates for TRAK, as multiples of the mean eigenvalue tr(GᵀG)/D of the kernel.
DAMPING_GRID = tuple(10.0**e for e in np.arange(-5.0, 2.01, 0.5))


class Attributor:
    """Attribute queries to training examples through stored sketched gradients.

    Methods (``method``): ``grad_dot`` (⟨Φg(z), Φg(x)⟩ at the last checkpoint), ``tracin``
    (Σ_t η_t ⟨Φg_t(z), Φg_t(x)⟩ over all checkpoints, Pruthi et al. 2020), ``grad_cos`` (``tracin``
    with unit-normalised features), ``trak`` ((GᵀG + λI)⁻¹ per checkpoint applied to the query,
    averaged over checkpoints; Park et al. 2023), ``arnoldi_if`` (Σ_i λ_i⁻¹⟨u_i, Φg(z)⟩⟨u_i, Φg(x)⟩
    over the top eigenpairs of the sketched Hessian at the last checkpoint; Schioppa et al. 2022).

    Query gradients are taken at each checkpoint's weights, read from the run's ``weights/``
    folder written by :class:`~lightning_sketch.callbacks.GradientSketch` (``save_weights=True``).
    With a single checkpoint in use and no saved weights, the model's current weights are used.

    Args:
        store: a :class:`~lightning_sketch.store.SketchStore`, a store directory, or a run directory
            (the callback's ``dirpath``, holding ``store/`` and ``weights/``).
        model: the model whose gradients were stored; its layout must match the store's.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` per-example training losses; default
            ``model.per_example_loss(batch)``.
        method: one of :data:`METHODS`.
        damping: TRAK's λ (absolute); ``None`` chooses it automatically (:meth:`tune_damping`).
        query_loss_fn: the per-example "loss" of the queries; default ``loss_fn``. For ``trak`` on
            classification pass the negative margin (:func:`negative_margin`), or give the model a
            ``per_example_margin(batch)`` method, which is then used automatically.
        checkpoints: names of the checkpoint slices to use (default: per method, see above).
        eigenpairs: ``(eigenvalues [k], eigenvectors [D, k])`` of Φ H Φᵀ for ``arnoldi_if``.
        snapshot: a spectrum snapshot file to read the eigenpairs from (``arnoldi_if``).
        hessian_batches: probe batches to compute the eigenpairs on demand (``arnoldi_if``).
        arnoldi_k: eigenpairs computed on demand.
        weights_dir: folder of ``<checkpoint>.pt`` parameter files (default: the run's ``weights/``).
        chunk_size: examples per ``vmap`` call for the query gradients.
        index: FAISS index kind of the store used by ``grad_dot`` searches (``"flat"`` exact;
            ``"ivf"``, ``"ivfpq"``, ``"hnsw"`` approximate with exact re-ranking).
        current_weights: take every checkpoint's query gradients at the model's current weights
            (an approximation for multi-checkpoint methods when no weights were saved).

    Raises:
        SketchConfigError: for an unknown method or a bad argument.
        LayoutMismatchError: if ``model``'s parameter layout differs from the store's.

    Example:
        >>> # see tests/attribution/test_attributor.py and examples/attribution_digits.py
    """

    def __init__(
        self,
        store: Any,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        method: Method = "grad_dot",
        damping: float | None = None,
        query_loss_fn: LossFn | None = None,
        checkpoints: Sequence[str] | None = None,
        eigenpairs: tuple[Tensor, Tensor] | None = None,
        snapshot: str | Path | None = None,
        hessian_batches: Sequence[Any] | None = None,
        arnoldi_k: int = 20,
        weights_dir: str | Path | None = None,
        chunk_size: int | None = None,
        index: str = "flat",
        current_weights: bool = False,
    ) -> None:
        if method not in METHODS:
            raise SketchConfigError(f"`method` must be one of {METHODS}, got {method!r}.")
        if damping is not None and (not math.isfinite(float(damping)) or damping <= 0):
            raise SketchConfigError(f"`damping` must be > 0 or None (automatic), got {damping!r}.")
        self.store, run_weights = open_run(store)
        self.model = model
        self.method = method
        self.damping = None if damping is None else float(damping)
        self.chunk_size = chunk_size
        self.index_kind = index
        self.current_weights = bool(current_weights)
        self.loss_fn = loss_fn if loss_fn is not None else _method_loss(model, "per_example_loss")
        if query_loss_fn is None and method == "trak" and hasattr(model, "per_example_margin"):
            query_loss_fn = negative_margin_of(model)
        self.query_loss_fn = query_loss_fn if query_loss_fn is not None else self.loss_fn
        self.weights_dir = Path(weights_dir) if weights_dir is not None else run_weights
        self._explicit_weights = weights_dir is not None
        self.sketch, self.layout = _sketch_and_layout(self.store, model)
        all_ckpts = [c["name"] for c in _checkpoints(self.store)]
        if not all_ckpts:
            raise StoreNotFoundError("The store holds no checkpoint slice; run the GradientSketch callback first.")
        if checkpoints is None:
            checkpoints = all_ckpts if method in ("tracin", "grad_cos", "trak") else all_ckpts[-1:]
        unknown = [c for c in checkpoints if c not in all_ckpts]
        if unknown or not checkpoints:
            raise SketchConfigError(f"`checkpoints` {list(checkpoints)} not all in the store's {all_ckpts}.")
        self.checkpoints = list(checkpoints)
        self._lrs = {c["name"]: float(c.get("lr", 1.0)) for c in _checkpoints(self.store)}
        self.rows: StoredRows = load_rows(self.store, self.checkpoints)
        self._eig: tuple[Tensor, Tensor] | None = None
        if method == "arnoldi_if":
            self._eig = self._eigenpairs(eigenpairs, snapshot, hessian_batches, arnoldi_k)
        self._precond: dict[str, Tensor] = {}
        self._train_features: Tensor | None = None
        self._index: Any = None

    # ------------------------------------------------------------------ features
    def query_sketches(self, batch: Any) -> list[Tensor]:
        """The query's sketched loss gradients at each checkpoint in use: ``C × [Q, D]`` (float64)."""
        out = []
        for name in self.checkpoints:
            with self._weights(name), _eval_mode(self.model):
                from lightning_sketch.gradients import sketch_gradients

                mode = "factorized" if self.sketch.kind == "per_layer" else "explicit"
                q = sketch_gradients(
                    self.model, self.query_loss_fn, batch, self.sketch, mode=mode, layout=self.layout,
                    chunk_size=self.chunk_size,
                )
            out.append(q.detach().to(torch.float64))
        return out

    def query_features(self, batch: Any) -> Tensor:
        """``[Q, F]`` query features; ``query_features(b) @ train_features().T`` are the scores."""
        qs = self.query_sketches(batch)
        return self._features(qs, train=False)

    def train_features(self) -> Tensor:
        """``[T, F]`` features of the stored training rows (ids in :attr:`ids`)."""
        if self._train_features is None:
            self._train_features = self._features(self.rows.slices, train=True)
        return self._train_features

    @property
    def ids(self) -> Tensor:
        """``[T]`` example ids of the training rows, in the order of the score columns."""
        return self.rows.ids

    def _features(self, slices: Sequence[Tensor], train: bool) -> Tensor:
        lrs = [self._lrs[c] for c in self.checkpoints]
        if self.method == "grad_dot":
            return slices[-1]
        if self.method == "tracin":
            return S.tracin_features(slices, lrs)
        if self.method == "grad_cos":
            return S.normalize_rows(S.tracin_features(slices, lrs))
        if self.method == "trak":
            if train:
                return torch.cat(list(slices), dim=1)
            parts = [q @ self._preconditioner(c) / len(slices) for q, c in zip(slices, self.checkpoints)]
            return torch.cat(parts, dim=1)
        values, vectors = self._eig  # arnoldi_if
        return S.arnoldi_features(slices[-1], values.to(torch.float64), vectors.to(torch.float64))

    # ------------------------------------------------------------------ queries
    def scores(self, batch: Any) -> Tensor:
        """Dense ``[Q, T]`` scores of every query against every stored example (float64).

        Columns follow :attr:`ids`. Positive = training on the example lowers the query's loss.
        """
        return S.dot_scores(self.query_features(batch), self.train_features())

    def top_k(self, batch: Any, k: int = 10, opponents: bool = False) -> tuple[Tensor, Tensor]:
        """The ``k`` strongest proponents (or opponents: most negative scores) of each query.

        Searches a FAISS inner-product index over :meth:`train_features`; for a single
        ``grad_dot`` checkpoint it goes through the store's own index, whose approximate hits the
        store re-ranks exactly.

        Returns:
            ``(ids [Q, k] int64, scores [Q, k] float)``, sorted from strongest to weakest; opponent
            scores are returned with their true (negative) sign.

        Raises:
            SketchConfigError: if ``k`` is not in ``[1, T]``.
        """
        T = len(self.ids)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
            raise SketchConfigError(f"`k` must be an int in [1, {T}] (stored examples), got {k!r}.")
        q = self.query_features(batch)
        sign = -1.0 if opponents else 1.0
        if self.method == "grad_dot" and hasattr(self.store, "search"):
            s, i = self.store.search(
                (sign * q).to(torch.float32).numpy(), k, checkpoint=self.checkpoints[-1], index=self.index_kind
            )
            s, i = torch.as_tensor(np.asarray(s), dtype=torch.float64), torch.as_tensor(np.asarray(i))
        else:
            s, i = self._search(sign * q, k)
        return i.to(torch.long), sign * s

    def _search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        from lightning_sketch.store.index import build_index, search_index

        if self._index is None:
            self._index = build_index("flat", self.train_features().numpy(), self.ids.numpy(), {})
        _, ids = search_index(self._index, q.numpy(), k)
        # Exact float64 scores of the returned ids (FAISS accumulates in float32).
        pos = self._positions(torch.as_tensor(ids))
        feats = self.train_features()[pos.reshape(-1)].reshape(*pos.shape, -1)
        exact = torch.einsum("qkf,qf->qk", feats, q)
        exact, order = exact.sort(dim=1, descending=True, stable=True)
        return exact, torch.as_tensor(ids).gather(1, order)

    def _positions(self, ids: Tensor) -> Tensor:
        lookup = {int(v): j for j, v in enumerate(self.ids.tolist())}
        return torch.tensor([[lookup[int(v)] for v in row] for row in ids.tolist()], dtype=torch.long)

    def self_influence(self) -> tuple[Tensor, Tensor]:
        """Self-influence score(x, x) of every stored example, for mislabel detection.

        Large values flag examples whose own gradient is large and unexplained by the others
        (e.g. flipped labels). ``grad_cos`` is constant by construction, so it uses ``tracin``.

        Returns:
            ``(ids [T], scores [T])``, in :attr:`ids` order.
        """
        slices = self.rows.slices
        lrs = [self._lrs[c] for c in self.checkpoints]
        if self.method == "trak":
            vals = sum((g @ self._preconditioner(c) * g).sum(1) for g, c in zip(slices, self.checkpoints))
            return self.ids, vals / len(slices)
        if self.method == "grad_cos":
            f = S.tracin_features(slices, lrs)
        else:
            f = self.train_features()
        return self.ids, (f * f).sum(1)

    # ------------------------------------------------------------------ TRAK damping
    def _preconditioner(self, name: str) -> Tensor:
        if name not in self._precond:
            g = self.rows.slices[self.checkpoints.index(name)]
            if self.damping is None:
                self.damping = self.tune_damping()
            self._precond[name] = S.trak_preconditioner(g, self.damping)
        return self._precond[name]

    def tune_damping(
        self,
        val_batches: Iterable[Any] | None = None,
        candidates: Sequence[float] | None = None,
        objective: Callable[[Tensor], float] | None = None,
        holdout: float = 0.1,
    ) -> float:
        """Choose TRAK's λ on a held-out split and set :attr:`damping`; returns it.

        Candidates default to ``DAMPING_GRID`` × the mean eigenvalue tr(GᵀG)/D of the last
        checkpoint's kernel. The criterion is, in order of preference:

        1. ``objective(scores [Q, T]) -> float`` (higher is better), given the validation batches,
           e.g. the LDS of the validation queries when a retraining ground truth exists;
        2. otherwise the leave-one-coordinate-out ridge error of :func:`scores.damping_loo_errors`
           with the validation queries' sketches;
        3. with no ``val_batches``, the same error with a held-out ``holdout`` fraction of the
           stored training rows as queries (the kernel built from the remaining rows).

        Measured on digits (benchmarks/RESULTS.md), the LOO proxy (2, 3) picks far too small a λ
        (LDS 0.15–0.18 against 0.54–0.58 with the validation-LDS objective): it is a fallback only;
        pass an ``objective`` on validation queries whenever a ground truth can be had.

        Raises:
            SketchConfigError: if the method is not ``trak`` or the inputs are inconsistent.
        """
        if self.method != "trak":
            raise SketchConfigError(f"tune_damping applies to method='trak', not {self.method!r}.")
        g = self.rows.slices[-1]
        scale = float((g * g).sum()) / g.shape[1]
        cands = [c * scale for c in DAMPING_GRID] if candidates is None else [float(c) for c in candidates]
        if objective is not None:
            if val_batches is None:
                raise SketchConfigError("`objective` needs `val_batches` (the queries it scores).")
            sketches = [self.query_sketches(b) for b in val_batches]  # once: only P changes with λ
            values = []
            for lam in cands:
                self.damping, self._precond = lam, {}
                s = torch.cat([S.dot_scores(self._features(q, train=False), self.train_features()) for q in sketches])
                values.append(float(objective(s)))
            best = cands[int(np.nanargmax(values))]
        else:
            if val_batches is not None:
                queries = torch.cat([self.query_sketches(b)[-1] for b in val_batches])
                kernel_rows = g
            else:
                gen = torch.Generator().manual_seed(0)
                perm = torch.randperm(g.shape[0], generator=gen)
                n_out = max(1, round(holdout * g.shape[0]))
                queries, kernel_rows = g[perm[:n_out]], g[perm[n_out:]]
            errs = S.damping_loo_errors(kernel_rows, queries, cands)
            best = cands[int(torch.argmin(errs))]
        self.damping, self._precond = best, {}
        log.info("TRAK damping chosen: %.3g", best)
        return best

    # ------------------------------------------------------------------ arnoldi_if
    def _eigenpairs(self, eigenpairs: Any, snapshot: Any, batches: Any, k: int) -> tuple[Tensor, Tensor]:
        D = self.sketch.sketch_dim
        if eigenpairs is not None:
            values, vectors = (torch.as_tensor(t) for t in eigenpairs)
        elif snapshot is not None:
            from lightning_sketch import spectrum

            values, vectors, spec = spectrum.top_eigenpairs_from_snapshot(snapshot)
            if spec is not None and dict(spec) != dict(self.sketch.spec):
                raise SpectrumError(
                    f"The spectrum snapshot {snapshot} was sketched with {spec}, the store with "
                    f"{self.sketch.spec}; take the snapshot with the store's sketch spec."
                )
        elif batches is not None:
            from lightning_sketch.spectrum import hessian_eigs

            with self._weights(self.checkpoints[-1]), _eval_mode(self.model):
                res = hessian_eigs(self.model, self.loss_fn, list(batches), k=k, sketch=self.sketch, which="LA")
            values, vectors = torch.as_tensor(res.eigenvalues), torch.as_tensor(res.eigenvectors)
        else:
            raise SpectrumError(
                "method='arnoldi_if' needs `eigenpairs`, a spectrum `snapshot` file, or `hessian_batches` "
                "to compute the top eigenpairs of the sketched Hessian."
            )
        if vectors.ndim == 2 and vectors.shape[0] != D and vectors.shape[1] == D:
            vectors = vectors.T  # accept [k, D] rows as well as [D, k] columns
        if vectors.ndim != 2 or vectors.shape[0] != D:
            raise SpectrumError(
                f"Eigenvectors must be D={D}-dimensional (sketched with the store's sketch), got shape "
                f"{tuple(vectors.shape)}; compute the spectrum with the same sketch spec."
            )
        return values, vectors

    # ------------------------------------------------------------------ weights
    def _saved_weights(self, name: str) -> dict[str, Tensor] | None:
        """The parameters saved for checkpoint ``name``, verified against the store (None: none saved)."""
        from lightning_sketch._safeio import load_torch_file
        from lightning_sketch.exceptions import StoreCorruptError

        path = None if self.weights_dir is None else self.weights_dir / f"{name}.pt"
        if self._explicit_weights:  # a folder the user named: loaded safely, checked against the layout below
            return load_torch_file(path, what="weights file") if path is not None and path.exists() else None
        if hasattr(self.store, "has_weights") and self.store.has_weights(name):
            return self.store.load_weights(name, self.layout.fingerprint())  # checksum, layout, no pickle
        if path is not None and os.path.lexists(path):
            raise StoreCorruptError(
                f"Weights file {path} is not recorded in the store's manifest, so it was not written by this run "
                f"(or the manifest lost its record); it is refused. Re-run with save_weights=True, or pass "
                f"`weights_dir` explicitly if you trust the file."
            )
        return None

    @contextmanager
    def _weights(self, name: str):
        saved = None if self.current_weights else self._saved_weights(name)
        if saved is None:
            if len(self.checkpoints) > 1 and not self.current_weights:
                raise StoreNotFoundError(
                    f"No saved weights for checkpoint {name!r}; multi-checkpoint methods need "
                    f"GradientSketch(save_weights=True), `weights_dir`, or `current_weights=True`."
                )
            yield
            return
        current = self.layout.params(self.model)
        if set(saved) != set(current) or any(saved[n].shape != t.shape for n, t in current.items()):
            raise LayoutMismatchError(
                f"Saved weights of checkpoint {name!r} hold parameters {sorted(saved)[:5]}... (names or shapes) that "
                f"differ from the model's layout; use the architecture the run was trained with."
            )
        backup = {n: t.detach().clone() for n, t in current.items()}
        params = dict(self.model.named_parameters())
        try:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
            yield
        finally:
            with torch.no_grad():
                for n, t in backup.items():
                    params[n].copy_(t)
