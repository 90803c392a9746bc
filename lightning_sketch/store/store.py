"""The crash-safe sketch store: append sketched gradients per checkpoint, commit, reopen, search.

A store is a directory (see :mod:`lightning_sketch.store.manifest`) of immutable segment files
plus ``manifest.json``. :meth:`SketchStore.append` buffers rows in memory; :meth:`SketchStore.commit`
writes the buffered rows as new segment files (tmp + fsync + rename) and then atomically replaces
the manifest. Readers open one manifest snapshot and only ever see committed segments; a crash
loses at most the uncommitted buffer. One writer per directory (an ``fcntl`` lock); DDP ranks
write their own shard (:meth:`SketchStore.open_shard`) that rank 0 merges (:meth:`merge_shards`).

``SketchStore`` is the public interface: it opens, creates and closes, and hands every other call
to one of the components it owns, each built in ``__init__`` with the components it uses:

- :class:`~lightning_sketch.store.snapshot.Snapshot`: the committed manifest and its facts, the
  writer lock, file checks, publishing, rollback, reload and prune;
- :class:`~lightning_sketch.store.views.Views` (snapshot): views of the rows, FAISS indexes and
  search, with their cache;
- :class:`~lightning_sketch.store.writer.Writer` (snapshot, views): checkpoints, rows and file records
  not committed yet, commit, resume points;
- :class:`~lightning_sketch.store.weights.WeightFiles` (snapshot, writer): model weights beside the store;
- :class:`~lightning_sketch.store.curvature.CurvatureFiles` (snapshot, writer): the slices' curvature files;
- :class:`~lightning_sketch.store.shards.ShardMerge` (snapshot, writer, views): merging the DDP shards.

Only the snapshot writes a manifest; whoever replaces it (commit, rollback, refresh, merge, a
persisted index) clears the views' cache.

Rows are sketched per-example gradients Φ∇ℓ(z; θ_t) ∈ R^D (arXiv 2402.03994 Sec. 5.2); checkpoint ``lr`` is
η_t, used by the TracIn view Σ_t η_t ⟨Φg_t(z), Φg_t(z')⟩ (see :mod:`lightning_sketch.store.views`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sketch._checks import one_of, positive_int
from lightning_sketch.exceptions import StoreWriteError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._validate import layout_info, spec_dict
from lightning_sketch.store.curvature import CurvatureFiles
from lightning_sketch.store.rows import RowSource
from lightning_sketch.store.shards import ShardMerge, shard_options
from lightning_sketch.store.snapshot import Snapshot
from lightning_sketch.store.views import Views, Weights
from lightning_sketch.store.weights import WeightFiles
from lightning_sketch.store.writer import Writer

__all__ = ["SketchStore"]

log = logging.getLogger(__name__)


class SketchStore:
    """A directory of committed sketch rows, one slice per training checkpoint.

    Build one with :meth:`create` or :meth:`open`, never directly (``__init__`` takes the opened
    :class:`~lightning_sketch.store.snapshot.Snapshot` and builds the other components on it).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> store = SketchStore.create(d + "/s", {"kind": "dense", "dim": 8, "sketch_dim": 4, "seed": 0})
        >>> store.add_checkpoint("step-10", step=10, lr=0.1)
        >>> store.append([0, 1], np.eye(2, 4, dtype=np.float32), checkpoint="step-10")
        2
        >>> store.commit()
        1
        >>> scores, ids = SketchStore.open(d + "/s").search(np.ones((1, 4), dtype=np.float32), k=2)
        >>> sorted(ids[0].tolist()), scores[0].tolist()
        ([0, 1], [1.0, 1.0])
        >>> store.close()
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._views = Views(snapshot)
        self._writer = Writer(snapshot, self._views)
        self._weights = WeightFiles(snapshot, self._writer)
        self._curvature = CurvatureFiles(snapshot, self._writer)
        self._shards = ShardMerge(snapshot, self._writer, self._views)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | Path,
        spec: Any,
        layout: Any = None,
        layout_fingerprint: Any = None,
        dtype: Literal["float32", "float16"] = "float32",
        exist_ok: bool = False,
        nan_policy: Literal["raise", "skip"] = "raise",
        sketch_dim: int | None = None,
    ) -> SketchStore:
        """Create an empty store at ``path`` and open it for appending.

        Args:
            path: directory to create (parents too).
            spec: the sketch (or its ``.spec`` dict) the rows are made with; ``None`` needs ``sketch_dim``.
            layout: the model's ``ParamLayout`` (or its ``to_dict()``), recorded for later checks.
            layout_fingerprint: the layout's fingerprint, if ``layout`` is not given.
            dtype: storage dtype of the rows ("float16" halves disk; search still runs in float32).
            exist_ok: reopen an existing store (spec and layout must match) instead of failing.
            nan_policy: default handling of non-finite rows: "raise" or "skip" (counted).
            sketch_dim: D when ``spec`` is None (else taken from ``spec["sketch_dim"]``).

        Raises:
            StoreWriteError: ``path`` holds a store and ``exist_ok`` is False, or it cannot be written.
            SketchConfigError: bad ``dtype``, ``nan_policy``, spec or D.
        """
        path = Path(path)
        one_of("dtype", dtype, mf.DTYPES)
        one_of("nan_policy", nan_policy, ("raise", "skip"))
        spec_d = spec_dict(spec)
        width = sketch_dim if spec_d is None else spec_d.get("sketch_dim", sketch_dim)
        width = positive_int("sketch_dim", width, hint="It is the store's row width D (spec['sketch_dim']).")
        layout_d, fingerprint = layout_info(layout, layout_fingerprint)
        if (path / mf.MANIFEST).exists():
            if not exist_ok:
                raise StoreWriteError(
                    f"A sketch store already exists at {str(path)!r}; pass exist_ok=True to append to it or "
                    f"choose another path."
                )
            return cls.open(path, spec=spec_d, layout_fingerprint=fingerprint, mode="a")
        return cls(Snapshot.create(path, spec=spec_d, sketch_dim=width, layout=layout_d,
                                   layout_fingerprint=fingerprint, dtype=dtype, nan_policy=nan_policy))

    @classmethod
    def open(
        cls,
        path: str | Path,
        spec: Any = None,
        layout_fingerprint: Any = None,
        mode: Literal["r", "a"] = "r",
        verify: Literal["auto", "full", "lazy", "size"] = "auto",
    ) -> SketchStore:
        """Open the last committed snapshot of the store at ``path``.

        Args:
            path: the store directory.
            spec: if given, must equal the stored sketch spec (a Sketch or dict).
            layout_fingerprint: if given (str or ``ParamLayout``), must equal the stored one.
            mode: "r" (any number of readers, no lock) or "a" (the single writer; takes the lock).
            verify: "full" checks every file's sha256 now; "lazy" checks each file's sha256 the first
                time it is read; "size" checks sizes only; "auto" = full up to 1 GiB, else lazy.
                Sizes are always checked on open. A file is hashed once per process: one this
                process already verified and that has not changed since (same inode, size, mtime
                and ctime) is not hashed again (:func:`~lightning_sketch.store.manifest.check_file`).

        Raises:
            StoreNotFoundError: no store (or no manifest) at ``path``.
            StoreFormatError: unknown format version.
            StoreCorruptError: manifest or a data file is missing, truncated or fails its checksum.
            SketchMismatchError / LayoutMismatchError: ``spec`` / ``layout_fingerprint`` differ.
            StoreWriteError: ``mode="a"`` while another process holds the writer lock.
        """
        return cls(Snapshot.open(path, spec, layout_fingerprint, mode, verify))

    def close(self) -> None:
        """Release the writer lock. Uncommitted rows are dropped (call :meth:`commit` first)."""
        pending = self._writer.pending_rows
        if pending:
            log.warning("Closing store %s with %d uncommitted rows; they are dropped.", self.path, pending)
        self._writer.drop_buffer()
        self._snapshot.release()

    def __enter__(self) -> SketchStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ snapshot facts
    @property
    def path(self) -> Path:
        """The store directory."""
        return self._snapshot.path

    @property
    def mode(self) -> str:
        """"r" (a reader) or "a" (the single writer)."""
        return self._snapshot.mode

    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the committed manifest."""
        return copy.deepcopy(self._snapshot.manifest)

    @property
    def generation(self) -> int:
        """Number of commits in the current snapshot."""
        return self._snapshot.generation

    @property
    def run_id(self) -> str | None:
        """The id made when the store was created (32 hex digits; None for a store written without one)."""
        return self._snapshot.manifest.get("run_id")

    @property
    def spec(self) -> dict[str, Any] | None:
        """The sketch spec the rows were written with (``make(**spec)`` rebuilds it)."""
        return copy.deepcopy(self._snapshot.manifest["spec"])

    @property
    def sketch_dim(self) -> int:
        """D, the width of one stored row."""
        return self._snapshot.sketch_dim

    @property
    def dtype(self) -> str:
        """Storage dtype, "float32" or "float16"."""
        return self._snapshot.dtype

    @property
    def layout_fingerprint(self) -> str | None:
        """Fingerprint of the parameter layout the rows were computed for."""
        return self._snapshot.layout_fingerprint

    @property
    def checkpoints(self) -> list[str]:
        """Committed checkpoint names in the order they were added."""
        return self._snapshot.checkpoints

    def checkpoint_info(self, name: str) -> dict[str, Any]:
        """The manifest record of checkpoint ``name`` (step, lr, weight, rows, skipped counts).

        Raises:
            SketchInputError: unknown checkpoint.
        """
        return self._snapshot.checkpoint_info(name)

    @property
    def num_rows(self) -> int:
        """Committed rows over all checkpoints."""
        return self._snapshot.num_rows

    @property
    def pending_rows(self) -> int:
        """Buffered (uncommitted) rows."""
        return self._writer.pending_rows

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the committed snapshot (data files, indexes and manifest)."""
        return self._snapshot.size_bytes

    # ------------------------------------------------------------------ snapshot maintenance
    def rollback(self, generation: int) -> None:
        """Publish the snapshot as it was at ``generation`` (drop later segments, checkpoints, indexes).

        Used on resume: a callback records the store generation in its Lightning checkpoint and rolls
        back to it, so re-run steps append the same rows again. The pending buffer is cleared.

        Raises:
            SketchInputError: ``generation`` is negative or beyond the current one.
        """
        self._snapshot.rollback(generation)
        self._writer.discard()
        self._views.clear()

    def refresh(self) -> None:
        """Re-read the manifest to see commits made since this store was opened (readers)."""
        self._snapshot.reload()
        self._views.clear()
        self._writer.forget_ids()

    def prune(self) -> list[str]:
        """Delete top-level files the current manifest does not name and return their names.

        These are leftovers of interrupted commits (``*.tmp-<pid>``, unreferenced segments), replaced
        indexes and rolled-back segments. Readers still holding an older snapshot may need them, so
        prune only when no reader of an older generation is open. Shard directories are left alone.

        Raises:
            StoreWriteError: the store is read-only.
        """
        return self._snapshot.prune()

    def verify(self) -> None:
        """Check every committed file's size and sha256 (hashed now, whatever was hashed before) and
        the manifest's row counts.

        Raises:
            StoreCorruptError: naming the first bad file or inconsistent count.
        """
        self._snapshot.verify()
        self._weights.verify()
        self._curvature.verify()

    def check_writer(self) -> None:
        """Raise unless this store may publish now: open for writing, its lock file still the one it took,
        and the manifest on disk still at the generation it loaded. Writers of files recorded in the
        manifest (curvature) call it right before their rename.

        Raises:
            StoreWriteError: read-only or closed. StoreConflictError: another writer got in.
        """
        self._snapshot.check_writer()

    # ------------------------------------------------------------------ writing (Writer)
    def add_checkpoint(
        self,
        name: str,
        step: int | None = None,
        lr: float | None = None,
        weight: float | None = None,
        **meta: Any,
    ) -> None:
        """Declare checkpoint ``name`` (training step, learning rate η_t, optional TracIn weight).

        Re-adding a committed or pending checkpoint with the same step/lr/weight is a no-op (resume).

        Raises:
            SketchInputError: unsafe name, or a checkpoint of that name with other step/lr/weight.
            StoreWriteError: the store is read-only.
        """
        self._writer.add_checkpoint(name, step, lr, weight, **meta)

    def append(
        self,
        ids: Any,
        vectors: Any,
        checkpoint: str | None = None,
        rank: int = 0,
        on_duplicate: Literal["raise", "skip"] = "raise",
        nan_policy: Literal["raise", "skip"] | None = None,
    ) -> int:
        """Buffer rows ``vectors`` [B, D] for example ``ids`` [B] under ``checkpoint``.

        Rows become visible (and durable) only after :meth:`commit`.

        Args:
            ids: int64-compatible example ids (dataset indices), ``[B]``; unique per checkpoint.
            vectors: ``[B, D]`` float tensor or array (cast to the storage dtype).
            checkpoint: a declared checkpoint (optional when the store has exactly one).
            rank: the writer's rank, recorded in segment file names.
            on_duplicate: "raise" (:class:`DuplicateIdError`) or "skip" rows whose id is already in
                this checkpoint (committed or buffered), counted in the manifest.
            nan_policy: "raise" (:class:`NonFiniteGradientError`) or "skip" non-finite rows (counted);
                default: the store's policy.

        Returns:
            The number of rows accepted into the buffer.

        Raises:
            SketchInputError: bad ids (non-integer, negative, outside int64), shapes or dtypes, or a
                float16 store receiving values beyond ±65504.
            DuplicateIdError: an id repeats within this checkpoint.
            NonFiniteGradientError: non-finite rows under ``nan_policy="raise"``.
        """
        return self._writer.append(ids, vectors, checkpoint, rank, on_duplicate, nan_policy)

    def commit(self) -> int:
        """Write buffered rows as new immutable segments, then atomically publish a new manifest.

        Returns:
            The new generation (unchanged if nothing was pending).

        Raises:
            StoreWriteError: a write failed (e.g. disk full); the last committed state is intact and
                the buffer is kept, so commit can be retried.
        """
        return self._writer.commit()

    @property
    def resume_point(self) -> int | None:
        """Generation at which a training checkpoint (or the end of a fit) last referenced this store.

        None means no run writing this store ever reached a checkpoint: its rows are orphans a
        fresh run may discard (see :class:`~lightning_sketch.callbacks.GradientSketch`).
        """
        return self._writer.resume_point

    def mark_resume_point(self) -> int:
        """Record (and commit) that a training checkpoint now references this store; return the generation."""
        return self._writer.mark_resume_point()

    # ------------------------------------------------------------------ model weights (WeightFiles)
    def save_weights(self, name: str, tensors: dict[str, Any], directory: str | Path,
                     layout_fingerprint: str | None = None) -> Path:
        """Write the parameters of checkpoint ``name`` to ``directory/<name>.pt`` and record them.

        The file is written atomically (``torch.save`` of a dict of CPU tensors) and recorded at
        the next :meth:`commit` with its size, sha256 and the layout fingerprint, so that
        :meth:`load_weights` refuses a flipped, truncated, swapped or foreign file. ``directory``
        must lie in the run directory (the store's parent folder).

        Raises:
            SketchInputError: unsafe checkpoint name, or ``directory`` outside the run directory.
            UnsafeFileError: ``directory`` is reached through a symlinked folder of the run directory.
            StoreWriteError: the write failed (disk full); no file is left behind.
        """
        return self._weights.save(name, tensors, directory, layout_fingerprint)

    def has_weights(self, name: str) -> bool:
        """Whether committed parameters of checkpoint ``name`` are recorded (see :meth:`save_weights`)."""
        return self._weights.has(name)

    def load_weights(self, name: str, layout_fingerprint: str | None = None) -> dict[str, Any]:
        """The verified parameters ``{param name: tensor}`` of checkpoint ``name`` (CPU tensors).

        The file must be the one recorded for ``name``: inside the run directory, a regular file of
        the recorded size and sha256, for the recorded layout (and ``layout_fingerprint``, if
        given). It is read with ``torch.load(weights_only=True)`` (no pickled code).

        Raises:
            StoreNotFoundError: no weights recorded for ``name`` (or the file is missing).
            StoreCorruptError: the file fails its checksum or holds anything but a dict of tensors.
            LayoutMismatchError: the weights were saved for another parameter layout.
            UnsafeFileError: the recorded path leaves the run directory or is not a regular file.
        """
        return self._weights.load(name, layout_fingerprint)

    # ------------------------------------------------------------------ curvature files (CurvatureFiles)
    def record_curvature(self, name: str, files: dict[str, tuple[Path, str, int]]) -> None:
        """Record slice ``name``'s curvature files, committed with the next :meth:`commit`.

        Args:
            name: the checkpoint slice.
            files: ``{"matrix": (path, sha256, bytes), "sidecar": (path, sha256, bytes)}`` as returned by
                :func:`~lightning_sketch.io.safeio.atomic_write`; paths lie in the run directory.

        Raises:
            SketchInputError: unsafe name, other parts than
                :data:`~lightning_sketch.store.curvature.CURVATURE_PARTS`, or a path outside
                the run directory.
            StoreWriteError: the store is read-only.
        """
        self._curvature.record(name, files)

    @property
    def curvature_slices(self) -> list[str]:
        """Slices whose curvature files the committed manifest records (sorted)."""
        return self._curvature.slices

    def has_curvature(self, name: str) -> bool:
        """Whether the committed manifest records curvature files for slice ``name``."""
        return self._curvature.has(name)

    def curvature_bytes(self, name: str, part: str) -> tuple[Path, bytes]:
        """``(path, content)`` of one recorded curvature file of slice ``name``, verified.

        Args:
            name: the checkpoint slice.
            part: ``"matrix"`` or ``"sidecar"``.

        Raises:
            StoreNotFoundError: the manifest records no curvature for ``name`` (an unlisted file on disk
                is ignored).
            StoreCorruptError: the recorded file is missing, or its size or sha256 differs (the message
                names the file).
            UnsafeFileError: the recorded path leaves the run directory or is not a regular file.
        """
        return self._curvature.read(name, part)

    # ------------------------------------------------------------------ DDP shards (ShardMerge)
    @classmethod
    def open_shard(
        cls, path: str | Path, rank: int, spec: Any = None, layout_fingerprint: Any = None
    ) -> SketchStore:
        """Open (creating if needed) rank ``rank``'s writable shard of the existing store at ``path``.

        The shard inherits the main store's spec, layout, dtype and NaN policy. Create the main
        store on rank 0 and ``barrier`` before other ranks call this.

        Raises:
            StoreNotFoundError: no main store at ``path``.
            SketchMismatchError / LayoutMismatchError: as :meth:`SketchStore.open`.
        """
        shard, options = shard_options(path, rank, spec, layout_fingerprint)
        return cls.create(shard, **options)

    def merge_shards(self) -> int:
        """Add every shard's newly committed segments to this (main) store and commit.

        Returns:
            The number of rows merged.

        Raises:
            SketchMismatchError: a shard has another spec/layout/dtype, or a checkpoint with other
                step/lr/weight.
            DuplicateIdError: an id appears in two shards (or the main store) for one checkpoint.
            StoreCorruptError: a shard file fails its checksum.
        """
        return self._shards.merge()

    # ------------------------------------------------------------------ views and search (Views)
    def ids(self, checkpoint: str | None = None) -> np.ndarray:
        """Committed example ids ``[n]`` int64 of a checkpoint, in append order.

        ``"tracin"``: the sorted ids common to every checkpoint.
        """
        return self._views.ids(checkpoint)

    def vectors(
        self, checkpoint: str | None = None, as_torch: bool = False, weights: Weights = "sqrt_lr"
    ) -> Any:
        """Committed rows ``[n, D]`` of a checkpoint in the storage dtype, aligned with :meth:`ids`.

        A single-segment checkpoint is returned as a read-only memory map; several segments are
        concatenated in memory (a copy of the slice: :meth:`rows` reads them without one).
        ``"tracin"`` gives :meth:`concat_vectors`. ``as_torch`` wraps the result with
        :func:`torch.from_numpy` (a copy if the array is read-only).
        """
        return self._views.vectors(checkpoint, as_torch, weights)

    def concat_vectors(self, weights: Weights = "sqrt_lr") -> tuple[np.ndarray, np.ndarray]:
        """The TracIn view: ``(ids [n], rows [n, T·D] float32)`` over ids present in every checkpoint.

        Slice t is scaled by √w_t: ``weights="sqrt_lr"`` uses w_t = lr, ``"sqrt_weight"`` the
        checkpoint's ``weight`` (lr if unset), ``"uniform"`` w_t = 1, and a mapping gives the scale
        factor per checkpoint name directly.

        Raises:
            SketchInputError: no checkpoints, or a checkpoint without the lr/weight asked for.
        """
        return self._views.concat_vectors(weights)

    def rows(self, checkpoint: str | None = None, weights: Weights = "sqrt_lr") -> RowSource:
        """Committed rows ``[n, width]`` of a view, aligned with :meth:`ids`, without joining segments.

        A read-only memory map (one segment), a :class:`~lightning_sketch.store.rows.SegmentedRows`
        (several) or, for ``"tracin"``, a :class:`~lightning_sketch.store.rows.GatheredConcat`
        (``[n, T·D]`` float32). ``rows[s:e]`` and ``rows[positions]`` return arrays that copy only
        the rows asked for, so a pass in blocks holds one block beside the memory-mapped pages.
        """
        return self._views.rows(checkpoint, weights)

    def concat_queries(
        self, queries: Mapping[str, Any] | Sequence[Any], weights: Weights = "sqrt_lr"
    ) -> np.ndarray:
        """Query sketches per checkpoint -> ``[Q, T·D]`` float32 rows matching :meth:`concat_vectors`.

        Args:
            queries: ``{checkpoint: [Q, D]}`` or a sequence in checkpoint order.
        """
        return self._views.concat_queries(queries, weights)

    def search_exact(
        self, queries: Any, k: int, checkpoint: str | None = None, weights: Weights = "sqrt_lr"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k inner products by torch brute force in float64: the reference for :meth:`search`.

        Returns:
            ``(scores [Q, k] float64, ids [Q, k] int64)``, sorted by decreasing score.
        """
        return self._views.search_exact(queries, k, checkpoint, weights)

    def search(
        self,
        queries: Any,
        k: int,
        checkpoint: str | None = None,
        index: str = "flat",
        rerank: bool = True,
        candidates: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "cpu",
        weights: Weights = "sqrt_lr",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k training examples by inner product with each query, through FAISS.

        Uses the persisted index of this kind (see :meth:`build_index`) when it is current, else builds
        one in memory with default parameters (cached on this object). A ``"flat"`` search on the CPU
        without such an index searches the stored rows block by block instead
        (:func:`~lightning_sketch.store.index.flat_topk`: FAISS's flat kernel), holding no second
        copy of the rows.

        Args:
            queries: ``[Q, D]`` (``[Q, T·D]`` for ``"tracin"``, see :meth:`concat_queries`).
            k: results per query, ``1 <= k <= rows``.
            checkpoint: a checkpoint name, ``"tracin"``, or None when there is one checkpoint.
            index: "flat" (exact), "ivf", "ivfpq" or "hnsw".
            rerank: re-rank approximate candidates exactly against the stored rows.
            candidates: approximate candidates per query before re-ranking (default ``max(4k, k + 32)``).
            nprobe / ef_search: search-time recall knobs of IVF / HNSW.
            device: "cpu" or "cuda[:i]" (needs GPU FAISS; flat/ivf/ivfpq).

        Returns:
            ``(scores [Q, k] float32, ids [Q, k] int64)`` sorted by decreasing score; an approximate
            search that finds fewer than k candidates pads with score -inf and id -1.

        Raises:
            SketchInputError: empty view, bad ``k``/queries. SketchConfigError: bad index kind or device.
        """
        return self._views.search(queries, k, checkpoint, index=index, rerank=rerank, candidates=candidates,
                                  nprobe=nprobe, ef_search=ef_search, device=device, weights=weights)

    def build_index(
        self,
        kind: str = "flat",
        checkpoint: str | None = None,
        weights: Weights = "sqrt_lr",
        persist: bool = True,
        **params: Any,
    ) -> dict[str, Any]:
        """Build a FAISS index over a view, persist it beside the segments (checksummed) and commit.

        With ``persist=False`` the index is only kept in memory for this object's later
        :meth:`search` calls (no write; works on read-only stores).

        Args:
            kind: "flat", "ivf", "ivfpq" or "hnsw".
            checkpoint: a checkpoint name, "tracin", or None when there is one checkpoint.
            **params: overrides of :func:`lightning_sketch.store.index.default_params` (nlist, nprobe,
                m, nbits, M, ef_construction, ef_search, max_train, seed).

        Returns:
            The manifest entry of the index (kind, params, file, bytes, sha256, rows); with
            ``persist=False`` only kind, view, params and rows.

        Raises:
            StoreWriteError: read-only store or failed write (the previous snapshot stays intact).
        """
        if persist:
            self._snapshot.require_writer()
            self.commit()
        return self._views.build_index(kind, checkpoint, weights, persist, **params)
