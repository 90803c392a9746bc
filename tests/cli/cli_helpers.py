"""Helpers of the CLI tests: run the ``lightning-sketch`` console command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def cli_command() -> list[str]:
    """The installed console script, else ``python -m lightning_sketch.cli``."""
    exe = Path(sys.executable).with_name("lightning-sketch")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_sketch.cli"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [*cli_command(), *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


_DRIVER = r"""
import contextlib, io, json, sys
from lightning_sketch.cli import main

calls = json.loads(sys.argv[1])
results = []
for argv in calls:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    results.append({"argv": argv, "returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_many(calls: list[list[str]], timeout: float = 300) -> list[dict]:
    """Run ``lightning_sketch.cli.main(argv)`` for each argv in ONE subprocess (imports paid once).

    Returns one dict per call: ``argv``, ``returncode`` (the exit status the console command
    would return), ``stdout``, ``stderr``.
    """
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(calls)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"CLI driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
