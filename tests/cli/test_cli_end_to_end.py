"""The ``lightning-sketch`` console command in subprocesses: fit, query, report, inspect and errors."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses and whole training runs


def test_fit_writes_store_checkpoint_and_both_loggers(tiny_run):
    root = tiny_run["root"]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    manifest = json.loads((root / "sketch" / "store" / "manifest.json").read_text())
    # two epochs -> two checkpoint slices of 96 training examples each
    assert [c["rows"] for c in manifest["checkpoints"]] == [96, 96]
    # CSV and TensorBoard loggers declared in YAML both received the metrics
    metrics = (root / "logs" / "csv" / "metrics.csv").read_text()
    assert "val_acc" in metrics and "train_loss" in metrics
    assert list((root / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # HessianSpectrum snapshots at the scheduled steps, readable by the spectrum package
    from lightning_sketch.spectrum.snapshot import load_index

    assert [e["step"] for e in load_index(root / "spectrum")] == [0, 6]
    # the resolved config was saved with interpolations applied
    saved = (root / "logs" / "csv" / "config.yaml").read_text()
    assert f"dirpath: {root}/sketch" in saved and "${" not in saved


def test_query_json_matches_in_process_attributor(tiny_run):
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.demo import DigitsClassifier

    assert tiny_run["query"]["returncode"] == 0, tiny_run["query"]["stderr"][-3000:]
    result = json.loads((tiny_run["root"] / "query.json").read_text())
    assert result["method"] == "trak" and result["k"] == 4  # the default: the run holds the margin kernel
    assert [q["query"] for q in result["queries"]] == [0, 3, 5]
    manifest = json.loads((tiny_run["root"] / "sketch" / "store" / "manifest.json").read_text())
    assert result["stores"] == [{"run_id": manifest["run_id"], "generation": manifest["generation"]}]
    model = DigitsClassifier(hidden=32)
    model.load_state_dict(torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    batch = tiny_run["dm"].batch([0, 3, 5], split="test")
    att = Attributor(tiny_run["root"] / "sketch", model)
    pro_ids, pro_scores = att.top_k(batch, k=4)
    opp_ids, opp_scores = att.top_k(batch, k=4, opponents=True)
    train_labels = tiny_run["dm"].labels("train")
    for q, rec in enumerate(result["queries"]):
        assert rec["label"] == int(batch["y"][q])
        assert [e["id"] for e in rec["proponents"]] == pro_ids[q].tolist()
        assert [e["id"] for e in rec["opponents"]] == opp_ids[q].tolist()
        torch.testing.assert_close(torch.tensor([e["score"] for e in rec["proponents"]], dtype=torch.float64),
                                   pro_scores[q].to(torch.float64), rtol=1e-5, atol=1e-7)
        assert all(e["score"] < 0 for e in rec["opponents"]) or min(opp_scores[q]) >= 0
        assert [e["label"] for e in rec["proponents"]] == train_labels[pro_ids[q]].tolist()
        # pictures of the query and of every listed training example (8x8 digits)
        assert len(rec["image"]) == 8 and all(len(e["image"]) == 8 for e in rec["proponents"] + rec["opponents"])
    # how the damping was set, as the in-process Attributor reports it for the same queries
    want = att.damping_info(batch, k=4)
    got = result["damping"]
    assert (got["kernel"], got["ratio"]) == (want["kernel"], want["ratio"]) == ("margin", want["ratio"])
    assert [s["lambda"] for s in got["slices"]] == pytest.approx([s["lambda"] for s in want["slices"]], rel=1e-9)
    assert got["top_k_overlap"] == pytest.approx(want["top_k_overlap"], abs=1e-12)
    # what a proponent means, and the default second view: grad_cos beside trak, whose top k is that of an
    # independent grad_cos Attributor
    from lightning_sketch.attribution.meaning import meaning

    assert result["meaning"] == meaning("trak", "margin")
    view = result["second_view"]
    assert view["method"] == "grad_cos" and view["meaning"] == meaning("grad_cos", "loss")
    cos = Attributor(tiny_run["root"] / "sketch", model, method="grad_cos")
    for opponents, kind in ((False, "proponents"), (True, "opponents")):
        ids, scores = cos.top_k(batch, k=4, opponents=opponents)
        for q, rec in enumerate(view["queries"]):
            assert rec["query"] == result["queries"][q]["query"]
            assert [e["id"] for e in rec[kind]] == ids[q].tolist()
            assert [e["score"] for e in rec[kind]] == pytest.approx(scores[q].tolist(), rel=1e-6, abs=1e-9)
            assert [e["label"] for e in rec[kind]] == train_labels[ids[q]].tolist()
    # the label agreement of each ranking, counted here by hand from the records
    for doc in (result, {**view, "queries": [{**r, "label": p["label"]} for r, p in zip(view["queries"],
                                                                                        result["queries"])]}):
        pairs = [(e["label"], r["label"]) for r in doc["queries"] for e in r["proponents"]]
        assert doc["summary"]["label_agreement"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))
        assert doc["summary"]["pairs"] == 3 * 4


def test_query_table_prints_meaning_second_view_and_statistics(tiny_run):
    from lightning_sketch.attribution.meaning import meaning

    out = tiny_run["query_table"]
    assert out["returncode"] == 0, out["stderr"][-3000:]
    text = out["stdout"]
    assert f"  proponent: {meaning('trak', 'margin')['proponent']}" in text
    assert "second view: tracin" in text and f"  proponent: {meaning('tracin', 'loss')['proponent']}" in text
    assert text.count(" tracin id ") == 2  # one header per query, the view's columns beside the default's
    assert "trak: " in text and "tracin: " in text and "of top-k proponents share the query's label (2 queries" in text


def test_query_takes_the_query_gradients_once(tiny_run, tmp_path, monkeypatch):
    from lightning_sketch import cli
    from lightning_sketch.cli import commands as cli_commands
    from lightning_sketch.attribution import Attributor

    calls = []
    original = Attributor.query_sketches

    def spy(self, batch, run=0):
        calls.append(self.method)
        return original(self, batch, run=run)

    monkeypatch.setattr(Attributor, "query_sketches", spy)
    out = tmp_path / "q.json"
    args = cli._own_parser().parse_args([
        "query", "--store", str(tiny_run["root"] / "sketch"), "--ckpt", str(tiny_run["ckpt"]), "--config",
        str(tiny_run["cfg"]), "--ids", "0,3", "--k", "3", "--format", "json", "--output", str(out)])
    assert cli_commands.run_query(args, cli.build_from_config) == 0
    doc = json.loads(out.read_text())
    # proponents, opponents and the damping's sensitivity share one computation; the grad_cos view measures
    # the loss, not the margin, and takes its own once
    assert calls == ["trak", "grad_cos"] and doc["damping"]["top_k_overlap"]
    assert doc["second_view"]["method"] == "grad_cos" and doc["second_view"]["shares_query_sketches"] is False


def test_query_inputs_csv_to_stdout(tiny_run):
    out = tiny_run["query_csv"]
    assert out["returncode"] == 0, out["stderr"][-3000:]
    rows = list(csv.DictReader(io.StringIO(out["stdout"])))  # stdout holds the CSV alone
    assert len(rows) == 2 * 2 * 3  # 2 inputs x (proponents, opponents) x k=3
    assert {r["kind"] for r in rows} == {"proponent", "opponent"}
    pro = [r for r in rows if r["query"] == "0" and r["kind"] == "proponent"]
    scores = [float(r["score"]) for r in pro]
    assert [int(r["rank"]) for r in pro] == [1, 2, 3] and scores == sorted(scores, reverse=True)


def test_report_sections(tiny_run):
    assert tiny_run["report"]["returncode"] == 0, tiny_run["report"]["stderr"][-3000:]
    text = tiny_run["html"].read_text()
    assert "Damping on the margin kernel: ratio" in text  # the query result's damping, summarised
    for section in ('id="metrics"', 'id="store"', 'id="attribution"', 'id="spectrum"', 'id="intrinsic"'):
        assert section in text
    assert text.count("data:image/png;base64,") >= 3  # metrics curves, attribution pictures, spectrum
    spectrum = text.split('<section id="spectrum">')[1].split("</section>")[0]
    assert "2 snapshots" in spectrum and "data:image/png;base64," in spectrum
    assert "No intrinsic_dimension.json in this run" in text  # absent sections say so
    assert "sketch/store" in text and "query.json" in text


def test_inspect_human_and_json(tiny_run):
    out = tiny_run["inspect"]
    assert out["returncode"] == 0, out["stderr"]
    assert "health:       OK" in out["stdout"] and "rows:         192" in out["stdout"] and "kind=affd" in out["stdout"]
    js = tiny_run["inspect_json"]  # a run directory finds its store
    info = json.loads(js["stdout"])
    assert js["returncode"] == 0 and info["rows"] == 192 and info["health"]["ok"] and len(info["checkpoints"]) == 2


def test_inspect_corrupt_store_exits_nonzero(tiny_run):
    out = tiny_run["inspect_corrupt"]
    assert out["returncode"] == 1
    assert "INCONSISTENT" in out["stdout"]
    assert "is inconsistent" in out["stderr"] and "Traceback" not in out["stderr"]


def test_missing_store_clear_message(tiny_run):
    out = tiny_run["inspect_missing"]
    assert out["returncode"] == 1
    lines = out["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-sketch inspect: error: No sketch store")
    q = tiny_run["query_missing"]
    assert q["returncode"] == 1 and "No sketch store" in q["stderr"] and "Traceback" not in q["stderr"]


def test_unknown_class_in_config(tiny_run):
    out = tiny_run["unknown_class"]
    assert out["returncode"] == 2
    assert "NoSuchModel" in out["stderr"] and "has no attribute" in out["stderr"]
    assert "Traceback" not in out["stderr"] and out["stderr"].startswith("usage: lightning-sketch fit --config")


def test_invalid_argument_values(tiny_run):
    bad_type = tiny_run["bad_type"]
    assert bad_type["returncode"] == 2
    assert 'Parser key "trainer.max_epochs"' in bad_type["stderr"] and "abc" in bad_type["stderr"]
    # a value the class itself refuses (typed error in __init__): message kept, no traceback
    bad_value = tiny_run["bad_value"]
    assert bad_value["returncode"] == 2
    assert "`n_train + n_val + n_test` must be <= 1797" in bad_value["stderr"]
    assert "Traceback" not in bad_value["stderr"]
    bad_k = tiny_run["bad_k"]
    assert bad_k["returncode"] == 2 and "argument --k: expected a positive integer" in bad_k["stderr"]
    bad_ids = tiny_run["bad_ids"]
    assert bad_ids["returncode"] == 1
    assert "`--ids` [999] are outside the test split's range [0, 16)" in bad_ids["stderr"]


def test_every_callback_argument_in_help(tiny_run):
    """``fit --trainer.callbacks.help X`` documents every __init__ argument with its type."""
    import inspect
    import re

    from lightning_sketch import callbacks

    for name in ("GradientSketch", "HessianSpectrum", "IntrinsicDimension"):
        out = tiny_run[f"help_{name}"]
        assert out["returncode"] == 0, out["stderr"][-2000:]
        blocks = re.split(r"\n  --trainer\.callbacks\.", out["stdout"])[1:]
        documented = {b.split()[0]: " ".join(b.split()) for b in blocks}
        sig = inspect.signature(getattr(callbacks, name).__init__)
        # **kwargs (HessianSpectrum's deprecated flat numerics) are no CLI options
        params = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
        for param in params:
            assert param in documented, (name, param)
            text = documented[param]
            assert "type:" in text, (name, param)
            assert len(text.split("(type:")[0].split()) > 2, (name, param)  # a description, not just the flag


def test_query_ensemble_arnoldi_and_damping_from_the_cli(tiny_run):
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.demo import DigitsClassifier

    for name in ("query_ensemble", "query_arnoldi", "query_trak"):
        assert tiny_run[name]["returncode"] == 0, tiny_run[name]["stderr"][-3000:]
    single = json.loads((tiny_run["root"] / "query.json").read_text())
    ens = json.loads(tiny_run["query_ensemble"]["stdout"])
    # an ensemble of one run twice is that run: same ids and scores as the single-run default query
    assert ens["method"] == "trak" and isinstance(ens["store"], list) and len(ens["store"]) == 2
    for rec, ref in zip(ens["queries"], [single["queries"][0], single["queries"][1]]):
        assert [e["id"] for e in rec["proponents"]] == [e["id"] for e in ref["proponents"]]
        for a, b in zip(rec["proponents"], ref["proponents"]):
            assert abs(a["score"] - b["score"]) <= 1e-5 * max(1.0, abs(b["score"]))  # float32 model, 2 processes
    arn = json.loads(tiny_run["query_arnoldi"]["stdout"])
    assert arn["method"] == "arnoldi_if" and len(arn["queries"][0]["proponents"]) == 3
    trak = json.loads(tiny_run["query_trak"]["stdout"])
    model = DigitsClassifier(hidden=32)
    model.load_state_dict(torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    att = Attributor(tiny_run["root"] / "sketch", model, method="trak", damping_ratio=0.1)
    ids, scores = att.top_k(tiny_run["dm"].batch([0, 3], split="test"), k=4)
    assert [[e["id"] for e in q["proponents"]] for q in trak["queries"]] == ids.tolist()
