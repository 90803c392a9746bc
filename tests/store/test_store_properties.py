"""Hypothesis invariants of append / commit / search on small random stores."""

from __future__ import annotations

import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sketch.store import SketchStore

SPEC = {"kind": "dense", "dim": 64, "sketch_dim": 4, "seed": 0}

batches = st.lists(
    st.lists(st.integers(0, 40), min_size=1, max_size=8),
    min_size=1,
    max_size=5,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches, commit_mask=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 100))
def test_store_holds_exactly_the_committed_unique_rows(batches, commit_mask, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        store = SketchStore.create(d + "/s", SPEC)
        store.add_checkpoint("c")
        reference: dict[int, np.ndarray] = {}
        committed: dict[int, np.ndarray] = {}
        for ids, do_commit in zip(batches, commit_mask):
            rows = rng.integers(-3, 4, size=(len(ids), 4)).astype(np.float32)
            store.append(ids, rows, on_duplicate="skip")
            for i, r in zip(ids, rows):
                reference.setdefault(i, r)
            if do_commit:
                store.commit()
                committed = dict(reference)
        store.close()
        reader = SketchStore.open(d + "/s")
        assert reader.num_rows == len(committed)
        got = {int(i): r for i, r in zip(reader.ids("c"), np.asarray(reader.vectors("c")))} if committed else {}
        assert got.keys() == committed.keys()
        for i in committed:
            np.testing.assert_array_equal(got[i], committed[i])
        if committed:
            q = rng.integers(-3, 4, size=(3, 4)).astype(np.float32)
            k = min(3, len(committed))
            scores, ids = reader.search(q, k)
            ref_s, _ = reader.search_exact(q, k)
            np.testing.assert_array_equal(scores, ref_s)  # small integers: exact in float32
            for qi in range(3):
                assert len(set(ids[qi])) == k
                np.testing.assert_array_equal(np.array([committed[int(i)] @ q[qi] for i in ids[qi]]), scores[qi])
