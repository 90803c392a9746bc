"""Hypothesis fuzzing of the sketch and store APIs with hostile arguments (what tests/sketches and
tests/store do not already cover: wrong types and values, hostile id arrays, rollback to any
generation, hand edits of the recorded sketch spec).

Each property is "a valid result, or one of the library's typed errors": never a TypeError,
ValueError or a crash inside FAISS/numpy, and never silently altered data.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sketch.exceptions import (
    DuplicateIdError,
    LightningSketchError,
    NonFiniteGradientError,
    SketchConfigError,
    SketchInputError,
    StoreCorruptError,
)
from lightning_sketch.sketches import make
from lightning_sketch.store import SketchStore

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = {"kind": "dense", "dim": 64, "sketch_dim": 4, "seed": 0}

junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4), st.lists(st.integers(), max_size=2))
small_int = st.integers(-3, 300)


@SETTINGS
@given(
    kind=st.one_of(st.sampled_from(["identity", "dense", "fjl", "ffd", "affd", "afjl", "qk"]), junk),
    dim=st.one_of(small_int, junk),
    sketch_dim=st.one_of(small_int, junk),
    seed=st.one_of(st.integers(-(2**70), 2**70), junk),
)
def test_make_builds_a_working_sketch_or_raises_sketch_config_error(kind, dim, sketch_dim, seed):
    try:
        sketch = make(kind, dim, sketch_dim, seed=seed)
    except SketchConfigError:
        return
    x = torch.ones(2, sketch.dim, dtype=torch.float64)
    y = sketch.apply(x)
    assert y.shape == (2, sketch.sketch_dim) and torch.isfinite(y).all()
    assert sketch.transpose(y).shape == x.shape
    assert (sketch.dim, sketch.sketch_dim) == (dim, sketch_dim) or kind == "identity"


id_arrays = st.one_of(
    st.lists(st.integers(-(2**64), 2**64), min_size=1, max_size=6).map(lambda v: np.array(v, dtype=object)),
    st.lists(st.integers(-5, 2**63 - 1), min_size=1, max_size=6).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=6).map(lambda v: np.array(v, dtype=np.uint64)),
    st.lists(st.floats(-10, 10), min_size=1, max_size=6).map(np.array),
    st.lists(st.booleans(), min_size=1, max_size=6).map(np.array),
    st.lists(st.integers(0, 20), min_size=1, max_size=6).map(torch.tensor),
)


@SETTINGS
@given(ids=id_arrays, nan_row=st.booleans(), seed=st.integers(0, 50))
def test_append_stores_exactly_the_ids_given_or_raises_typed_errors(ids, nan_row, seed):
    rows = np.random.default_rng(seed).normal(size=(len(ids), 4)).astype(np.float32)
    if nan_row:
        rows[0, 0] = np.nan
    with tempfile.TemporaryDirectory() as d:
        store = SketchStore.create(d + "/s", SPEC)
        store.add_checkpoint("c", step=0, lr=0.1)
        try:
            store.append(ids, rows)
        except (SketchInputError, DuplicateIdError, NonFiniteGradientError):
            store.close()
            assert SketchStore.open(d + "/s").num_rows == 0
            return
        store.commit()
        store.close()
        want = [int(i) for i in np.asarray(ids).tolist()]
        assert all(isinstance(i, int) and 0 <= i < 2**63 for i in np.asarray(ids).tolist())  # accepted only if exact
        assert not nan_row and len(set(want)) == len(want)
        reader = SketchStore.open(d + "/s")
        assert reader.ids("c").tolist() == want
        np.testing.assert_array_equal(np.asarray(reader.vectors("c")), rows)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5), back=st.integers(0, 5))
def test_rollback_to_any_generation_gives_that_generations_rows(sizes, back):
    with tempfile.TemporaryDirectory() as d:
        store = SketchStore.create(d + "/s", SPEC)
        snapshots = {store.generation: {}}
        rows_so_far: dict[str, list[int]] = {}
        for j, n in enumerate(sizes):
            name = f"c{j}"
            store.add_checkpoint(name, step=j, lr=0.1)
            ids = list(range(100 * j, 100 * j + n))
            if ids:
                store.append(ids, np.full((n, 4), j, np.float32), checkpoint=name)
            gen = store.commit()
            rows_so_far[name] = ids
            snapshots[gen] = {k: list(v) for k, v in rows_so_far.items()}
        target = sorted(snapshots)[min(back, len(snapshots) - 1)]
        store.rollback(target)
        store.close()
        reader = SketchStore.open(d + "/s", verify="full")
        reader.verify()
        assert reader.checkpoints == sorted(snapshots[target], key=lambda c: int(c[1:]))
        for name, ids in snapshots[target].items():
            assert reader.ids(name).tolist() == ids


spec_edits = st.tuples(
    st.sampled_from(["kind", "dim", "sketch_dim", "seed", "extra"]),
    st.one_of(st.integers(-5, 10**6), st.text(max_size=5), st.none(), st.floats(allow_nan=False)),
)


@pytest.fixture(scope="module")
def committed_store():
    with tempfile.TemporaryDirectory() as d:
        store = SketchStore.create(d + "/s", SPEC)
        store.add_checkpoint("c", step=0, lr=0.1)
        store.append([0, 1, 2], np.ones((3, 4), np.float32))
        store.commit()
        store.close()
        yield Path(d) / "s"


@SETTINGS
@given(edit=spec_edits)
def test_any_hand_edit_of_the_spec_is_refused(committed_store, edit):
    key, value = edit
    manifest = committed_store / "manifest.json"
    original = manifest.read_text()
    data = json.loads(original)
    if data["spec"].get(key, object()) == value:
        return
    data["spec"][key] = value
    try:
        manifest.write_text(json.dumps(data))
        # (NaN/inf values make the manifest invalid JSON for the reader, which refuses them first)
        with pytest.raises(StoreCorruptError, match="spec was edited by hand|non-finite constant"):
            SketchStore.open(committed_store)
    finally:
        manifest.write_text(original)
    assert SketchStore.open(committed_store).num_rows == 3


def test_typed_errors_share_the_library_base():
    for err in (DuplicateIdError, NonFiniteGradientError, SketchConfigError, SketchInputError, StoreCorruptError):
        assert issubclass(err, LightningSketchError)
