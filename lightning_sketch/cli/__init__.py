"""The ``lightning-sketch`` console command: LightningCLI training plus query, report and inspect.

Subcommands:

- ``fit`` / ``validate`` / ``test`` / ``predict``: :class:`lightning.pytorch.cli.LightningCLI`
  with any LightningModule and LightningDataModule given by ``class_path`` and the callbacks under
  ``trainer.callbacks`` (``class_path`` + ``init_args``). Configs are parsed in jsonargparse's
  ``omegaconf+`` mode: ``${...}`` interpolation is resolved on the merged config, so a file may
  refer to keys set by another ``--config`` file. A config may name its base with a top-level
  ``base_config: <path relative to the file>`` key: ``lightning-sketch`` loads the base first.
- ``query``: top proponents and opponents of test examples (or of inputs from a ``.npy`` file)
  through :class:`~lightning_sketch.attribution.Attributor` on a run's sketch store.
- ``report``: a self-contained HTML report of a run directory (:mod:`lightning_sketch.report`).
- ``inspect``: a store's manifest and health; exit status 1 on an inconsistent store.

Errors from the library (missing store, corrupt file, bad argument) print one line,
``lightning-sketch <command>: error: <message>``, and exit with status 1; argument errors exit 2.

Example:
    >>> main(["inspect", "/nonexistent/store"])
    1
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sketch import callbacks
from lightning_sketch.attribution.query import METHODS
from lightning_sketch.cli.commands import PROG, _parse_ids, _positive_int, run_inspect, run_query
from lightning_sketch.exceptions import LightningSketchError, SketchConfigError

__all__ = ["build_from_config", "expand_base_configs", "main"]  # and SketchCLI, built on first access

log = logging.getLogger(__name__)

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_OWN_COMMANDS = ("query", "report", "inspect")

_USAGE = f"""usage: {PROG} {{fit,validate,test,predict,query,report,inspect}} ...

Gradient sketches for training data attribution, Hessian spectra and intrinsic dimension
(Lightning callbacks; Schioppa, NeurIPS 2024).

commands:
  fit, validate, test, predict
                 LightningCLI: `{PROG} fit --config configs/digits.yaml`; `{PROG} fit --help`
                 lists the model, data and trainer arguments; a callback's arguments:
                 `{PROG} fit --trainer.callbacks.help GradientSketch` (or HessianSpectrum,
                 IntrinsicDimension).
  query          top proponents/opponents of test examples from a run's sketch store
  report         self-contained HTML report of a run directory
  inspect        a sketch store's manifest and health (non-zero exit if inconsistent)

