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
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.exceptions import LightningSketchError, SketchConfigError, SketchInputError

__all__ = ["SketchCLI", "expand_base_configs", "main"]

log = logging.getLogger(__name__)

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_OWN_COMMANDS = ("query", "report", "inspect")
PROG = "lightning-sketch"

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

    from lightning_sketch import callbacks

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
                super().__init__(args=args, run=run, **kwargs)

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
        raise SketchConfigError(f"`base_config` of {str(path)!r} forms a cycle through {str(base)!r}; remove one.")
    if not base.is_file():
        raise SketchConfigError(
            f"`base_config` of {str(path)!r} names {str(base)!r}, which does not exist; give a path relative "
            f"to the config file."
        )
    return [*_expand_one(str(base), (*seen, path.resolve())), "--config", yaml.safe_dump(cfg, sort_keys=False)]


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


# ---------------------------------------------------------------------------- query
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one id, e.g. --ids 0,1,2")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dataset(datamodule: Any, split: str) -> Any:
    loader = getattr(datamodule, f"{split}_dataloader")()
    return loader.dataset


def _item_field(item: Any, key: str) -> Any:
    return item[key] if isinstance(item, dict) and key in item else None


def _images(datamodule: Any, split: str, ids: Sequence[int]) -> list[Any] | None:
    """Pictures of ``ids`` as nested lists (the datamodule's ``images(split)`` or 2-D/3-D inputs)."""
    if hasattr(datamodule, "images"):
        imgs = datamodule.images(split)
        return [np.asarray(imgs[i], dtype=float).round(4).tolist() for i in ids]
    ds = _dataset(datamodule, split)
    xs = [_item_field(ds[i], "x") for i in ids]
    if all(x is not None and np.ndim(x) in (2, 3) for x in xs):
        return [np.asarray(x, dtype=float).round(4).tolist() for x in xs]
    return None


def _query_batch(args: argparse.Namespace, model: Any, datamodule: Any) -> tuple[dict[str, Any], list[int]]:
    import torch
    from torch.utils.data import default_collate

    if args.inputs is not None:
        path = Path(args.inputs)
        if not path.is_file():
            raise SketchInputError(f"`--inputs` file {str(path)!r} does not exist; pass a .npy array of inputs [Q, ...].")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            x, y = loaded["x"], (loaded["y"] if "y" in loaded.files else None)
        else:
            x, y = loaded, None
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if y is None:  # attribute the model's own prediction
            with torch.no_grad():
                y = model(x).argmax(-1)
        batch = {"x": x, "y": torch.as_tensor(np.asarray(y), dtype=torch.long), "index": torch.arange(len(x))}
        return batch, list(range(len(x)))
    datamodule.setup("test" if args.split == "test" else "fit")
    ds = _dataset(datamodule, args.split)
    n = len(ds)
    bad = [i for i in args.ids if not 0 <= i < n]
    if bad:
        raise SketchInputError(f"`--ids` {bad} are outside the {args.split} split's range [0, {n}); pick ids below {n}.")
    return default_collate([ds[i] for i in args.ids]), list(args.ids)


def _query(args: argparse.Namespace) -> int:
    import torch

    from lightning_sketch.attribution import Attributor

    if not Path(args.store).exists():
        from lightning_sketch.exceptions import StoreNotFoundError

        raise StoreNotFoundError(f"No sketch store at {args.store!r}: `--store` must be a store or run directory.")
    if not Path(args.ckpt).is_file():
        raise SketchInputError(f"`--ckpt` {args.ckpt!r} does not exist; pass the Lightning checkpoint of the run.")
    model, datamodule = build_from_config(args.config)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)  # the user's own checkpoint
    model.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt)
    model.eval()
    batch, qids = _query_batch(args, model, datamodule)
    attributor = Attributor(args.store, model, method=args.method)
    k = min(args.k, len(attributor.ids))
    pro_ids, pro_scores = attributor.top_k(batch, k=k)
    opp_ids, opp_scores = attributor.top_k(batch, k=k, opponents=True)
    with torch.no_grad():
        preds = model(batch["x"]).argmax(-1).tolist() if isinstance(batch, dict) and "x" in batch else None
    train_ds = _dataset(datamodule, "train") if datamodule is not None else None

    def entries(ids: Any, scores: Any) -> list[dict[str, Any]]:
        rows = []
        for i, s in zip(ids.tolist(), scores.tolist()):
            y = _item_field(train_ds[i], "y") if train_ds is not None else None
            rows.append({"id": int(i), "score": float(s), "label": None if y is None else int(y)})
        return rows

    with_images = args.inputs is None and datamodule is not None
    records = []
    for q, qid in enumerate(qids):
        rec: dict[str, Any] = {
            "query": qid,
            "label": int(batch["y"][q]) if "y" in batch else None,
            "prediction": None if preds is None else int(preds[q]),
            "proponents": entries(pro_ids[q], pro_scores[q]),
            "opponents": entries(opp_ids[q], opp_scores[q]),
        }
        if with_images:
            rec["image"] = (_images(datamodule, args.split, [qid]) or [None])[0]
            for kind in ("proponents", "opponents"):
                pics = _images(datamodule, "train", [e["id"] for e in rec[kind]])
                for e, pic in zip(rec[kind], pics or [None] * len(rec[kind])):
                    e["image"] = pic
        records.append(rec)
    result = {
        "format": "lightning_sketch.query/v1", "method": args.method, "split": args.split if args.inputs is None else
        "inputs", "store": str(args.store), "ckpt": str(args.ckpt), "k": k, "queries": records,
    }
    text = {"json": _as_json, "csv": _as_csv, "table": _as_table}[args.format](result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {len(records)} queries to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _as_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1) + "\n"


