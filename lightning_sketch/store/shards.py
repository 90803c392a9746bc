"""DDP shards of a store: each rank writes ``<store>/shards/rank<r>/``, rank 0 merges.

The merge (the FAISS wiki's recipe for merging indexes built in several processes) adds each
shard's committed, checksummed segments to the main manifest *by reference* (segment files are
immutable, so no data is copied), after checking spec, layout, dtype and that example ids are
globally unique. Merging is idempotent: the main manifest records how many segments of each shard
it already holds. :class:`ShardMerge` is the store's component that merges; :func:`shard_options`
gives a rank the directory and creation arguments of its shard (``SketchStore.open_shard``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning_sketch._checks import non_negative_int
from lightning_sketch.exceptions import DuplicateIdError, SketchInputError, SketchMismatchError
from lightning_sketch.store import manifest as mf
from lightning_sketch.store._validate import compare_layout, compare_spec
from lightning_sketch.store.snapshot import Snapshot, recount
from lightning_sketch.store.views import Views
from lightning_sketch.store.writer import Writer

__all__ = ["ShardMerge", "shard_options", "shard_path"]


def shard_path(path: str | Path, rank: int) -> Path:
    """Directory of rank ``rank``'s shard inside store ``path``."""
    rank = non_negative_int("rank", rank, error=SketchInputError)
    return Path(path) / "shards" / f"rank{rank}"


def shard_options(path: str | Path, rank: int, spec: Any = None,
                  layout_fingerprint: Any = None) -> tuple[Path, dict[str, Any]]:
    """Rank ``rank``'s shard directory of the store at ``path`` and the ``SketchStore.create`` arguments
    it inherits from the main store (spec, layout, dtype, NaN policy, D; ``exist_ok``), for
    ``SketchStore.open_shard``.

    Raises:
        StoreNotFoundError: no main store at ``path``.
        SketchMismatchError / LayoutMismatchError: ``spec`` / ``layout_fingerprint`` differ from the
            main store's.
        SketchInputError: a negative or non-integer ``rank``.
    """
    main = mf.load_manifest(path)
    compare_spec(main["spec"], spec, f"Store {str(path)!r}")
    compare_layout(main["layout_fingerprint"], layout_fingerprint, f"Store {str(path)!r}")
    return shard_path(path, rank), {
        "spec": main["spec"],
        "layout": main["layout"],
        "layout_fingerprint": main["layout_fingerprint"],
        "dtype": main["dtype"],
        "exist_ok": True,
        "nan_policy": main.get("nan_policy", "raise"),
        "sketch_dim": main["sketch_dim"],
    }


class ShardMerge:
    """Component of :class:`~lightning_sketch.store.SketchStore`: merging the per-rank shards into it.

    Commits ``writer``'s buffer first, reads each shard as a
    :class:`~lightning_sketch.store.snapshot.Snapshot` (checksummed in full), claims its ids in
    ``writer``'s id sets, publishes the merged manifest through ``snapshot`` and clears ``views``.
    """

    def __init__(self, snapshot: Snapshot, writer: Writer, views: Views) -> None:
        self._snapshot = snapshot
        self._writer = writer
        self._views = views

    def merge(self) -> int:
        """Add the shards' new segments to the main manifest and publish it; the rows merged
        (see ``SketchStore.merge_shards``)."""
        self._snapshot.require_writer()
        self._writer.commit()
        root = self._snapshot.path / "shards"
        new = copy.deepcopy(self._snapshot.manifest)
        merged_rows = 0
        try:
            merged_rows = self._merge_into(new, root)
        except Exception:
            self._writer.forget_ids()  # ids of a failed merge were never committed
            raise
        if new != self._snapshot.manifest:
            new["generation"] += 1
            recount(new)
            self._snapshot.publish(new)
            self._views.clear()
        return merged_rows

    def _merge_into(self, new: dict[str, Any], root: Path) -> int:
        merged_rows = 0
        for shard_dir in sorted(
            root.glob("rank*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1
        ):
            if not (shard_dir / mf.MANIFEST).exists():
                continue
            shard = Snapshot.open(shard_dir, verify="full")
            for key in ("spec", "layout_fingerprint", "dtype", "sketch_dim"):
                if shard.manifest[key] != new[key]:
                    raise SketchMismatchError(
                        f"Shard {str(shard_dir)!r} has {key}={shard.manifest[key]!r} but the main store has "
                        f"{new[key]!r}; shards must be opened with SketchStore.open_shard on the same store."
                    )
            done = new["merged_shards"].get(shard_dir.name, 0)
            fresh = shard.manifest["segments"][done:]
            for c in shard.manifest["checkpoints"]:
                mine = next((m for m in new["checkpoints"] if m["name"] == c["name"]), None)
                record = {k: c[k] for k in ("step", "lr", "weight")}
                if mine is None:
                    new["checkpoints"].append({**c, "generation": new["generation"] + 1})
                elif {k: mine[k] for k in record} != record:
                    raise SketchMismatchError(
                        f"Checkpoint {c['name']!r} has {record} in shard {shard_dir.name} but "
                        f"{ {k: mine[k] for k in record} } in the main store."
                    )
            for seg in fresh:
                ids = shard.load(seg["ids"], seg["rows"], None, "int64")
                seen = self._writer.idset(seg["checkpoint"])
                clash = [int(i) for i in ids if int(i) in seen]
                if clash:
                    raise DuplicateIdError(
                        f"Shard {shard_dir.name} holds id(s) {clash[:5]} already present in checkpoint "
                        f"{seg['checkpoint']!r}; DDP ranks must append global dataset indices, each exactly "
                        "once."
                    )
                seen.update(ids.tolist())
                rel = shard_dir.relative_to(self._snapshot.path).as_posix()
                entry = copy.deepcopy(seg)
                for part in ("vectors", "ids"):
                    entry[part]["file"] = f"{rel}/{seg[part]['file']}"
                entry["generation"] = new["generation"] + 1
                new["segments"].append(entry)
                merged_rows += seg["rows"]
            skips_done = new.setdefault("merged_skips", {}).get(shard_dir.name, 0)
            for s in shard.manifest.get("skips", [])[skips_done:]:
                new.setdefault("skips", []).append(
                    {**s, "generation": new["generation"] + 1, "shard": shard_dir.name}
                )
            new["merged_skips"][shard_dir.name] = len(shard.manifest.get("skips", []))
            new["merged_shards"][shard_dir.name] = len(shard.manifest["segments"])
            shard.release()
        return merged_rows
