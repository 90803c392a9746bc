"""``sweep_temp_files``: what a writer removes when it takes over a directory a killed run left."""

from __future__ import annotations

import os
import re

from lightning_sketch.io.safeio import sweep_temp_files
from lightning_sketch.spectrum.snapshot import SnapshotWriter


def test_a_symlinked_folder_is_not_swept(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (elsewhere / "notes.txt.tmp-abcdefgh").write_text("user data")
    os.symlink(elsewhere, run / "weights")
    assert sweep_temp_files(run / "weights") == []
    assert (elsewhere / "notes.txt.tmp-abcdefgh").read_text() == "user data"
    assert sweep_temp_files(elsewhere) == ["notes.txt.tmp-abcdefgh"]  # the same folder, not through a link
    assert not (elsewhere / "notes.txt.tmp-abcdefgh").exists()


def test_only_regular_files_of_the_given_targets_are_removed(tmp_path):
    names = ["a.npz.tmp-12345678", "b.json.tmp-abcdefgh", "a.npz.tmp-short", "c.npz", "link.npz.tmp-abcdefgh"]
    for name in names[:4]:
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "c.npz", tmp_path / "link.npz.tmp-abcdefgh")
    (tmp_path / "dir.npz.tmp-abcdefgh").mkdir()
    own = re.compile(r"a\.npz|link\.npz|dir\.npz")
    assert sweep_temp_files(tmp_path, targets=own) == ["a.npz.tmp-12345678"]
    assert sweep_temp_files(tmp_path, targets=["b.json"]) == ["b.json.tmp-abcdefgh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + ["dir.npz.tmp-abcdefgh"])
    assert sweep_temp_files(tmp_path / "missing") == []


def test_a_spectrum_writer_sweeps_only_its_own_files_in_the_users_folder(tmp_path):
    own = ["index.json.tmp-abcdefgh", "step_00000003.npz.tmp-12345678", "spectrum.png.tmp-a1b2c3d4"]
    users = ["model.tmp-20240101", "notes.txt.tmp-abcdefgh", "step_3.npz.tmp-12345678"]
    for name in own + users:
        (tmp_path / name).write_text("x")
    SnapshotWriter(tmp_path).close()  # sweeps once it holds the folder's lock
    left = {p.name for p in tmp_path.iterdir()}
    assert set(users) <= left and not set(own) & left
