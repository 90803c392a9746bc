"""Writing to a store: declare checkpoints, buffer rows, commit them as immutable segments.

:class:`Writer` is the component of :class:`~lightning_sketch.store.SketchStore` that holds
everything not yet committed. :meth:`Writer.append` buffers rows in memory; :meth:`Writer.commit`
writes them as new segment files (tmp + fsync + rename) and then publishes a new manifest atomically
(:meth:`~lightning_sketch.store.snapshot.Snapshot.publish`), so a crash loses at most the buffer.
Files written beside the store (weights, curvature) are staged here by their components
(:meth:`Writer.stage`) and committed with the same generation.
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
from lightning_sketch.store._validate import as_ids, as_rows, finite_rows, spec_dict
from lightning_sketch.store.snapshot import Snapshot, recount
from lightning_sketch.store.views import Views

__all__ = ["RECORD_FIELDS", "Writer"]

#: manifest fields of files written beside the store (by name: checkpoint or slice), staged with
#: :meth:`Writer.stage` and committed with the rows, in this order.
RECORD_FIELDS = ("weights", "curvature")


class Writer:
    """Component of :class:`~lightning_sketch.store.SketchStore`: what the next commit will publish.

    Holds the checkpoints declared, the rows appended (per checkpoint and rank) and the records of
    files written beside the store (weights, curvature) since the last commit, and the ids of each
    checkpoint for the duplicate check. :meth:`commit` writes the rows as segment files and publishes
    them with everything else through ``snapshot``; it clears ``views``' cache of the old snapshot.
    """

    def __init__(self, snapshot: Snapshot, views: Views) -> None:
        self._snapshot = snapshot
        self._views = views
        #: uncommitted rows per (checkpoint, rank): a list of (ids [B], rows [B, D]) parts.
        self._buffer: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._pending_ckpts: list[dict[str, Any]] = []
        self._pending_skips: dict[str, dict[str, Any]] = {}
        #: staged manifest records per field of :data:`RECORD_FIELDS` (``{name: entry}``).
        self._pending_records: dict[str, dict[str, dict[str, Any]]] = {f: {} for f in RECORD_FIELDS}
        self._pending_mark = False
        #: ids per checkpoint (committed and buffered), for the duplicate check.
        self._idsets: dict[str, set[int]] = {}

    # ------------------------------------------------------------------ pending state
    @property
    def pending_rows(self) -> int:
        """Buffered (uncommitted) rows."""
        return int(sum(len(i) for parts in self._buffer.values() for i, _ in parts))

    def stage(self, field: str, name: str, entry: dict[str, Any]) -> None:
        """Record ``entry`` under ``manifest[field][name]`` at the next commit (``field`` in
        :data:`RECORD_FIELDS`); the caller has checked the writer and written the file."""
        self._pending_records[field][name] = entry

    def drop_buffer(self) -> None:
        """Drop the uncommitted rows (the store is closing)."""
        self._buffer.clear()

    def discard(self) -> None:
        """Drop everything pending but a resume mark, and the id sets (after a rollback)."""
        self._buffer.clear()
        self._pending_ckpts.clear()
        self._pending_skips.clear()
        for records in self._pending_records.values():
            records.clear()
        self._idsets.clear()

    def forget_ids(self) -> None:
        """Drop the id sets; they are read again from the committed rows when next needed."""
        self._idsets.clear()

    # ------------------------------------------------------------------ checkpoints and rows
    def add_checkpoint(
        self,
        name: str,
        step: int | None = None,
        lr: float | None = None,
        weight: float | None = None,
        **meta: Any,
    ) -> None:
        """Declare a checkpoint, committed with the next commit (see ``SketchStore.add_checkpoint``)."""
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

    def idset(self, checkpoint: str) -> set[int]:
        """The ids of ``checkpoint`` committed or buffered so far (a live set: adding to it claims ids)."""
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
        """Buffer rows under a checkpoint; the number accepted (see ``SketchStore.append``)."""
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
        seen = self.idset(checkpoint)
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
        """Write the buffer as segments and publish the pending records; the generation (see
        ``SketchStore.commit``)."""
        self._snapshot.require_writer()
        if (
            not self._buffer
            and not self._pending_ckpts
            and not any(self._pending_records.values())
            and not self._pending_mark
            and not any(s["nonfinite"] or s["duplicates"] for s in self._pending_skips.values())
        ):
            return self._snapshot.generation
        self._snapshot.check_generation()  # before writing anything: another writer's files are never touched
        new = copy.deepcopy(self._snapshot.manifest)
        gen = new["generation"] + 1
        new["generation"] = gen
        new["checkpoints"].extend({**c, "generation": gen} for c in self._pending_ckpts)
        for field, records in self._pending_records.items():  # weights, then curvature (RECORD_FIELDS)
            if records:
                stamped = {n: {**e, "generation": gen} for n, e in records.items()}
                new[field] = {**new.get(field, {}), **stamped}
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
        for records in self._pending_records.values():
            records.clear()
        self._pending_mark = False
        self._views.clear()
        return gen

    # ------------------------------------------------------------------ resume points
    @property
    def resume_point(self) -> int | None:
        """The generation a training checkpoint last referenced (see ``SketchStore.resume_point``)."""
        return self._snapshot.manifest.get("checkpointed_generation")

    def mark_resume_point(self) -> int:
        """Commit with a resume mark; the generation (see ``SketchStore.mark_resume_point``)."""
        self._snapshot.require_writer()
        self._pending_mark = True
        return self.commit()


def _write_npy(path: Path, pieces: list[np.ndarray]) -> tuple[str, int]:
    """One segment file from its buffered pieces (run on a commit's worker thread, so any error lands in
    its future)."""
    return atomic_write(path, npy_bytes(np.concatenate(pieces)))

