"""One tiny end-to-end run of the ``lightning-sketch`` console command, shared by the CLI tests.

Subprocesses that import Lightning cost 3-8 s each, so the run (fit, then query and report) is
made once per session and every test reads its outputs.
"""

from __future__ import annotations

import shutil

import pytest

from cli_helpers import CONFIGS, run_cli, run_many

TINY = """\
# The main job's config (digits.yaml -> base.yaml), shrunk to seconds (cheaper callbacks).
base_config: {digits}
trainer:
  default_root_dir: {root}
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ${{trainer.default_root_dir}}/checkpoints
        save_last: true
        save_top_k: 0
        every_n_epochs: 1
    - class_path: lightning_sketch.callbacks.GradientSketch
      init_args:
        dirpath: ${{trainer.default_root_dir}}/sketch
        sketch_dim: 256
    - class_path: lightning_sketch.callbacks.HessianSpectrum
      init_args:
        dirpath: ${{trainer.default_root_dir}}/spectrum
        k: 3
        sketch_dim: 64
        at_steps: [0, 6]
        every_n_steps: null
        probe_batches: 1
        numerics:
          num_iter: 12
          density_runs: 1
          density_iter: 8
model:
  init_args:
    hidden: 32
data:
  init_args:
    batch_size: 32
    n_train: 96
    n_val: 32
    n_test: 16
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``lightning-sketch fit`` (console script) on the tiny config, then every other command.

    The other commands (query as JSON and as CSV from a .npy, report, inspect, and the error
    cases) run through :func:`cli_helpers.run_many`: one more subprocess, imports paid once.
    Returns the paths and a dict name -> result (``returncode``, ``stdout``, ``stderr``).
    """
    import numpy as np

    from lightning_sketch.demo import DigitsDataModule

    base = tmp_path_factory.mktemp("cli")
    root = base / "run"
    cfg = base / "tiny.yaml"
    cfg.write_text(TINY.format(digits=CONFIGS / "digits.yaml", root=root))
    fit = run_cli("fit", "--config", str(cfg))
    assert fit.returncode == 0, fit.stderr[-4000:]
    ckpt = root / "checkpoints" / "last.ckpt"
    dm = DigitsDataModule(batch_size=32, n_train=96, n_val=32, n_test=16)
    inputs = base / "inputs.npy"
    np.save(inputs, dm.batch([1, 2], split="test")["x"].numpy())
    corrupt = base / "corrupt_store"
    shutil.copytree(root / "sketch" / "store", corrupt)
    seg = sorted(p for p in corrupt.glob("seg-*.npy") if not p.name.endswith(".ids.npy"))[0]
    seg.write_bytes(seg.read_bytes()[:-100])
    bad_cfg = base / "bad.yaml"
    bad_cfg.write_text("model:\n  class_path: lightning_sketch.demo.NoSuchModel\n")
    q = ["query", "--store", str(root / "sketch"), "--ckpt", str(ckpt), "--config", str(cfg)]
    calls = {
        "query": [*q, "--ids", "0,3,5", "--k", "4", "--format", "json", "--output", str(root / "query.json")],
        "query_csv": [*q, "--inputs", str(inputs), "--k", "3", "--format", "csv", "--method", "grad_dot"],
        "query_table": [*q, "--ids", "0,3", "--k", "3", "--also", "tracin"],
        "query_ensemble": ["query", "--store", str(root / "sketch"), "--store", str(root / "sketch"), "--ckpt", str(ckpt),
                           "--config", str(cfg), "--ids", "0,3", "--k", "4", "--format", "json"],
        "query_arnoldi": [*q, "--ids", "0", "--k", "3", "--format", "json", "--method", "arnoldi_if", "--probe", "32"],
        "query_trak": [*q, "--ids", "0,3", "--k", "4", "--format", "json", "--method", "trak", "--damping-ratio", "0.1"],
        "report": ["report", str(root), "--output", str(base / "report.html")],
        "inspect": ["inspect", str(root / "sketch" / "store")],
        "inspect_json": ["inspect", str(root), "--json"],
        "inspect_corrupt": ["inspect", str(corrupt)],
        "inspect_missing": ["inspect", str(base / "nowhere")],
        "query_missing": ["query", "--store", str(base / "nowhere"), "--ckpt", str(ckpt), "--config", str(cfg),
                          "--ids", "1"],
        "unknown_class": ["fit", "--config", str(bad_cfg), "--data=lightning_sketch.demo.DigitsDataModule"],
        "bad_type": ["fit", "--config", str(cfg), "--trainer.max_epochs=abc"],
        "bad_value": ["fit", "--config", str(cfg), "--data.init_args.n_train=5000"],
        "bad_k": [*q, "--ids", "1", "--k", "0"],
        "bad_ids": [*q, "--ids", "1,999"],
        **{f"help_{name}": ["fit", "--trainer.callbacks.help", name]
           for name in ("GradientSketch", "HessianSpectrum", "IntrinsicDimension")},
    }
    results = dict(zip(calls, run_many(list(calls.values()))))
    return {"base": base, "root": root, "cfg": cfg, "ckpt": ckpt, "fit": fit, "html": base / "report.html",
            "dm": dm, **results}
