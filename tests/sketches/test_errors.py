"""Bad configurations and inputs raise typed errors with a message naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from sketch_cases import RANDOM_PARAMS

from lightning_sketch.exceptions import SketchConfigError, SketchInputError, SketchMemoryError
from lightning_sketch.sketches import make


@pytest.mark.parametrize(("kind", "opts"), RANDOM_PARAMS)
def test_bad_dimensions(kind, opts):
    with pytest.raises(SketchConfigError, match=r"`sketch_dim` must be <= `dim` \(got 65 > 64\)"):
        make(kind, 64, 65, **opts)
    with pytest.raises(SketchConfigError, match="`sketch_dim` must be a positive int, got 0"):
        make(kind, 64, 0, **opts)
    with pytest.raises(SketchConfigError, match="`sketch_dim` must be a positive int, got -4"):
        make(kind, 64, -4, **opts)
    with pytest.raises(SketchConfigError, match=r"`dim` must be a positive int, got 64.0 \(float\)"):
        make(kind, 64.0, 16, **opts)
    with pytest.raises(SketchConfigError, match=r"`sketch_dim` must be a positive int, got '16' \(str\)"):
        make(kind, 64, "16", **opts)
    with pytest.raises(SketchConfigError, match="`seed` must be an int"):
        make(kind, 64, 16, seed=0.5, **opts)


@pytest.mark.parametrize(("kind", "opts"), RANDOM_PARAMS)
def test_bad_inputs(kind, opts):
    s = make(kind, 64, 16, **opts)
    with pytest.raises(SketchInputError, match=r"last dimension dim \(N\) = 64 .* got shape \(3, 63\)"):
        s.apply(torch.randn(3, 63))
    with pytest.raises(
        SketchInputError, match=r"last dimension sketch_dim \(D\) = 16 .* got shape \(3, 64\)"
    ):
        s.transpose(torch.randn(3, 64))
    with pytest.raises(SketchInputError, match=r"real floating tensor, got dtype torch.int64"):
        s.apply(torch.ones(3, 64, dtype=torch.int64))
    with pytest.raises(SketchInputError, match=r"real floating tensor, got dtype torch.complex64"):
        s.apply(torch.ones(3, 64, dtype=torch.complex64))
    with pytest.raises(SketchInputError, match="must be a torch.Tensor, got list"):
        s.apply([0.0] * 64)
    with pytest.raises(SketchInputError, match="got shape \\(\\)"):
        s.apply(torch.tensor(1.0))


def test_unknown_kind_and_option():
    with pytest.raises(SketchConfigError, match=r"Unknown sketch kind 'fastfood'; choose one of"):
        make("fastfood", 64, 16)
    with pytest.raises(
        SketchConfigError,
        match=r"Unknown option\(s\) \['block'\] for sketch kind 'affd'; known options: max_block, preconditioner",
    ):
        make("affd", 64, 16, block=32)
    with pytest.raises(
        SketchConfigError, match=r"Unknown option\(s\) \['preconditioner'\] for sketch kind 'qk'"
    ):
        make("qk", 64, 16, preconditioner="fft")


@pytest.mark.parametrize("kind", ["affd", "afjl"])
def test_bad_option_values(kind):
    with pytest.raises(
        SketchConfigError,
        match=r"`preconditioner` must be one of \['hadamard', 'fft', 'kron_orthogonal'\], got 'dct'",
    ):
        make(kind, 64, 16, preconditioner="dct")
    for bad in (3, 0, 2048, 32.0, True):
        with pytest.raises(SketchConfigError, match=r"`max_block` must be a power of two between 2 and 1024"):
            make(kind, 64, 16, max_block=bad)


def test_bad_option_values_other_kinds():
    with pytest.raises(SketchConfigError, match="`max_block` must be a power of two"):
        make("qk", 64, 16, max_block=12)
    with pytest.raises(SketchConfigError, match="`nnz_per_row` must be a positive int, got 0"):
        make("fjl", 64, 16, nnz_per_row=0)
    with pytest.raises(SketchConfigError, match="`chunked` must be a bool"):
        make("dense", 64, 16, chunked="yes")


def test_ffd_needs_power_of_two_d():
    with pytest.raises(
        SketchConfigError,
        match=r"kind='ffd' needs `sketch_dim` to be a power of two .* got 12; use sketch_dim=8 or 16",
    ):
        make("ffd", 64, 12)


def test_dense_refuses_huge_matrix_and_offers_chunked():
    with pytest.raises(SketchMemoryError, match="pass chunked=True"):
        make("dense", 2**20, 2**12)
    assert make("dense", 2**20, 2**12, chunked=True).state_bytes == 0


def test_sketches_are_immutable():
    s = make("affd", 64, 16)
    with pytest.raises(AttributeError, match="immutable"):
        s.seed = 3