def _as_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "query_label", "kind", "rank", "train_id", "train_label", "score"])
    for rec in result["queries"]:
        for kind in ("proponents", "opponents"):
            for rank, e in enumerate(rec[kind], 1):
                w.writerow([rec["query"], rec["label"], kind[:-1], rank, e["id"], e["label"], f"{e['score']:.6g}"])
    return buf.getvalue()


def _as_table(result: dict[str, Any]) -> str:
    lines = [f"method: {result['method']}  (score > 0: training on the example lowers the query's loss)"]
    for rec in result["queries"]:
        lines.append(f"\nquery {rec['query']} ({result['split']})  label={rec['label']}  prediction={rec['prediction']}")
        lines.append(f"  {'kind':<10} {'rank':>4} {'train_id':>8} {'label':>5} {'score':>12}")
        for kind in ("proponents", "opponents"):
            for rank, e in enumerate(rec[kind], 1):
                lines.append(f"  {kind[:-1]:<10} {rank:>4} {e['id']:>8} {str(e['label']):>5} {e['score']:>12.5g}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- inspect
def find_stores(path: str | Path) -> list[Path]:
    """Store directories at ``path``: itself if it holds ``manifest.json``, else those below (no shards)."""
    path = Path(path)
    if (path / "manifest.json").is_file() or not path.is_dir():
        return [path]
    found = sorted(p.parent for p in path.rglob("manifest.json") if "shards" not in p.relative_to(path).parts)
    return found or [path]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable summary of an :func:`~lightning_sketch.store.inspect_store` dict."""
    spec = info.get("spec") or {}
    health = info["health"]
    bpr = info.get("bytes_per_row")
    lines = [
        f"store:        {info['path']}",
        f"health:       {'OK' if health['ok'] else 'INCONSISTENT'} (checksums: {health['checksums']})"
        + ("" if health["ok"] else f"\n  error:      {health['error']}"),
        f"rows:         {info['rows']}",
        f"sketch:       kind={spec.get('kind')} dim(N)={spec.get('dim')} sketch_dim(D)={info['sketch_dim']} "
        f"seed={spec.get('seed')} dtype={info['dtype']}",
        f"size on disk: {_human_bytes(info['size_bytes'])}" + (f" ({bpr:.0f} B per row)" if bpr else ""),
        f"format:       v{info['format_version']} (library {info.get('library_version')}), generation "
        f"{info['generation']}, {info['segments']} segments, layout {str(info.get('layout_fingerprint'))[:12]}",
        f"checkpoints:  {len(info['checkpoints'])}",
    ]
    for c in info["checkpoints"]:
        lines.append(f"  - {c['name']}: step={c.get('step')} lr={c.get('lr')} rows={c.get('rows')}")
    idx = info.get("indexes") or []
    lines.append("indexes:      " + (", ".join(f"{e['kind']} on {e['view']} ({e['rows']} rows"
                                               f"{'' if e['current'] else ', stale'})" for e in idx) or "none (flat search)"))
    return "\n".join(lines) + "\n"


def _inspect(args: argparse.Namespace) -> int:
    from lightning_sketch.store import inspect_store

    infos = [inspect_store(p, verify=not args.no_verify) for p in find_stores(args.dir)]
    if args.json:
        sys.stdout.write(json.dumps(infos[0] if len(infos) == 1 else infos, indent=1, default=str) + "\n")
    else:
        sys.stdout.write("\n".join(format_inspect(i) for i in infos))
    bad = [i for i in infos if not i["health"]["ok"]]
    for i in bad:
        print(f"{PROG} inspect: error: store at {i['path']} is inconsistent: {i['health']['error']}", file=sys.stderr)
    return 1 if bad else 0


# ---------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
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
    q.add_argument("--store", required=True, help="store directory or GradientSketch run directory (holding store/)")
    q.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of the trained model")
    q.add_argument("--config", required=True, action="append",
                   help="the LightningCLI config(s) of the run (repeat for several files)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", type=_parse_ids, help="comma-separated example ids of --split, e.g. 0,1,2")
    src.add_argument("--inputs", help=".npy inputs [Q, ...] (labels: the model's predictions) or .npz with x and y")
    q.add_argument("--split", choices=("test", "val", "train"), default="test", help="split the --ids refer to")
    q.add_argument("--k", type=_positive_int, default=5, help="proponents and opponents per query (default 5)")
    q.add_argument("--method", choices=("grad_dot", "tracin", "grad_cos", "trak", "arnoldi_if"), default="tracin",
                   help="attribution method (default tracin)")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    q.add_argument("--output", help="write to this file instead of stdout")
    r = sub.add_parser("report", help="self-contained HTML report of a run directory")
    r.add_argument("run_dir", help="the run directory (trainer.default_root_dir)")
    r.add_argument("--output", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    r.add_argument("--queries", default=None, help="query results (JSON from `query --format json`) to picture; "
                   "default: every such JSON file found in RUN_DIR")
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
        return {"query": _query, "report": _report, "inspect": _inspect}[command](args)
    except LightningSketchError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
