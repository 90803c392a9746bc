"""``lightning-sketch report`` on a hostile run directory (issue 11, findings 2 and 7).

Every string from a file is escaped, text drawn in figures is never parsed as mathtext, files
that are links out of the run, devices or FIFOs are refused at once, and a damaged file is
reported in its section instead of aborting the report.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from lightning_sketch.io.safeio import dump_checked_json, write_checked_json
from lightning_sketch.exceptions import StoreCorruptError
from lightning_sketch.report import build_report, write_report

SCRIPT = "<script>alert(1)</script>"
MATH = r"$\frac{$"


def _query_doc(**over) -> dict:
    doc = {"format": "lightning_sketch.query/v1", "method": "tracin", "split": "test", "store": "s", "ckpt": "c",
           "k": 1, "queries": [{"query": 0, "label": 1, "prediction": 1,
                                "proponents": [{"id": 3, "score": 0.5, "label": 1}],
                                "opponents": [{"id": 4, "score": -0.5, "label": 2}]}]}
    doc.update(over)
    return doc


def _no_live_markup(text: str) -> None:
    assert "<script" not in text.lower() and "onerror=" not in text.lower()


def test_strings_from_every_file_kind_are_escaped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # query.json with a valid checksum: the attacker wrote it with the library's own writer
    write_checked_json(run / "query.json", _query_doc(method=SCRIPT, k=SCRIPT, split=SCRIPT))
    (run / "metrics.csv").write_text(f"step,{SCRIPT},{MATH}_loss\n1,0.5,0.25\n2,0.4,0.2\n")
    write_checked_json(run / "intrinsic_dimension.json", {"mode": SCRIPT, "d_star": SCRIPT, "target": 0.9,
                                                          "history": [{"d": 4, "metric": 0.5, "action": SCRIPT}]})
    text = build_report(run)
    _no_live_markup(text)
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # method, k, metric name, intrinsic fields
    assert "k=&lt;script&gt;" in text


def test_hostile_run_name_is_escaped(tmp_path):
    """The run directory's own name (title, heading) goes through Jinja2 autoescaping too."""
    run = tmp_path / '<script>alert(1)<"x">&amp;'
    run.mkdir()
    text = build_report(run)
    _no_live_markup(text)
    assert "<title>lightning_sketch report: &lt;script&gt;alert(1)&lt;&#34;x&#34;&gt;&amp;amp;</title>" in text
    assert "&lt;script&gt;alert(1)" in text.split("<h1>")[1]


