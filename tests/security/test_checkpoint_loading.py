"""Checkpoints and weights files are loaded without unpickling code (issue 11, finding 1)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from lightning_sketch.io.safeio import load_torch_file
from lightning_sketch.cli.commands import load_checkpoint_into
from lightning_sketch.exceptions import (
    CheckpointLoadError,
    LayoutMismatchError,
    StoreNotFoundError,
    UnsafeFileError,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def test_the_payload_really_runs_under_an_unrestricted_load(tmp_path, payload):
    obj, marker = payload  # the control: proves the payload is live, so the tests below can fail
    torch.save({"state_dict": {}, "x": obj}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["top", "state_dict", "hyper_parameters", "callbacks"])
def test_pickle_payload_in_a_checkpoint_never_runs(tmp_path, payload, where):
    obj, marker = payload
    net = _net()
    ckpt = {"state_dict": net.state_dict(), "hyper_parameters": {"lr": 0.1}, "callbacks": {"GradientSketch": {}}}
    if where == "top":
        ckpt["evil"] = obj
    else:
        ckpt[where] = {**ckpt[where], "evil": obj}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointLoadError, match="can run arbitrary code"):
        load_checkpoint_into(_net(), tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointLoadError, match="weights_only=True"):
        load_torch_file(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_a_real_checkpoint_loads_exactly(tmp_path):
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    import argparse
    import pathlib

    torch.save({"state_dict": net.state_dict(), "hyper_parameters": {"hidden": 3, "name": "x"}, "epoch": 1,
                "hparams": argparse.Namespace(root=pathlib.Path("/tmp/run"))}, tmp_path / "ok.ckpt")
    other = _net()
    load_checkpoint_into(other, tmp_path / "ok.ckpt")
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_text_foreign_and_truncated_checkpoints_give_typed_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointLoadError, match="not a readable PyTorch file"):
        load_checkpoint_into(_net(), tmp_path / "notes.txt")
    wide = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    torch.save({"state_dict": wide.state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(LayoutMismatchError, match="does not fit the model"):
        load_checkpoint_into(_net(), tmp_path / "wide.ckpt")
    torch.save({"state_dict": _net().state_dict()}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError):
        load_checkpoint_into(_net(), tmp_path / "cut.ckpt")
    torch.save({"state_dict": {"w": "not a tensor"}}, tmp_path / "strs.ckpt")
    with pytest.raises(CheckpointLoadError, match="no state_dict of tensors"):
        load_checkpoint_into(_net(), tmp_path / "strs.ckpt")
    with pytest.raises(StoreNotFoundError):
        load_checkpoint_into(_net(), tmp_path / "missing.ckpt")


def test_device_and_fifo_checkpoints_are_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        start = time.monotonic()
        with pytest.raises(UnsafeFileError, match="not a regular file|a FIFO|a device|a directory"):
            load_torch_file(path)
        assert time.monotonic() - start < 1.0


def test_query_inputs_of_the_wrong_shape_or_without_x_give_typed_errors(tmp_path):
    import argparse

    import numpy as np

    from lightning_sketch.cli.commands import _query_batch
    from lightning_sketch.exceptions import SketchInputError

    net = _net()
    cases = {
        "wrong_width.npy": (np.zeros((2, 7), np.float32), "do not fit the model"),
        "no_x.npz": ({"inputs": np.zeros((2, 4), np.float32)}, "without an array 'x'"),
        "labels.npz": ({"x": np.zeros((2, 4), np.float32), "y": np.zeros(3)}, r"labels y must have shape \[2\]"),
        "strings.npy": (np.array(["a", "b"]), "not a readable numeric"),
    }
    for name, (arr, match) in cases.items():
        path = tmp_path / name
        if name.endswith(".npz"):
            np.savez(path, **arr)
        else:
            np.save(path, arr)
        with pytest.raises(SketchInputError, match=match):
            _query_batch(argparse.Namespace(inputs=str(path)), net, None)
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(SketchInputError, match="not a readable numeric"):
        _query_batch(argparse.Namespace(inputs=str(tmp_path / "text.npy")), net, None)
    np.save(tmp_path / "ok.npy", np.zeros((3, 4), np.float32))
    batch, ids = _query_batch(argparse.Namespace(inputs=str(tmp_path / "ok.npy")), net, None)
    assert ids == [0, 1, 2] and batch["x"].shape == (3, 4) and batch["y"].shape == (3,)
