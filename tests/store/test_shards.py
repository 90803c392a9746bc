"""Per-rank shards merged by rank 0 equal a single-writer store."""

from __future__ import annotations

import numpy as np
import pytest
from store_helpers import clustered

from lightning_sketch.exceptions import DuplicateIdError, SketchMismatchError, StoreNotFoundError
from lightning_sketch.store import SketchStore, inspect_store, shard_path


def _by_id(store, checkpoint):
    return {int(i): row.tobytes() for i, row in zip(store.ids(checkpoint), np.asarray(store.vectors(checkpoint)))}


def test_merge_equals_single_writer(tmp_path, spec):
    x = {c: clustered(240, 16, seed=s) for c, s in (("a", 0), ("b", 1))}
    single = SketchStore.create(tmp_path / "single", spec)
    main = SketchStore.create(tmp_path / "ddp", spec)
    for store in (single, main):
        store.add_checkpoint("a", step=5, lr=0.2)
        store.add_checkpoint("b", step=9, lr=0.1)
    for c in ("a", "b"):
        for start in range(0, 240, 40):
            single.append(np.arange(start, start + 40), x[c][start : start + 40], checkpoint=c)
    single.commit()
    shards = [SketchStore.open_shard(tmp_path / "ddp", rank) for rank in (0, 1)]
    for shard in shards:
        shard.add_checkpoint("a", step=5, lr=0.2)
        shard.add_checkpoint("b", step=9, lr=0.1)
    for c in ("a", "b"):
        for start in range(0, 240, 40):  # a DistributedSampler-like interleaving of global ids
            rank = (start // 40) % 2
            shards[rank].append(np.arange(start, start + 40), x[c][start : start + 40], checkpoint=c, rank=rank)
            shards[rank].commit()
    for shard in shards:
        shard.close()
    assert main.merge_shards() == 480
    assert main.merge_shards() == 0  # idempotent
    main.verify()
    merged = SketchStore.open(tmp_path / "ddp", verify="full")
    for c in ("a", "b"):
        assert _by_id(merged, c) == _by_id(single, c)
    q = clustered(7, 16, seed=2)
    for c in ("a", "b", "tracin"):
        queries = q if c != "tracin" else merged.concat_queries([q, q])
        s1, i1 = single.search(queries, 10, checkpoint=c)
        s2, i2 = merged.search(queries, 10, checkpoint=c)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-6)
    assert inspect_store(tmp_path / "ddp")["shards"] == ["rank0", "rank1"]
    # more rows on a shard after the first merge are picked up by the next one
    late = SketchStore.open_shard(tmp_path / "ddp", 1)
    late.append([1000], q[:1], checkpoint="a")
    late.commit()
    late.close()
    assert main.merge_shards() == 1 and main.checkpoint_info("a")["rows"] == 241


def test_merge_rejects_overlapping_ids_and_conflicts(tmp_path, spec):
    main = SketchStore.create(tmp_path / "s", spec)
    x = clustered(20, 16, seed=3)
    for rank in (0, 1):
        shard = SketchStore.open_shard(tmp_path / "s", rank)
        shard.add_checkpoint("a", step=1, lr=0.1)
        shard.append(np.arange(10) + 5 * rank, x[:10], checkpoint="a")  # ids 5..9 on both ranks
        shard.commit()
        shard.close()
    with pytest.raises(DuplicateIdError, match=r"rank1 holds id\(s\) \[5, 6, 7, 8, 9\]"):
        main.merge_shards()
    assert SketchStore.open(tmp_path / "s").num_rows == 0  # nothing half-merged
    other = SketchStore.create(tmp_path / "t", spec)
    other.add_checkpoint("a", step=1, lr=0.5)
    shard = SketchStore.open_shard(tmp_path / "t", 3)
    shard.add_checkpoint("a", step=1, lr=0.1)
    shard.commit()
    shard.close()
    other.commit()
    with pytest.raises(SketchMismatchError, match="Checkpoint 'a' has"):
        other.merge_shards()
    with pytest.raises(SketchMismatchError, match="seed: stored 0 vs given 1"):
        SketchStore.open_shard(tmp_path / "t", 0, spec={**spec, "seed": 1})
    with pytest.raises(StoreNotFoundError, match="directory missing"):
        SketchStore.open_shard(tmp_path / "missing", 0)
    with pytest.raises(Exception, match="`rank` must be a non-negative int"):
        shard_path(tmp_path, -1)
