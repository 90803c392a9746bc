"""The seed derivation (``derive_seed``) against values recorded once, and its stream separation.

``tests/sketches/test_reference.py`` redraws every kind's random state through the package's own
``derive_seed``, so it cannot notice a change in the hashing itself (e.g. one that ignored the
stream name). These literal values pin it: a change here changes every stored sketch.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sketch.sketches import derive_seed, make

# (seed, kind, stream) -> derive_seed, recorded once.
GOLDEN = [
    (0, "affd", "signs", 1212131379855369030),
    (1, "affd", "signs", 8292548730675418474),
    (0, "affd", "perm", 8486166671007620677),
    (0, "per_layer", "block/0/L", 2418129755299198120),
    (123456789, "qk", "block/3/R", 3340911558562260413),
    (-5, "dense", "matrix", 3045715998880660336),
]


@pytest.mark.parametrize(("seed", "kind", "stream", "expected"), GOLDEN)
def test_derive_seed_golden(seed, kind, stream, expected):
    assert derive_seed(seed, kind, stream) == expected


@pytest.mark.parametrize(("seed", "kind", "stream", "expected"), GOLDEN)
def test_derive_seed_matches_its_documented_hash(seed, kind, stream, expected):
    # blake2b-64 of "lightning_sketch/v1/{kind}/{seed}/{stream}", little endian, top bit cleared.
    digest = hashlib.blake2b(f"lightning_sketch/v1/{kind}/{seed}/{stream}".encode(), digest_size=8).digest()
    assert int.from_bytes(digest, "little") & ((1 << 63) - 1) == expected


def test_sketch_generators_are_seeded_by_derive_seed():
    s = make("dense", dim=8, sketch_dim=2, seed=1)
    assert s.generator("signs").initial_seed() == derive_seed(1, "dense", "signs")
    assert make("affd", dim=8, sketch_dim=2, seed=0).generator("signs").initial_seed() == GOLDEN[0][3]


_names = st.text(min_size=0, max_size=20)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), kind=_names, a=_names, b=_names)
def test_different_streams_give_different_seeds(seed, kind, a, b):
    if a != b:
        assert derive_seed(seed, kind, a) != derive_seed(seed, kind, b)
    else:
        assert derive_seed(seed, kind, a) == derive_seed(seed, kind, b)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(-(2**40), 2**40), stream=_names)
def test_seed_and_kind_separate_streams(seed, stream):
    base = derive_seed(seed, "affd", stream)
    assert 0 <= base < 2**63
    assert derive_seed(seed + 1, "affd", stream) != base
    assert derive_seed(seed, "afjl", stream) != base


def test_streams_of_one_sketch_are_distinct():
    names = ["signs", "perm", "gauss", "block/0/L", "block/0/R", "block/1/L", "block/10/L", "matrix"]
    seeds = {derive_seed(0, "per_layer", n) for n in names}
    assert len(seeds) == len(names)
