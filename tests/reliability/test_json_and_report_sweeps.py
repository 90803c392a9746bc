"""Seeded sweeps over the JSON files of a run directory (``tests/security/runkit.py``; the full sweeps
behind docs/reliability.md are ``benchmarks/reliability.py``).

- Non-finite numbers (``NaN``, ``Infinity``, ``-Infinity``, ``1e999``) in place of numbers of every JSON
  kind a run writes (store manifest, curvature sidecar, spectrum index, intrinsic-dimension state,
  query result), with every checksum that covers the file re-recorded, so that only the parser can
  refuse them: every reader raises a typed error.
- Hostile values (markup, TeX, huge strings, wrong types, deep nesting, dicts) in the files the report
  draws, checksums re-recorded: the report is built, names the file or draws it escaped; never a
  traceback, a hang or unescaped markup.
"""

from __future__ import annotations

import json

import pytest
from security import runkit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return runkit.build(tmp_path_factory.mktemp("json"))


@pytest.mark.parametrize("kind", list(runkit.JSON_READERS))
def test_rewritten_checksums_are_accepted(run, kind):
    """The sweeps' rewrite re-records checksums correctly: a number rewritten to its own value reads as
    the intact run, so a refusal in the sweep below comes from the non-finite number itself."""
    readers = runkit.JSON_READERS[kind]
    refs = [r(run) for r in readers]
    f = sorted(run.glob(runkit.KINDS[kind][0]))[0]
    backup = {p: p.read_bytes() for p in (f, run / "store" / "manifest.json")}
    doc = json.loads(backup[f])
    try:
        for path in runkit._leaves(doc, numbers=True)[:3]:
            value = doc
            for key in path:
                value = value[key]
            runkit._rewrite(run, kind, f, doc, path, json.dumps(value), value)
            assert f.read_bytes() != backup[f] or kind != "curvature sidecar"
            outcomes = [runkit.classify(r, run, ref)[0] for r, ref in zip(readers, refs)]
            assert outcomes == ["same"] * len(readers)
    finally:
        for p, data in backup.items():
            p.write_bytes(data)


@pytest.mark.parametrize("kind", list(runkit.JSON_READERS))
def test_nonfinite_numbers_are_refused_by_every_reader(run, kind):
    refs = [r(run) for r in runkit.JSON_READERS[kind]]
    out = runkit.nonfinite_sweep(run, kind, refs, per_file=2, seed=len(kind))
    assert out["tried"] == out["numbers"] * len(runkit.NONFINITE) * len(refs) > 0
    assert out["silent"] == [] and out["untyped"] == [], out
    assert out["typed"] == out["tried"]


@pytest.mark.parametrize("kind", runkit.REPORT_KINDS)
def test_hostile_values_in_report_files_are_named_or_drawn_escaped(run, kind):
    out = runkit.hostile_report_sweep(run, kind, cases=5, seed=len(kind), timeout=120)
    assert out["tried"] == 5
    assert out["markup"] == [] and out["untyped"] == [] and out["hang"] == [], out


@pytest.mark.parametrize("kind,path,drawn", [
    ("spectrum index", ("snapshots", 1, "scalars", "lambda_max"), True),
    ("intrinsic-dimension state", ("history", 1, "action"), True),
    ("query result", ("queries", 0, "proponents", 0, "label"), False),
])
def test_a_dict_read_from_a_file_is_drawn_as_text_in_a_table_cell(run, kind, path, drawn):
    """A table cell that holds a dict read from a file is drawn as escaped text, not taken for a styled
    cell (whose missing fields made the template raise); the query check refuses a non-integer label."""
    from lightning_sketch.report import build_report

    f = sorted(run.glob(runkit.KINDS[kind][0]))[0]
    backup = f.read_bytes()
    value = {"<xss-probe>": "</table><xss-probe>"}
    try:
        runkit._rewrite(run, kind, f, json.loads(backup), path, json.dumps(value), value)
        html = build_report(run)
    finally:
        f.write_bytes(backup)
    assert "<xss-probe" not in html
    if drawn:
        assert "&lt;xss-probe&gt;" in html
    else:
        assert f"{f.name} is not a valid query result" in html
