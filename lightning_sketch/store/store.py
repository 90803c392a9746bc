"""The crash-safe sketch store: append sketched gradients per checkpoint, commit, reopen, search.

A store is a directory (see :mod:`lightning_sketch.store.manifest`) of immutable segment files
plus ``manifest.json``. :meth:`SketchStore.append` buffers rows in memory; :meth:`SketchStore.commit`
writes the buffered rows as new segment files (tmp + fsync + rename) and then atomically replaces
the manifest. Readers open one manifest snapshot and only ever see committed segments; a crash
loses at most the uncommitted buffer. One writer per directory (an ``fcntl`` lock); DDP ranks
write their own shard (:meth:`SketchStore.open_shard`) that rank 0 merges (:meth:`merge_shards`).

Rows are sketched per-example gradients Φ∇ℓ(z; θ_t) ∈ R^D (arXiv 2402.03994 Sec. 5.2); checkpoint ``lr`` is
η_t, used by the TracIn view Σ_t η_t ⟨Φg_t(z), Φg_t(z')⟩ (see :mod:`lightning_sketch.store.views`).
"""

from __future__ import annotations

import copy
import io
import logging
import secrets
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sketch import _safeio as sio
from lightning_sketch._version import __version__
from lightning_sketch.exceptions import (
    DuplicateIdError,
    LayoutMismatchError,
    SketchConfigError,
    SketchInputError,
    StoreConflictError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreWriteError,
)
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._io import WriterLock, atomic_write, npy_bytes, write_json_atomic
from lightning_sketch.store._validate import (
    as_ids,
    as_rows,
    compare_layout,
    compare_spec,
    finite_rows,
    layout_info,
    spec_dict,
)
from lightning_sketch.store.shards import ShardMixin
from lightning_sketch.store.snapshot import SnapshotMixin, _data_bytes, _recount
from lightning_sketch.store.views import StoreViews

__all__ = ["SketchStore"]

log = logging.getLogger(__name__)

_AUTO_FULL_VERIFY_BYTES = 1 << 30