def test_mathtext_labels_are_plain_text(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(f"step,{MATH}_loss,acc_{MATH}\n1,0.5,0.1\n2,0.4,0.2\n")
    write_checked_json(run / "intrinsic_dimension.json", {"d_star": 8, "target": 0.9, "history": [
        {"d": 4, "step": 1, "metric": 0.5, "action": MATH}, {"d": 8, "step": 2, "metric": 0.95, "action": "done"}]})
    text = build_report(run)  # raised ValueError from mathtext before
    metrics = text.split('<section id="metrics">')[1].split("</section>")[0]
    assert "data:image/png;base64," in metrics and MATH.replace("\\", "\\") in metrics


def test_links_devices_and_fifos_are_refused_quickly(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_checked_json(outside / "query.json", _query_doc(method="SECRET-OUTSIDE"))
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("/dev/zero", run / "notes.json")
    os.symlink(outside / "query.json", run / "query.json")
    os.mkfifo(run / "queries.json")
    (run / "sub").mkdir()
    os.symlink("/dev/zero", run / "sub" / "metrics.csv")
    os.symlink(outside, run / "linked_dir")  # a symlinked folder is not walked
    start = time.monotonic()
    text = build_report(run)
    assert time.monotonic() - start < 5.0  # the figure-free report; /dev/zero made it read 2.1 GB before
    assert "SECRET-OUTSIDE" not in text
    assert re.search(r"query\.json is refused: .*outside the run directory", text)
    assert re.search(r"queries\.json is refused: .*a FIFO", text)
    assert re.search(r"metrics\.csv is unreadable: .*symlink to &#39;/dev/zero&#39;, outside the run", text)


def test_tampered_query_and_intrinsic_files_are_reported_not_rendered(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = dump_checked_json(_query_doc())
    (run / "query.json").write_bytes(good.replace(b'"score": 0.5', b'"score": 9.5'))
    state = dump_checked_json({"d_star": 32, "target": 0.9, "history": []})
    (run / "intrinsic_dimension.json").write_bytes(state.replace(b"32", b"64"))
    text = build_report(run)
    assert "query.json is refused" in text and "9.5" not in text
    assert "intrinsic_dimension.json is refused" in text and "D* = 64" not in text
    with pytest.raises(StoreCorruptError, match="checksum"):
        build_report(run, queries=run / "query.json")


def test_one_bad_snapshot_does_not_abort_the_report(tmp_path):
    from lightning_sketch.spectrum.snapshot import save_snapshot

    run = tmp_path / "run"
    for step in (0, 5, 10):
        save_snapshot(run / "spectrum", step, {"eigenvalues": torch.tensor([3.0 + step, 1.0], dtype=torch.float64),
                                               "eigenvectors": torch.eye(2, 4)}, {"scalars": {"lambda_max": 3.0}})
    snap = run / "spectrum" / "step_00000005.npz"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    text = build_report(run)
    spectrum = text.split('<section id="spectrum">')[1].split("</section>")[0]
    assert "2 snapshots" in spectrum and "snapshot at step 5 is refused" in spectrum


def test_write_report_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, run / "report.html")
    out = write_report(run)
    assert victim.read_text() == "keep me" and not out.is_symlink() and "<!DOCTYPE html>" in out.read_text()
    assert [p.name for p in run.iterdir()] == ["report.html"]  # no temporary file left


def _section(text: str, sid: str) -> str:
    return text.split(f'<section id="{sid}">')[1].split("</section>")[0]


@pytest.mark.parametrize("damage", ["edited", "overflow", "truncated"])
def test_a_damaged_spectrum_index_is_named_and_the_rest_rendered(tmp_path, damage):
    from lightning_sketch.spectrum.snapshot import save_snapshot

    run = tmp_path / "run"
    for step in (0, 5):
        save_snapshot(run / "spectrum", step, {"eigenvalues": torch.tensor([3.0 + step, 1.0], dtype=torch.float64),
                                               "eigenvectors": torch.eye(2, 4)}, {"scalars": {"lambda_max": 3.0}})
    write_checked_json(run / "intrinsic_dimension.json", {"d_star": 32, "target": 0.9,
                                                          "history": [{"d": 4, "metric": 0.5}]})
    index = run / "spectrum" / "index.json"
    raw = index.read_bytes()
    index.write_bytes({"edited": raw.replace(b'"generation": 2', b'"generation": 7'),
                       "overflow": raw.replace(b'"generation": 2', b'"generation": 1e999'),
                       "truncated": raw[: len(raw) // 2]}[damage])
    text = build_report(run)
    spectrum = _section(text, "spectrum")
    assert re.search(r"damaged: spectrum/index\.json: .*(checksum|non-finite|not valid JSON)", spectrum), spectrum
    assert "callback was not used" not in spectrum
    assert "D* = 32" in _section(text, "intrinsic")  # the other sections are still rendered


def test_pictures_are_capped_whatever_k(tmp_path):
    """``query --k 1000`` then ``report``: ten pictures per query, the rest listed, in seconds."""
    run = tmp_path / "run"
    run.mkdir()
    k = 1000
    rec = {"query": 0, "label": 1, "prediction": 1, "image": [[0.0, 1.0], [1.0, 0.0]],
           "proponents": [{"id": i, "score": 1.0 / (i + 1), "label": 1, "image": [[1.0, 0.0], [0.0, 1.0]]}
                          for i in range(k)],
           "opponents": [{"id": k + i, "score": -1.0 / (i + 1), "label": 2, "image": [[0.0, 0.0], [1.0, 1.0]]}
                         for i in range(k)]}
    write_checked_json(run / "query.json", _query_doc(k=k, queries=[rec, {**rec, "query": 1}]))
    start = time.perf_counter()
    text = build_report(run)
    assert time.perf_counter() - start < 60
    attribution = _section(text, "attribution")
    assert "at most 10 training examples per query" in attribution and f"{2 * (2 * k - 10)} more" in attribution
    assert attribution.count("<tr>") == 1 + 2 * 2 * k  # the table still lists every example
