"""Writing to a store: declare checkpoints, buffer rows, commit them as immutable segments.

Mixin of :class:`~lightning_sketch.store.SketchStore`. :meth:`WriterMixin.append` buffers rows in
memory; :meth:`WriterMixin.commit` writes them as new segment files (tmp + fsync + rename) and then
publishes a new manifest atomically (:meth:`~lightning_sketch.store.snapshot.Snapshot.publish`), so a
crash loses at most the buffer.
"""

from __future__ import annotations

import copy
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_sketch._checks import number
from lightning_sketch.exceptions import DuplicateIdError, SketchInputError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._io import atomic_write, npy_bytes
from lightning_sketch.store._state import StoreState
from lightning_sketch.store._validate import as_ids, as_rows, finite_rows, spec_dict
from lightning_sketch.store.snapshot import recount

__all__ = ["WriterMixin"]


class WriterMixin(StoreState):
    """Checkpoints, buffered rows, commits and resume points (state lives in ``SketchStore``)."""

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
        self._snapshot.require_writer()
        mf.check_checkpoint_name(name)
        for key, val in (("lr", lr), ("weight", weight)):
            number(key, val, allow_none=True, error=SketchInputError)
        record = {"name": name, "step": None if step is None else int(step), "lr": lr, "weight": weight}
        for c in self._snapshot.manifest["checkpoints"] + self._pending_ckpts:
            if c["name"] == name:
                if {k: c[k] for k in record} != record:
                    raise SketchInputError(
                        f"Checkpoint {name!r} already exists with step={c['step']}, lr={c['lr']}, "
                        f"weight={c['weight']}; got {record}. Use a new name for a new checkpoint."
                    )
                return
        self._pending_ckpts.append({**record, "rows": 0, "meta": spec_dict(meta) or {}})

    def _resolve_checkpoint(self, checkpoint: str | None) -> str:
        names = self._snapshot.checkpoints + [c["name"] for c in self._pending_ckpts]
        if checkpoint is None:
            if len(names) == 1:
                return names[0]
            raise SketchInputError(
                f"`checkpoint` is required when the store has {len(names)} checkpoints {names}."
            )
        if checkpoint not in names:
            raise SketchInputError(
                f"Unknown checkpoint {checkpoint!r}; call add_checkpoint({checkpoint!r}, step=..., lr=...) "
                f"first (known: {names})."
            )
        return checkpoint

    def _idset(self, checkpoint: str) -> set[int]:
        if checkpoint not in self._idsets:
            committed = checkpoint in self._snapshot.checkpoints
            self._idsets[checkpoint] = set(self._views.ids(checkpoint).tolist()) if committed else set()
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
        self._snapshot.require_writer()
        checkpoint = self._resolve_checkpoint(checkpoint)
        idx = as_ids(ids)
        rows = as_rows(vectors, self._snapshot.sketch_dim, "vectors")
        if len(idx) != len(rows):
            raise SketchInputError(f"`ids` has {len(idx)} entries but `vectors` has {len(rows)} rows.")
        policy = nan_policy or self._snapshot.manifest.get("nan_policy", "raise")
        if on_duplicate not in ("raise", "skip") or policy not in ("raise", "skip"):
            raise SketchInputError(
                f"`on_duplicate`/`nan_policy` must be 'raise' or 'skip'; got {on_duplicate}/{policy}."
            )
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
                    f"Example id(s) {idx[dup][:5].tolist()} already appended to checkpoint {checkpoint!r}; "
                    "ids must be unique per checkpoint. Pass on_duplicate='skip' when re-appending after a "
                    "resume."
                )
            skips["duplicates"] += int(dup.sum())
            idx, rows = idx[~dup], rows[~dup]
        with np.errstate(over="ignore"):
            stored = rows.astype(self._snapshot.dtype)
        if self._snapshot.dtype == "float16" and not np.isfinite(stored).all():
            raise SketchInputError(
                "`vectors` exceed the float16 range (±65504); create the store with dtype='float32'."
            )
        if len(idx):
            self._buffer.setdefault((checkpoint, int(rank)), []).append(
                (idx.copy(), np.ascontiguousarray(stored))
            )
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
        self._snapshot.require_writer()
        if (
            not self._buffer
            and not self._pending_ckpts
            and not self._pending_weights
            and not self._pending_curvature
            and not self._pending_mark
            and not any(s["nonfinite"] or s["duplicates"] for s in self._pending_skips.values())
        ):
            return self._snapshot.generation
        self._snapshot.check_generation()  # before writing anything: another writer's files are never touched
        new = copy.deepcopy(self._snapshot.manifest)
        gen = new["generation"] + 1
        new["generation"] = gen
        new["checkpoints"].extend({**c, "generation": gen} for c in self._pending_ckpts)
        if self._pending_weights:
            new["weights"] = {**new.get("weights", {}),
                              **{n: {**e, "generation": gen} for n, e in self._pending_weights.items()}}
        if self._pending_curvature:
            new["curvature"] = {**new.get("curvature", {}),
                                **{n: {**e, "generation": gen} for n, e in self._pending_curvature.items()}}
        if self._pending_mark:
            new["checkpointed_generation"] = gen
        written: list[Path] = []
        token = secrets.token_hex(4)  # unique file names: a racing writer can never replace our files
        jobs: list[tuple[dict[str, Any], str, Path, list[np.ndarray]]] = []
        for (ckpt, rank), parts in sorted(self._buffer.items()):
            stem = f"seg-{ckpt}-r{rank}-g{gen:06d}-{token}"
            rows = sum(len(p[0]) for p in parts)
            entry: dict[str, Any] = {"checkpoint": ckpt, "rank": rank, "generation": gen, "rows": rows}
            new["segments"].append(entry)
            # the pieces are joined on the worker, one segment at a time per thread (not all up front)
            jobs += [(entry, key, self._snapshot.path / (stem + suffix), [p[i] for p in parts])
                     for key, suffix, i in (("vectors", ".npy", 1), ("ids", ".ids.npy", 0))]
        try:
            # Each file is written, fsync-ed and renamed on its own thread: the fsyncs (not the bytes)
            # dominate a commit of many small segments (an epoch each in inline mode), and the disk
            # serves concurrent flushes together. All are done before the manifest names them.
            with ThreadPoolExecutor(max_workers=min(8, len(jobs) or 1)) as pool:
                futures = [pool.submit(_write_npy, path, pieces) for _, _, path, pieces in jobs]
            # the pool has finished every job: record all files written before raising any error
            errors: list[BaseException] = []
            for (entry, key, path, _), fut in zip(jobs, futures):
                err = fut.exception()
                if err is not None:
                    errors.append(err)
                    continue
                sha, size = fut.result()
                written.append(path)
                entry[key] = {"file": path.name, "bytes": size, "sha256": sha}
            if errors:
                raise errors[0]
            for ckpt, s in self._pending_skips.items():
                if s["nonfinite"] or s["duplicates"]:
                    new.setdefault("skips", []).append({"generation": gen, "checkpoint": ckpt, **s})
            recount(new)
            self._snapshot.publish(new, written=[p.name for p in written])
        except BaseException:  # disk full, or anything else: no file of this generation is left behind
            for p in written:
                p.unlink(missing_ok=True)
            raise
        self._buffer.clear()
        self._pending_ckpts.clear()
        self._pending_skips.clear()
        self._pending_weights.clear()
        self._pending_curvature.clear()
        self._pending_mark = False
        self._views.clear()
        return gen

    # ------------------------------------------------------------------ resume points
    @property
    def resume_point(self) -> int | None:
        """Generation at which a training checkpoint (or the end of a fit) last referenced this store.

        None means no run writing this store ever reached a checkpoint: its rows are orphans a
        fresh run may discard (see :class:`~lightning_sketch.callbacks.GradientSketch`).
        """
        return self._snapshot.manifest.get("checkpointed_generation")

    def mark_resume_point(self) -> int:
        """Record (and commit) that a training checkpoint now references this store; return the generation."""
        self._snapshot.require_writer()
        self._pending_mark = True
        return self.commit()


def _write_npy(path: Path, pieces: list[np.ndarray]) -> tuple[str, int]:
    """One segment file from its buffered pieces (run on a commit's worker thread, so any error lands in
    its future)."""
    return atomic_write(path, npy_bytes(np.concatenate(pieces)))