class SketchStore(StoreViews, ShardMixin, SnapshotMixin):
    """A directory of committed sketch rows, one slice per training checkpoint.

    Build one with :meth:`create` or :meth:`open`, never directly.

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

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str, lock: WriterLock | None, verify: str):
        self.path = path
        self.mode = mode
        self._manifest = manifest
        self._lock = lock
        self._verify = verify
        self._verified: set[str] = set()
        self._buffer: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_ckpts: list[dict[str, Any]] = []
        self._pending_skips: dict[str, dict[str, Any]] = {}
        self._pending_weights: dict[str, dict[str, Any]] = {}
        self._pending_mark = False
        self._idsets: dict[str, set[int]] = {}
        self._cache: dict[Any, Any] = {}
        self._check_files()

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
        if dtype not in mf.DTYPES:
            raise SketchConfigError(f"`dtype` must be one of {mf.DTYPES}, got {dtype!r}.")
        if nan_policy not in ("raise", "skip"):
            raise SketchConfigError(f"`nan_policy` must be 'raise' or 'skip', got {nan_policy!r}.")
        spec_d = spec_dict(spec)
        width = sketch_dim if spec_d is None else spec_d.get("sketch_dim", sketch_dim)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise SketchConfigError(f"Store row width D must be a positive int (spec['sketch_dim']), got {width!r}.")
        layout_d, fingerprint = layout_info(layout, layout_fingerprint)
        if (path / mf.MANIFEST).exists():
            if not exist_ok:
                raise StoreWriteError(
                    f"A sketch store already exists at {str(path)!r}; pass exist_ok=True to append to it or "
                    f"choose another path."
                )
            return cls.open(path, spec=spec_d, layout_fingerprint=fingerprint, mode="a")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create store directory {str(path)!r}: {err}.") from err
        lock = WriterLock(path)

        manifest = mf.new_manifest(
            spec=spec_d,
            sketch_dim=width,
            layout=layout_d,
            layout_fingerprint=fingerprint,
            dtype=dtype,
            nan_policy=nan_policy,
            library_version=__version__,
        )
        try:
            write_json_atomic(path / mf.MANIFEST, manifest)
        except StoreWriteError:
            lock.release()
            raise
        return cls(path, manifest, "a", lock, "full")

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
                Sizes are always checked on open.

        Raises:
            StoreNotFoundError: no store (or no manifest) at ``path``.
            StoreFormatError: unknown format version.
            StoreCorruptError: manifest or a data file is missing, truncated or fails its checksum.
            SketchMismatchError / LayoutMismatchError: ``spec`` / ``layout_fingerprint`` differ.
            StoreWriteError: ``mode="a"`` while another process holds the writer lock.
        """
        if mode not in ("r", "a"):
            raise SketchConfigError(f"`mode` must be 'r' or 'a', got {mode!r}.")
        if verify not in ("auto", "full", "lazy", "size"):
            raise SketchConfigError(f"`verify` must be one of auto/full/lazy/size, got {verify!r}.")
        path = Path(path)
        manifest = mf.load_manifest(path)
        compare_spec(manifest["spec"], spec, f"Store {str(path)!r}")
        compare_layout(manifest["layout_fingerprint"], layout_fingerprint, f"Store {str(path)!r}")
        lock = WriterLock(path) if mode == "a" else None
        if mode == "a":  # re-read under the lock: another writer may have committed meanwhile
            manifest = mf.load_manifest(path)
        if verify == "auto":
            verify = "full" if _data_bytes(manifest) <= _AUTO_FULL_VERIFY_BYTES else "lazy"
        try:
            return cls(path, manifest, mode, lock, verify)
        except Exception:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Release the writer lock. Uncommitted rows are dropped (call :meth:`commit` first)."""
        if self._buffer:
            log.warning("Closing store %s with %d uncommitted rows; they are dropped.", self.path, self.pending_rows)
        self._buffer.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SketchStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def _require_writer(self) -> None:
        if self.mode != "a" or self._lock is None:
            raise StoreWriteError(f"Store {str(self.path)!r} is open read-only (or closed); open it with mode='a'.")

    def add_checkpoint(
        self, name: str, step: int | None = None, lr: float | None = None, weight: float | None = None, **meta: Any
    ) -> None:
        """Declare checkpoint ``name`` (training step, learning rate η_t, optional TracIn weight).

        Re-adding a committed or pending checkpoint with the same step/lr/weight is a no-op (resume).

        Raises:
            SketchInputError: unsafe name, or a checkpoint of that name with other step/lr/weight.
            StoreWriteError: the store is read-only.
        """
        self._require_writer()
        mf.check_checkpoint_name(name)
        for key, val in (("lr", lr), ("weight", weight)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not np.isfinite(val)):
                raise SketchInputError(f"`{key}` must be a finite number or None, got {val!r}.")
        record = {"name": name, "step": None if step is None else int(step), "lr": lr, "weight": weight}
        for c in self._manifest["checkpoints"] + self._pending_ckpts:
            if c["name"] == name:
                if {k: c[k] for k in record} != record:
                    raise SketchInputError(
                        f"Checkpoint {name!r} already exists with step={c['step']}, lr={c['lr']}, "
                        f"weight={c['weight']}; got {record}. Use a new name for a new checkpoint."
                    )
                return
        self._pending_ckpts.append({**record, "rows": 0, "meta": spec_dict(meta) or {}})

    def _resolve_checkpoint(self, checkpoint: str | None) -> str:
        names = self.checkpoints + [c["name"] for c in self._pending_ckpts]
        if checkpoint is None:
            if len(names) == 1:
                return names[0]
            raise SketchInputError(f"`checkpoint` is required when the store has {len(names)} checkpoints {names}.")
        if checkpoint not in names:
            raise SketchInputError(
                f"Unknown checkpoint {checkpoint!r}; call add_checkpoint({checkpoint!r}, step=..., lr=...) first "
                f"(known: {names})."
            )
        return checkpoint

    def _idset(self, checkpoint: str) -> set[int]:
        if checkpoint not in self._idsets:
            self._idsets[checkpoint] = set(self.ids(checkpoint).tolist()) if checkpoint in self.checkpoints else set()
        return self._idsets[checkpoint]

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
        self._require_writer()
        checkpoint = self._resolve_checkpoint(checkpoint)
        idx = as_ids(ids)
        rows = as_rows(vectors, self.sketch_dim, "vectors")
        if len(idx) != len(rows):
            raise SketchInputError(f"`ids` has {len(idx)} entries but `vectors` has {len(rows)} rows.")
        policy = nan_policy or self._manifest.get("nan_policy", "raise")
        if on_duplicate not in ("raise", "skip") or policy not in ("raise", "skip"):
            raise SketchInputError(f"`on_duplicate`/`nan_policy` must be 'raise' or 'skip'; got {on_duplicate}/{policy}.")
        skips = self._pending_skips.setdefault(checkpoint, {"nonfinite": 0, "duplicates": 0, "ids": []})
        finite = finite_rows(idx, rows, policy, f"in `vectors` for checkpoint {checkpoint!r}")
        if not finite.all():
            skips["nonfinite"] += int((~finite).sum())
            skips["ids"] = (skips["ids"] + idx[~finite].tolist())[:1000]
            idx, rows = idx[finite], rows[finite]
        seen = self._idset(checkpoint)
        _, first = np.unique(idx, return_index=True)
        dup = np.ones(len(idx), dtype=bool)
        dup[first] = False
        dup |= np.fromiter((int(i) in seen for i in idx), dtype=bool, count=len(idx))
        if dup.any():
            if on_duplicate == "raise":
                raise DuplicateIdError(
                    f"Example id(s) {idx[dup][:5].tolist()} already appended to checkpoint {checkpoint!r}; ids must "
                    f"be unique per checkpoint. Pass on_duplicate='skip' when re-appending after a resume."
                )
            skips["duplicates"] += int(dup.sum())
            idx, rows = idx[~dup], rows[~dup]
        with np.errstate(over="ignore"):
            stored = rows.astype(self.dtype)
        if self.dtype == "float16" and not np.isfinite(stored).all():
            raise SketchInputError("`vectors` exceed the float16 range (±65504); create the store with dtype='float32'.")
        if len(idx):
            self._buffer.setdefault((checkpoint, int(rank)), []).append((idx.copy(), np.ascontiguousarray(stored)))
            seen.update(idx.tolist())
        return int(len(idx))

    def commit(self) -> int:
        """Write buffered rows as new immutable segments, then atomically publish a new manifest.

        Returns:
            The new generation (unchanged if nothing was pending).

        Raises:
            StoreWriteError: a write failed (e.g. disk full); the last committed state is intact and
                the buffer is kept, so commit can be retried.
        """
        self._require_writer()
        if not self._buffer and not self._pending_ckpts and not self._pending_weights and not self._pending_mark \
                and not any(s["nonfinite"] or s["duplicates"] for s in self._pending_skips.values()):
            return self.generation
        self._check_generation()  # before writing anything: another writer's files are never touched
        new = copy.deepcopy(self._manifest)
        gen = new["generation"] + 1
        new["generation"] = gen
        new["checkpoints"].extend({**c, "generation": gen} for c in self._pending_ckpts)
        if self._pending_weights:
            new["weights"] = {**new.get("weights", {}),
                              **{n: {**e, "generation": gen} for n, e in self._pending_weights.items()}}
        if self._pending_mark:
            new["checkpointed_generation"] = gen
        written: list[Path] = []
        token = secrets.token_hex(4)  # unique file names: a racing writer can never replace our files
        try:
            for (ckpt, rank), parts in sorted(self._buffer.items()):
                ids = np.concatenate([p[0] for p in parts])
                vecs = np.concatenate([p[1] for p in parts])
                stem = f"seg-{ckpt}-r{rank}-g{gen:06d}-{token}"
                entry: dict[str, Any] = {"checkpoint": ckpt, "rank": rank, "generation": gen, "rows": len(ids)}
                for key, suffix, arr in (("vectors", ".npy", vecs), ("ids", ".ids.npy", ids)):
                    sha, size = atomic_write(self.path / (stem + suffix), npy_bytes(arr))
                    written.append(self.path / (stem + suffix))
                    entry[key] = {"file": stem + suffix, "bytes": size, "sha256": sha}
                new["segments"].append(entry)
            for ckpt, s in self._pending_skips.items():
                if s["nonfinite"] or s["duplicates"]:
                    new.setdefault("skips", []).append({"generation": gen, "checkpoint": ckpt, **s})
            _recount(new)
            self._publish(new)
        except StoreWriteError:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        self._manifest = new
        self._buffer.clear()
        self._pending_ckpts.clear()
        self._pending_skips.clear()
        self._pending_weights.clear()
        self._pending_mark = False
        self._cache.clear()
        self._verified.update(str(p.name) for p in written)
        return gen

    # ------------------------------------------------------------------ publishing
    def _check_generation(self) -> None:
        """Raise :class:`StoreConflictError` if another writer published since this one loaded the store."""
        if self._lock is not None:
            self._lock.check()
        disk = mf.read_generation(self.path)
        if disk != self._manifest["generation"]:
            raise StoreConflictError(
                f"Store {str(self.path)!r} is at generation {disk} on disk but this writer loaded generation "
                f"{self._manifest['generation']}: another writer committed meanwhile (was .writer.lock deleted?). "
                f"Nothing was published and the other writer's rows are intact; reopen the store and append again."
            )

    def _publish(self, new: dict[str, Any]) -> None:
        """Atomically replace the manifest by ``new`` if the on-disk generation is still the loaded one."""
        self._check_generation()
        write_json_atomic(self.path / mf.MANIFEST, new)

    # ------------------------------------------------------------------ resume points
    @property
    def resume_point(self) -> int | None:
        """Generation at which a training checkpoint (or the end of a fit) last referenced this store.

        None means no run writing this store ever reached a checkpoint: its rows are orphans a
        fresh run may discard (see :class:`~lightning_sketch.callbacks.GradientSketch`).
        """
        return self._manifest.get("checkpointed_generation")

    def mark_resume_point(self) -> int:
        """Record (and commit) that a training checkpoint now references this store; returns the generation."""
        self._require_writer()
        self._pending_mark = True
        return self.commit()

    # ------------------------------------------------------------------ model weights
    def save_weights(self, name: str, tensors: dict[str, Any], directory: str | Path,
                     layout_fingerprint: str | None = None) -> Path:
        """Write the parameters of checkpoint ``name`` to ``directory/<name>.pt`` and record them.

        The file is written atomically (``torch.save`` of a dict of CPU tensors) and recorded at
        the next :meth:`commit` with its size, sha256 and the layout fingerprint, so that
        :meth:`load_weights` refuses a flipped, truncated, swapped or foreign file. ``directory``
        must lie in the run directory (the store's parent folder).

        Raises:
            SketchInputError: unsafe checkpoint name, or ``directory`` outside the run directory.
            StoreWriteError: the write failed (disk full); no file is left behind.
        """
        import torch

        self._require_writer()
        mf.check_checkpoint_name(name)
        root = self.path.parent
        directory = Path(directory)
        try:
            rel = directory.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise SketchInputError(f"Weights directory {str(directory)!r} must lie inside the run directory {str(root)!r}.") from None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(f"Cannot create the weights directory {str(directory)!r}: {err}.") from err
        buf = io.BytesIO()
        torch.save({n: t.detach().cpu().clone() for n, t in tensors.items()}, buf)
        sha, size = sio.atomic_write(directory / f"{name}.pt", [buf.getbuffer()], what="weights file")
        file = f"{name}.pt" if rel == "." else f"{rel}/{name}.pt"
        self._pending_weights[name] = {"file": file, "bytes": size, "sha256": sha,
                                       "layout_fingerprint": layout_fingerprint or self.layout_fingerprint}
        return directory / f"{name}.pt"

    def has_weights(self, name: str) -> bool:
        """Whether committed parameters of checkpoint ``name`` are recorded (see :meth:`save_weights`)."""
        return name in self._manifest.get("weights", {})

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
        import torch

        entry = self._manifest.get("weights", {}).get(name)
        if entry is None:
            raise StoreNotFoundError(
                f"Store {str(self.path)!r} records no saved weights for checkpoint {name!r} (recorded: "
                f"{sorted(self._manifest.get('weights', {}))}); write them with GradientSketch(save_weights=True)."
            )
        root = self.path.parent
        path = root / entry["file"]
        real = sio.confined(root, entry["file"], what="weights file")
        try:
            raw = sio.read_capped(real, entry["bytes"], what="weights file")
        except StoreNotFoundError as err:
            raise StoreNotFoundError(f"Weights file {str(path)!r} recorded for checkpoint {name!r} is missing; restore "
                                     f"it or re-run with save_weights=True.") from err
        if len(raw) != entry["bytes"] or sio.sha256_bytes(raw) != entry["sha256"]:
            raise StoreCorruptError(
                f"Weights file {str(path)!r} of checkpoint {name!r} fails its checksum ({len(raw)} bytes, manifest "
                f"records {entry['bytes']}): it is corrupted, truncated, or a file from another checkpoint or run. "
                f"Restore the original file."
            )
        for fp, where in ((entry.get("layout_fingerprint"), "recorded with the weights"),
                          (self.layout_fingerprint, "of the store")):
            if layout_fingerprint is not None and fp is not None and fp != layout_fingerprint:
                raise LayoutMismatchError(
                    f"Weights of checkpoint {name!r} were saved for parameter layout {fp[:12]}… ({where}) but the model "
                    f"has layout {layout_fingerprint[:12]}…; use the architecture the run was trained with."
                )
        saved = sio.load_torch_bytes(raw, what=f"weights file {str(path)!r}")
        if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in saved.items()):
            raise StoreCorruptError(f"Weights file {str(path)!r} does not hold a dict of named tensors.")
        return saved