Run `{PROG} <command> --help` for a command's options.
"""


# ---------------------------------------------------------------------------- LightningCLI
def _parser_mode() -> str:
    """``omegaconf+`` (interpolation over the merged config) where jsonargparse has it, else ``omegaconf``."""
    from jsonargparse import ArgumentParser

    try:
        ArgumentParser(parser_mode="omegaconf+")
    except ValueError:
        return "omegaconf"
    return "omegaconf+"


def _import_callbacks() -> None:
    """Import our callbacks so that short names (``--trainer.callbacks+=GradientSketch``) resolve."""
    import importlib

    for name in callbacks.__all__:
        module = callbacks._CALLBACKS[name]
        try:
            importlib.import_module(f"lightning_sketch.callbacks.{module}")
        except ImportError as err:  # a callback whose optional dependency is missing stays unlisted
            log.debug("callback %s not importable: %s", name, err)


def _cli_class() -> type:
    import warnings

    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class _Parser(LightningArgumentParser):
        """Prints a one-line usage before an error instead of every trainer option."""

        def print_usage(self, file: Any = None) -> None:
            cmd = self.prog.split()[-1] if self.prog else "fit"
            print(f"usage: {PROG} {cmd} --config CONFIG [--section.key=value ...]   (all options: "
                  f"{PROG} {cmd} --help)", file=file or sys.stderr)

    class SketchCLI(LightningCLI):
        """LightningCLI with the library's defaults (omegaconf+ parsing, subclass mode, reruns allowed).

        A model, data module or callback whose ``__init__`` rejects its arguments (a typed
        ``ValueError`` such as :class:`~lightning_sketch.exceptions.SketchConfigError`) ends the
        command like any other configuration error: the message and exit status 2, no traceback.
        """

        def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("subclass_mode_data", True)
            kwargs.setdefault("parser_class", _Parser)
            kwargs.setdefault("parser_kwargs", {"parser_mode": _parser_mode()})
            # Overwrite the saved config.yaml, so that a rerun into the same directory does not fail.
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            with warnings.catch_warnings():  # `args` is how a console entry point passes argv
                warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
                super().__init__(args=None if args is None else list(args), run=run, **kwargs)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:
                parser = self._parser(self.subcommand)
                parser.error(f"invalid configuration: {err}")

    return SketchCLI


def __getattr__(name: str) -> Any:
    if name == "SketchCLI":  # built lazily: importing lightning costs seconds
        return _cli_class()
    raise AttributeError(f"module 'lightning_sketch.cli' has no attribute {name!r}")


def expand_base_configs(argv: Sequence[str]) -> list[str]:
    """Replace ``--config F`` by ``--config BASE --config <F without base_config>`` (recursively).

    A config file's optional top-level ``base_config`` key names a base file, relative to the
    file's directory. The base is loaded first, so the file overrides it, and interpolation
    (``${trainer.default_root_dir}``) sees the merged values.

    Raises:
        SketchConfigError: if a config file cannot be read or its bases form a cycle.

    Example:
        >>> expand_base_configs(["fit", "--trainer.max_steps=3"])
        ['fit', '--trainer.max_steps=3']
    """
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += _expand_one(argv[i + 1], ())
            next(it, None)
        elif arg.startswith("--config="):
            out += _expand_one(arg.split("=", 1)[1], ())
        else:
            out.append(arg)
    return out


def _expand_one(value: str, seen: tuple[Path, ...]) -> list[str]:
    import yaml

    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. an inline YAML string longer than a file name may be
        is_file = False
    if not is_file:  # an inline YAML string or a missing file: jsonargparse reports it
        return ["--config", value]
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SketchConfigError(f"Cannot read config file {str(path)!r}: {err}") from None
    if not isinstance(cfg, dict) or "base_config" not in cfg:
        return ["--config", value]
    base = (path.parent / str(cfg.pop("base_config"))).resolve()
    if base in seen or base == path.resolve():
        raise SketchConfigError(
            f"`base_config` of {str(path)!r} forms a cycle through {str(base)!r}; remove one."
        )
    if not base.is_file():
        raise SketchConfigError(
            f"`base_config` of {str(path)!r} names {str(base)!r}, which does not exist; give a path relative "
            f"to the config file."
        )
    parents = _expand_one(str(base), (*seen, path.resolve()))
    return [*parents, "--config", yaml.safe_dump(cfg, sort_keys=False)]


def _parsing_settings() -> None:
    """Let ``${trainer.x}`` mean the same in ``fit`` configs and in subcommand-less parsing.

    In omegaconf+ mode interpolation runs on the whole parsed config, where the ``fit`` subcommand
    adds a ``fit.`` prefix; converting absolute paths to relative ones keeps the configs usable
    both by ``lightning-sketch fit`` and by :func:`build_from_config`. (A jsonargparse process-wide
    setting: only the console command sets it.)
    """
    import jsonargparse

    if _parser_mode() == "omegaconf+":
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


def run_lightning(argv: Sequence[str]) -> int:
    """Run LightningCLI on ``argv`` (a subcommand first); returns the exit status."""
    _import_callbacks()
    _parsing_settings()
    _cli_class()(args=expand_base_configs(argv))
    return 0


def build_from_config(configs: Sequence[str]) -> tuple[Any, Any]:
    """``(model, datamodule)`` instantiated from LightningCLI config files (no training)."""
    _import_callbacks()
    _parsing_settings()
    args: list[str] = []
    for c in configs:
        args += ["--config", c]
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # no "GPU available" / "Seed set" chatter around the query's output
        lg.setLevel(logging.WARNING)
    try:
        cli = _cli_class()(args=expand_base_configs(args), run=False, save_config_callback=None)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return cli.model, cli.datamodule


# ---------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    # Imported on use: the report pulls in matplotlib and FAISS, which the other commands do not need.
    from lightning_sketch.report import write_report

    out = write_report(args.run_dir, args.output, queries=args.queries)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------- entry point
def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Query, report on and inspect sketch runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="top proponents and opponents of queries",
                       description="Top proponents (score > 0: training on them lowers the query's loss) and "
                       "opponents of test examples, through the Attributor on a run's sketch store.")
    q.add_argument("--store", required=True, action="append",
                   help="store directory or GradientSketch run directory (holding store/); repeat it for an "
                   "ensemble of runs, whose scores are averaged")
    q.add_argument("--ckpt", required=True, action="append",
                   help="Lightning checkpoint (.ckpt) of the trained model; once, or once per --store")
    q.add_argument("--config", required=True, action="append",
                   help="the LightningCLI config(s) of the run (repeat for several files)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", type=_parse_ids, help="comma-separated example ids of --split, e.g. 0,1,2")
    src.add_argument("--inputs",
                     help=".npy inputs [Q, ...] (labels: the model's predictions) or .npz with x and y")
    q.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="split the --ids refer to")
    q.add_argument("--k", type=_positive_int, default=5,
                   help="proponents and opponents per query (default 5)")
    q.add_argument("--method", choices=("auto", *METHODS), default="auto",
                   help="attribution method (default auto: fisher_if when every run holds only the "
                   "sampled-label Fisher, else trak, on the margin kernel when the runs hold it)")
    q.add_argument("--also", choices=("auto", "none", *(m for m in METHODS if m != "arnoldi_if")),
                   default="auto",
                   help="a second ranking of the same queries, printed beside the first (default auto: "
                   "grad_cos, the similarity view, beside the counterfactual methods trak, fisher_if and "
                   "arnoldi_if; none beside tracin, grad_dot and grad_cos)")
    q.add_argument("--damping", type=float, default=None,
                   help="absolute damping λ for trak/fisher_if (default: automatic)")
    q.add_argument("--damping-ratio", type=float, default=None,
                   help="damping as a multiple of tr(K)/T, each slice's mean squared per-example gradient "
                   "norm (default: automatic)")
    q.add_argument("--snapshot", default=None,
                   help="arnoldi_if: a HessianSpectrum snapshot taken with the store's sketch")
    q.add_argument("--probe", type=_positive_int, default=256,
                   help="arnoldi_if without --snapshot: training examples whose Hessian is taken "
                   "(default 256)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    q.add_argument("--output", help="write to this file instead of stdout")
    r = sub.add_parser("report", help="self-contained HTML report of a run directory")
    r.add_argument("run_dir", help="the run directory (trainer.default_root_dir)")
    r.add_argument("--output", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    r.add_argument("--queries", default=None,
                   help="query results (JSON from `query --format json`) to picture; default: every such "
                   "JSON file found in RUN_DIR")
    i = sub.add_parser("inspect", help="a sketch store's manifest and health")
    i.add_argument("dir", help="store directory (or a run directory holding stores)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--no-verify", action="store_true", help="check file sizes only, not checksums (faster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-sketch`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE)
        return 0 if argv else 2
    command = argv[0]
    try:
        if command in _LIGHTNING_COMMANDS:
            return run_lightning(argv)
        if command not in _OWN_COMMANDS:
            sys.stderr.write(_USAGE + f"\n{PROG}: error: unknown command {command!r}\n")
            return 2
        args = _own_parser().parse_args(argv)
        if command == "query":
            return run_query(args, build_from_config)
        return {"report": _report, "inspect": run_inspect}[command](args)
    except LightningSketchError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 1
