"""In-process checks of the CLI helpers, the report builder and the digits demo pieces."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_sketch import cli
from lightning_sketch.cli import commands as cli_commands
from lightning_sketch.demo import DigitsClassifier, DigitsDataModule
from lightning_sketch.exceptions import SketchConfigError, SketchInputError, StoreNotFoundError
from lightning_sketch.report import build_report, write_report


# ---------------------------------------------------------------------------- base_config expansion
def test_expand_base_configs_nested(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer:\n  max_epochs: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base_config: ../a.yaml\nmodel:\n  init_args: {hidden: 8}\n")
    (tmp_path / "c.yaml").write_text("base_config: sub/b.yaml\ntrainer:\n  max_steps: 2\n")
    out = cli.expand_base_configs(["fit", "--config", str(tmp_path / "c.yaml"), "--trainer.x=1"])
    assert out[0] == "fit" and out[-1] == "--trainer.x=1"
    configs = [out[i + 1] for i, a in enumerate(out) if a == "--config"]
    assert configs[0] == str((tmp_path / "a.yaml").resolve())  # the root base first
    assert yaml.safe_load(configs[1]) == {"model": {"init_args": {"hidden": 8}}}
    assert yaml.safe_load(configs[2]) == {"trainer": {"max_steps": 2}}
    # files without base_config and inline strings pass through unchanged
    assert cli.expand_base_configs([f"--config={tmp_path / 'a.yaml'}"]) == ["--config", str(tmp_path / "a.yaml")]
    inline = "trainer:\n  max_steps: 1\n" + "# padding\n" * 60  # longer than a file name may be
    assert cli.expand_base_configs(["--config", inline]) == ["--config", inline]


def test_expand_base_configs_errors(tmp_path):
    (tmp_path / "x.yaml").write_text("base_config: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base_config: x.yaml\n")
    with pytest.raises(SketchConfigError, match="forms a cycle"):
        cli.expand_base_configs(["--config", str(tmp_path / "x.yaml")])
    (tmp_path / "z.yaml").write_text("base_config: missing.yaml\n")
    with pytest.raises(SketchConfigError, match="does not exist; give a path relative"):
        cli.expand_base_configs(["--config", str(tmp_path / "z.yaml")])
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(SketchConfigError, match="Cannot read config file"):
        cli.expand_base_configs(["--config", str(tmp_path / "broken.yaml")])


def test_shipped_configs_chain_to_base():
    from cli_helpers import CONFIGS

    for name in ("digits.yaml", "attribution.yaml"):
        expanded = cli.expand_base_configs(["--config", str(CONFIGS / name)])
        assert expanded[1] == str((CONFIGS / "base.yaml").resolve())


def test_shipped_configs_save_last_ckpt_every_epoch():
    """``lightning-sketch query --ckpt .../last.ckpt`` needs a last.ckpt during fit too, not only at its end."""
    from cli_helpers import CONFIGS

    found = 0
    for path in sorted(CONFIGS.glob("*.yaml")):
        for cb in (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []:
            if cb["class_path"].endswith("ModelCheckpoint"):
                found += 1
                args = cb["init_args"]
                assert args.get("save_last") is True and args.get("every_n_epochs") == 1, path.name
    assert found >= 2


# ---------------------------------------------------------------------------- argument parsing and output
def test_argument_types():
    assert cli._parse_ids("1, 2,3") == [1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        cli._parse_ids("1,x")
    with pytest.raises(argparse.ArgumentTypeError, match="at least one id"):
        cli._parse_ids(",")
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        cli._positive_int("-3")


def test_query_input_and_ckpt_errors(tmp_path):
    (tmp_path / "store").mkdir()
    args = cli._own_parser().parse_args(["query", "--store", str(tmp_path / "store"), "--ckpt", str(tmp_path / "no.ckpt"),
                                          "--config", "c.yaml", "--ids", "0"])
    with pytest.raises(SketchInputError, match="`--ckpt` .* does not exist"):
        cli_commands.run_query(args, cli.build_from_config)
    os.mkfifo(tmp_path / "fifo.ckpt")
    for path, what in ((tmp_path / "fifo.ckpt", "is a FIFO"), (tmp_path, "is a directory"),
                       ("/dev/null", "is a device")):
        args = cli._own_parser().parse_args(["query", "--store", str(tmp_path / "store"), "--ckpt", str(path),
                                              "--config", "c.yaml", "--ids", "0"])
        with pytest.raises(SketchInputError, match=f"`--ckpt` .* {what}, not a file") as err:
            cli_commands.run_query(args, cli.build_from_config)
        assert "does not exist" not in str(err.value)
    args = cli._own_parser().parse_args(["query", "--store", "s", "--ckpt", "c", "--config", "c",
                                          "--inputs", str(tmp_path / "no.npy")])
    with pytest.raises(SketchInputError, match="`--inputs` file .* does not exist"):
        cli_commands._query_batch(args, None, None)


def test_output_formats_and_main_usage(capsys):
    result = {"method": "tracin", "split": "test", "queries": [
        {"query": 4, "label": 1, "prediction": 1,
         "proponents": [{"id": 7, "score": 2.5, "label": 1}], "opponents": [{"id": 9, "score": -1.0, "label": 3}]}]}
    assert cli_commands._as_csv(result).splitlines() == [
        "query,query_label,kind,rank,train_id,train_label,score,method", "4,1,proponent,1,7,1,2.5,tracin",
        "4,1,opponent,1,9,3,-1,tracin"]
    table = cli_commands._as_table(result)
    assert "query 4 (test)" in table and "proponent     1        7" in table
    assert "lowers the query's loss" in table and "counterfactual" not in table
    # trak on the margin kernel: the sign sentence names the margin, the ranking's meaning, and λ
    from lightning_sketch.attribution.meaning import meaning

    trak = {**result, "method": "trak", "meaning": meaning("trak", "margin"), "damping": {
        "kernel": "margin", "rule": "r", "ratio": 0.316, "slices": [{"lambda": 2.0}, {"lambda": 5.0}],
        "top_k_overlap": {"lambda/sqrt10": 0.8, "lambda*sqrt10": 0.6}}}
    table = cli_commands._as_table(trak)
    assert "raises the query's margin" in table and "--also grad_cos" in table
    assert f"  proponent: {meaning('trak', 'margin')['proponent']}\n" in table
    assert "ratio 0.316 of tr(K)/T/r (r: RMS residual), λ 2–5; top-k kept at λ/√10, λ·√10: 80%, 60%" in table
    trak["damping"] = {**trak["damping"], "training_time": [12.5, None, 20.0]}
    assert "ratio 0.316 of tr(K)/T/r (r: RMS residual) (floored at T/(ρ₀τ), training time τ 12.5–20), λ 2–5" in (
        cli_commands._as_table(trak))
    # a second view: its columns beside the first, its meaning and both summaries in the footer
    second = {"method": "grad_cos", "meaning": meaning("grad_cos", "margin"),
              "summary": {"label_agreement": 1.0, "label_agreement_queries": 1, "label_agreement_correct": 1.0,
                          "correct_queries": 1, "hubs": [], "distinct": 1, "pairs": 1},
              "queries": [{"query": 4, "proponents": [{"id": 8, "score": 0.9, "label": 1}],
                           "opponents": [{"id": 5, "score": -0.7, "label": 2}]}]}
    both = {**trak, "second_view": second, "summary": {
        "label_agreement": 0.0, "label_agreement_queries": 1, "label_agreement_correct": 0.0, "correct_queries": 1,
        "hubs": [{"id": 7, "queries": 2}], "distinct": 1, "pairs": 1}}
    table = cli_commands._as_table(both)
    assert "second view: grad_cos" in table and "--also" not in table
    assert f"  proponent: {meaning('grad_cos', 'margin')['proponent']}\n" in table
    assert "proponent     1        7     1          2.5  |            8     1          0.9" in table
    assert "opponent      1        9     3           -1  |            5     2         -0.7" in table
    assert "trak: 0.0% of top-k proponents share the query's label (1 query; 0.0% over the 1 correctly " in table
    assert "hubs (proponents of several queries): id 7 ×2;" in table
    assert "grad_cos: 100.0% of top-k proponents" in table and "hubs (proponents of several queries): none" in table
    assert cli_commands._as_csv(both).splitlines()[1:] == [
        "4,1,proponent,1,7,1,2.5,trak", "4,1,opponent,1,9,3,-1,trak",
        "4,1,proponent,1,8,1,0.9,grad_cos", "4,1,opponent,1,5,2,-0.7,grad_cos"]
    from lightning_sketch.io.safeio import verify_checked

    assert verify_checked(json.loads(cli_commands._as_json(result)), path="-", what="query result") == result
    assert cli.main(["--help"]) == 0 and "inspect" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- report
def test_report_with_spectrum_and_intrinsic(tmp_path):
    from lightning_sketch.spectrum.snapshot import save_snapshot

    run = tmp_path / "run"
    for step, top in ((0, 5.0), (10, 8.0), (20, 9.0)):
        grid = np.linspace(-1, 10, 50)
        save_snapshot(run / "spectrum", step, {
            "eigenvalues": torch.tensor([top, top / 2, 1.0], dtype=torch.float64),
            "residuals": torch.tensor([1e-9, 1e-8, 1e-3], dtype=torch.float64),
            "converged": torch.tensor([True, True, False]), "eigenvectors": torch.eye(3, 8),
            "density_grid": torch.from_numpy(grid), "density": torch.from_numpy(np.exp(-grid**2) + 1e-6),
        }, {"scalars": {"lambda_max": top, "rneg": 0.1}})
    from lightning_sketch.io.safeio import write_checked_json

    (run / "intrinsic").mkdir(parents=True)
    write_checked_json(run / "intrinsic" / "intrinsic_dimension.json", ({
        "mode": "search", "status": "done", "d_star": 32, "target": 0.9, "history": [
            {"round": 0, "d": 16, "metric": 0.1, "action": "baseline"},
            {"round": 1, "step": 50, "d": 16, "metric": 0.6, "action": "double"},
            {"round": 2, "step": 100, "d": 32, "metric": 0.93, "action": "done"}]}))
    text = build_report(run)
    spectrum = text.split('<section id="spectrum">')[1].split("</section>")[0]
    assert "3 snapshots" in spectrum and spectrum.count("data:image/png;base64,") == 1
    assert "lambda_max" in spectrum and "rneg" in spectrum and "max residual" in spectrum
    assert "eigenpairs converged" in spectrum and spectrum.count(">2 of 3<") == 3  # each snapshot's count
    intrinsic = text.split('<section id="intrinsic">')[1].split("</section>")[0]
    assert "D* = 32" in intrinsic and "data:image/png;base64," in intrinsic and ">double<" in intrinsic
    for absent in ("No sketch store", "No attribution query results", "No Lightning CSV logger"):
        assert absent in text


def test_report_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="Run directory .* does not exist"):
        build_report(tmp_path / "nope")
    bad = tmp_path / "q.json"
    bad.write_text("{not json")
    with pytest.raises(StoreNotFoundError, match="`queries` file .* is not readable JSON"):
        write_report(tmp_path, tmp_path / "r.html", queries=bad)


# ---------------------------------------------------------------------------- demo
def test_digits_datamodule_splits_and_label_noise():
    dm = DigitsDataModule(n_train=100, n_val=20, n_test=30, flip_fraction=0.1, seed=3)
    clean = DigitsDataModule(n_train=100, n_val=20, n_test=30, seed=3)
    y, y0 = dm.labels("train"), clean.labels("train")
    changed = (y != y0).nonzero().flatten()
    assert changed.tolist() == dm.flipped_ids.tolist() and len(changed) == 10  # every flip changes the class
    x = dm.dataset("train")[5]
    assert set(x) == {"x", "y", "index"} and int(x["index"]) == 5 and x["x"].shape == (64,)
    train_x = torch.stack([dm.dataset("train")[i]["x"] for i in range(100)])
    torch.testing.assert_close(train_x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)  # standardised on train
    assert dm.images("test").shape == (30, 8, 8) and float(dm.images("test").max()) <= 16
    assert len(dm.test_dataloader().dataset) == 30 and len(dm.val_dataloader().dataset) == 20
    with pytest.raises(SketchConfigError, match=r"`ids` must be non-empty and in \[0, 30\)"):
        dm.batch([30])
    with pytest.raises(SketchConfigError, match="`split` must be one of"):
        dm.images("dev")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "`batch_size` must be a positive int"),
    ({"n_train": 1500, "n_val": 200, "n_test": 200}, "must be <= 1797"),
    ({"flip_fraction": 1.5}, r"`flip_fraction` must be in \[0, 1\]"),
])
def test_digits_datamodule_validation(kwargs, match):
    with pytest.raises(SketchConfigError, match=match):
        DigitsDataModule(**kwargs)


def test_digits_classifier_losses():
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=16)
    batch = {"x": torch.randn(5, 64), "y": torch.tensor([0, 3, 9, 3, 1])}
    losses = model.per_example_loss(batch)
    ref = torch.stack([F.cross_entropy(model(batch["x"][i:i + 1]), batch["y"][i:i + 1]) for i in range(5)])
    torch.testing.assert_close(losses, ref)
    logits = model(batch["x"])
    for i in range(5):
        others = torch.cat([logits[i, :batch["y"][i]], logits[i, batch["y"][i] + 1:]])
        torch.testing.assert_close(model.per_example_margin(batch)[i], logits[i, batch["y"][i]] - others.logsumexp(0))
    with pytest.raises(SketchConfigError, match="`lr` must be > 0"):
        DigitsClassifier(lr=0.0)
    with pytest.raises(SketchConfigError, match="`num_classes` must be an int >= 2"):
        DigitsClassifier(num_classes=1)


def test_report_damping_paragraph_names_the_training_time_floor_and_ignores_hostile_values():
    from lightning_sketch.report.sections import _damping_line

    d = {"kernel": "margin", "rule": "r", "ratio": 0.316, "slices": [{"lambda": 2.0}],
         "training_time": [12.5, None, "x", True, float("inf"), 10**400, 20.0], "ratio_extra": 10**400}
    text = str(_damping_line(d))
    assert "floored by the damping a training time τ = 12.5–20 leaves" in text
    d["training_time"] = "<script>"
    assert "training time" not in str(_damping_line(d))
    d["ratio"], d["slices"] = 10**400, [{"lambda": 10**400}]  # integers beyond float's range: not shown
    assert "ratio" not in str(_damping_line(d)).split("kernel:")[-1]
