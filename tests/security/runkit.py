"""A small but complete run directory and one reader per file kind, for the integrity sweeps.

Used by ``tests/security`` (sampled sweeps, fast) and ``benchmarks/reliability.py`` (the figures
in ``docs/reliability.md``). The run directory holds every kind of file a run writes:

    run/store/manifest.json, seg-*.npy, seg-*.ids.npy, index-*.faiss   (SketchStore, 2 checkpoints)
    run/weights/step-1.pt, step-2.pt, probe.pt                           (recorded in the manifest)
    run/curvature/step-*-<token>.npy, .json                              (recorded in the manifest)
    run/spectrum/index.json, step_*.npz                                  (spectrum snapshots)
    run/intrinsic_dimension.json                                         (intrinsic-dimension state)
    run/query.json                                                       (query results)

Each reader returns a comparable answer; :func:`classify` runs a reader on a damaged copy and
says whether it gave the reference answer, a typed library error, a *silently different*
answer, or an untyped exception.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_sketch.exceptions import LightningSketchError
from lightning_sketch.io import safeio as sio

D = 8


class Net(nn.Module):
    """A 2-layer MLP with the per-example loss the Attributor needs."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"], reduction="none")


def data(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g), "y": torch.arange(n) % 2, "index": torch.arange(n)}


def build(root: Path, variant: int = 0) -> Path:
    """Write the run directory under ``root/run`` (deterministic) and return its path.

    Beside it, ``root/older`` keeps the copies of the files that a later publish of this run
    replaced (store manifest, spectrum index, intrinsic state, query result: each at an earlier
    generation), and ``root/checkpoint_state.json`` what a Lightning checkpoint saved at the end of
    the run records (the run ids and generations of the store and the spectrum index).
    ``variant`` > 0 builds another run (other weights, rows and spectra).
    """
    from lightning_sketch.attribution._stored import PROBE
    from lightning_sketch.attribution.curvature import write_curvature
    from lightning_sketch.gradients import ParamLayout, sketch_gradients
    from lightning_sketch.sketches import make
    from lightning_sketch.spectrum.snapshot import save_snapshot
    from lightning_sketch.store import SketchStore

    run = root / "run"
    net = Net()
    layout = ParamLayout.from_module(net)
    sketch = make("dense", layout.dim, D, seed=0)
    store = SketchStore.create(run / "store", sketch, layout=layout)
    train = data(12, 1)
    older = root / "older"
    for step, lr in ((1, 0.5), (2, 0.25)):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.9 - 0.1 * variant)
        name = f"step-{step}"
        store.add_checkpoint(name, step=step, lr=lr)
        rows = sketch_gradients(net, lambda m, b: m.per_example_loss(b), train, sketch, layout=layout)
        store.append(train["index"], rows, checkpoint=name)
        store.save_weights(name, layout.params(net), run / "weights", layout_fingerprint=layout.fingerprint())
        if step == 1:  # the probe examples a checkpoint-mode run keeps (ids and inputs of 4 examples)
            probe = {"ids": train["index"][:4].clone(),
                     **{f"batch.dict.{k}": v[:4].clone() for k, v in train.items()}}
            store.save_weights(PROBE, probe, run / "weights", layout_fingerprint=layout.fingerprint())
        g = torch.Generator().manual_seed(10 * step + variant)
        half = torch.randn(D, D, generator=g, dtype=torch.float64)
        write_curvature(run, name, half @ half.T, 12, sketch.spec, "sampled", task="classification",
                        store=store)
        store.commit()
        if step == 1:
            (older / "store").mkdir(parents=True)
            shutil.copy(run / "store" / "manifest.json", older / "store" / "manifest.json")
    store.build_index("flat", checkpoint="step-2")
    store.mark_resume_point()
    store.close()
    for step in (0, 5):
        top = 3.0 + step + variant
        save_snapshot(run / "spectrum", step, {
            "eigenvalues": torch.tensor([top, 1.0], dtype=torch.float64),
            "residuals": torch.tensor([1e-9, 1e-3], dtype=torch.float64),
            "converged": torch.tensor([True, False]),
            "eigenvectors": torch.eye(2, D)}, {"sketch_spec": sketch.spec, "scalars": {"lambda_max": top}})
        if step == 0:
            (older / "spectrum").mkdir()
            shutil.copy(run / "spectrum" / "index.json", older / "spectrum" / "index.json")
    intrinsic_id = sio.new_run_id()
    sio.write_checked_json(older / "intrinsic_dimension.json", {
        "mode": "search", "status": "running", "d_star": None, "target": 0.9, "run_id": intrinsic_id,
        "history": [{"round": 1, "step": 5, "d": 16 * (1 + variant), "metric": 0.6, "action": "double"}]})
    sio.write_checked_json(run / "intrinsic_dimension.json", {
        "mode": "search", "status": "done", "d_star": 32 * (1 + variant), "target": 0.9,
        "run_id": intrinsic_id,
        "history": [{"round": 1, "step": 5, "d": 16 * (1 + variant), "metric": 0.6, "action": "double"},
                    {"round": 2, "step": 9, "d": 32 * (1 + variant), "metric": 0.93, "action": "done"}]})
    manifest = SketchStore.open(run / "store").manifest
    for where, gen, score in ((older, manifest["generation"] - 1, 0.375), (run, manifest["generation"], 0.5)):
        sio.write_checked_json(where / "query.json", {
            "format": "lightning_sketch.query/v1", "method": "tracin", "split": "test", "store": "s",
            "ckpt": "c", "k": 2, "stores": [{"run_id": manifest["run_id"], "generation": gen}],
            "queries": [{"query": 0, "label": 1, "prediction": 1,
                         "proponents": [{"id": 3, "score": score + variant, "label": 1},
                                        {"id": 5, "score": 0.25, "label": 1}],
                         "opponents": [{"id": 4, "score": -0.5, "label": 0},
                                       {"id": 2, "score": -0.125, "label": 0}]}]})
    from lightning_sketch.spectrum.snapshot import index_run

    gen, run_id = index_run(run / "spectrum")
    sio.write_checked_json(root / "checkpoint_state.json", {
        "store": {"run_id": manifest["run_id"], "generation": manifest["generation"]},
        "spectrum": {"run_id": run_id, "generation": gen}, "intrinsic": {"run_id": intrinsic_id}})
    return run


# ---------------------------------------------------------------------------- readers
def _attribution(run: Path) -> Any:
    """TracIn scores through the Attributor (manifest, segments, weights) and a store index search."""
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.store import SketchStore

    att = Attributor(run, Net(), method="tracin")
    scores = att.scores(data(3, 7))
    store = SketchStore.open(run / "store")
    s, i = store.search(np.ones((1, D), np.float32), 3, checkpoint="step-2", index="flat")
    return att.ids.numpy(), scores.numpy(), s, i


def _weights(run: Path) -> Any:
    from lightning_sketch.store import SketchStore

    store = SketchStore.open(run / "store")
    return [{k: v.numpy() for k, v in store.load_weights(n).items()} for n in store.checkpoints]


def _probe(run: Path) -> Any:
    from lightning_sketch.attribution._stored import PROBE
    from lightning_sketch.store import SketchStore

    return {k: v.numpy() for k, v in SketchStore.open(run / "store").load_weights(PROBE).items()}


def _curvature(run: Path) -> Any:
    """Every slice's curvature (``read_curvature``) and influence scores through the Attributor
    (``fisher_if``)."""
    from lightning_sketch.attribution import Attributor
    from lightning_sketch.attribution.curvature import curvature_slices, read_curvature
    from lightning_sketch.store import SketchStore

    spec = SketchStore.open(run / "store").spec
    mats = [(n, read_curvature(run, n, spec)) for n in curvature_slices(run)]
    scores = Attributor(run, Net(), method="fisher_if").scores(data(3, 7))
    return [(n, m.numpy(), meta) for n, (m, meta) in mats], scores.numpy()


def _inspect(run: Path) -> Any:
    from lightning_sketch.store import inspect_store

    info = inspect_store(run / "store")
    if not info["health"]["ok"]:
        raise DetectedError(info["health"]["error"])
    return {k: v for k, v in info.items() if k != "path"}


def _spectrum(run: Path) -> Any:
    from lightning_sketch.spectrum.snapshot import load_index, load_snapshot, top_eigenpairs_from_snapshot

    out = []
    for e in load_index(run / "spectrum"):
        snap = load_snapshot(run / "spectrum" / e["file"])
        arrays = {k: v.numpy() for k, v in snap.items() if k != "meta"}
        out.append((e["step"], e["scalars"], arrays, snap["meta"]))
    vals, vecs, spec = top_eigenpairs_from_snapshot(run / "spectrum")
    return out, vals.numpy(), vecs.numpy(), spec


def _resume_store(run: Path) -> Any:
    """What GradientSketch does on resume: reopen the store as its writer (and release it)."""
    from lightning_sketch.store import SketchStore

    store = SketchStore.open(run / "store", mode="a")
    try:
        return store.generation, store.num_rows, store.checkpoints, store.resume_point
    finally:
        store.close()


def _resume_spectrum(run: Path) -> Any:
    """What HessianSpectrum does at setup: take the snapshot directory as its writer."""
    from lightning_sketch.spectrum.snapshot import SnapshotWriter

    writer = SnapshotWriter(run / "spectrum")
    try:
        return writer._generation
    finally:
        writer.close()


def _checkpoint_resume(run: Path) -> Any:
    """What a resume from the run's last checkpoint (or ``query --ckpt``) checks before using the
    directory: the store and the spectrum index are of the run and generation the checkpoint recorded."""
    from lightning_sketch.exceptions import RunMismatchError
    from lightning_sketch.spectrum.snapshot import index_run
    from lightning_sketch.store import SketchStore
    from lightning_sketch.store.provenance import check_store_state

    state = sio.load_checked_json(run.parent / "checkpoint_state.json", what="checkpoint state")
    store = SketchStore.open(run / "store")
    recorded = state["store"]
    check_store_state(store.manifest, run_id=recorded["run_id"], generation=recorded["generation"],
                      store=run / "store", source="the checkpoint")
    gen, run_id = index_run(run / "spectrum")
    if gen < state["spectrum"]["generation"] or run_id != state["spectrum"]["run_id"]:
        raise RunMismatchError("spectrum index of another run or an older generation")
    intrinsic = sio.load_checked_json(run / "intrinsic_dimension.json", what="intrinsic-dimension state")
    if intrinsic.get("run_id") != state["intrinsic"]["run_id"]:
        raise RunMismatchError("intrinsic-dimension state of another run")
    return store.generation, store.num_rows, gen


def _report_section(section: Callable[[Path], list]) -> Callable[[Path], Any]:
    def read(run: Path) -> Any:
        blocks = section(run)
        bad = [b for b in blocks if b.get("cls") == "bad"]
        if bad:
            raise DetectedError(bad[0]["text"])
        return [{k: v for k, v in b.items() if k != "data"} for b in blocks]

    return read


def _intrinsic(run: Path) -> Any:
    from lightning_sketch.report import _intrinsic_section

    return _report_section(_intrinsic_section)(run)


def _query(run: Path) -> Any:
    from lightning_sketch.report import _attribution_section

    return _report_section(lambda r: _attribution_section(r, None))(run)


class DetectedError(LightningSketchError):
    """A reader that reports damage instead of raising (``inspect``, ``report``) reported it."""


#: file kind -> (glob under the run directory, readers of that kind)
KINDS: dict[str, tuple[str, list[Callable[[Path], Any]]]] = {
    "store manifest": ("store/manifest.json", [_attribution, _inspect, _resume_store]),
    "store segment vectors": ("store/seg-*[0-9a-f].npy", [_attribution, _inspect, _resume_store]),
    "store segment ids": ("store/seg-*.ids.npy", [_attribution, _inspect, _resume_store]),
    "store FAISS index": ("store/index-*.faiss", [_attribution, _inspect, _resume_store]),
    "weights": ("weights/step-*.pt", [_weights, _attribution]),
    "probe examples": ("weights/probe.pt", [_probe, _attribution]),
    "curvature matrix": ("curvature/*.npy", [_curvature, _inspect, _resume_store]),
    "curvature sidecar": ("curvature/*.json", [_curvature, _inspect, _resume_store]),
    "spectrum index": ("spectrum/index.json", [_spectrum, _resume_spectrum]),
    "spectrum snapshot": ("spectrum/step_*.npz", [_spectrum, _resume_spectrum]),
    "intrinsic-dimension state": ("intrinsic_dimension.json", [_intrinsic]),
    "query result": ("query.json", [_query]),
}


#: file kind -> readers for the swap sweeps: every reader of the kind, plus the checkpoint's check where
#: the kind is part of what a checkpoint records (store, spectrum and intrinsic-dimension files).
SWAP_READERS: dict[str, list[Callable[[Path], Any]]] = {
    kind: readers + ([_checkpoint_resume]
                     if pattern.startswith(("store/", "weights/", "curvature/", "spectrum/", "intr"))
                     else [])
    for kind, (pattern, readers) in KINDS.items()
}


def swap_sweep(run: Path, kind: str, refs: list[Any], source: Path) -> dict[str, Any] | None:
    """Replace the files of ``kind`` by their intact copies under ``source`` (another run's directory,
    or the older copies kept by :func:`build`), matched by sorted order, and classify each reader of
    :data:`SWAP_READERS` (``refs``: their answers on the intact run). ``None`` when ``source`` holds no
    file of that kind (immutable files such as segments have no older version)."""
    pattern, _ = KINDS[kind]
    files, copies = sorted(run.glob(pattern)), sorted(source.glob(pattern))
    if not copies:
        return None
    originals = {f: f.read_bytes() for f in files}
    out: dict[str, Any] = {"tried": 0, "same": 0, "typed": 0, "silent": [], "untyped": []}
    try:
        for f, c in zip(files, copies):
            f.write_bytes(c.read_bytes())
        for reader, ref in zip(SWAP_READERS[kind], refs):
            outcome, detail = classify(reader, run, ref)
            out["tried"] += 1
            if outcome in ("same", "typed"):
                out[outcome] += 1
            else:
                out[outcome].append(f"{kind} from {source.name} {reader.__name__}: {detail}")
    finally:
        for f, data in originals.items():
            f.write_bytes(data)
    return out


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested answers (arrays compared bitwise, NaN-aware)."""
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        a, b = np.asarray(a), np.asarray(b)
        return (a.shape == b.shape and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def classify(reader: Callable[[Path], Any], run: Path, reference: Any) -> tuple[str, str]:
    """``("same" | "typed" | "silent" | "untyped", detail)`` of one reader on a (damaged) run."""
    try:
        answer = reader(run)
    except LightningSketchError as err:
        return "typed", f"{type(err).__name__}: {str(err)[:120]}"
    except Exception as err:
        return "untyped", f"{type(err).__name__}: {err}"
    return ("same", "") if same(answer, reference) else ("silent", "different answer, no error")


def references(run: Path) -> dict[str, list[Any]]:
    """Each kind's readers' answers on the intact run."""
    return {kind: [r(run) for r in readers] for kind, (_, readers) in KINDS.items()}


def sweep(run: Path, kind: str, refs: list[Any], *, flips: int, cuts: int, seed: int) -> dict[str, Any]:
    """Damage every file of ``kind`` at ``flips`` random byte positions (xor a random non-zero byte) and
    ``cuts`` random truncation lengths, one damage at a time, and classify each reader's outcome.

    Returns ``{"tried": n, "same": ..., "typed": ..., "silent": [...], "untyped": [...]}``.
    """
    pattern, readers = KINDS[kind]
    files = sorted(run.glob(pattern))
    assert files, (kind, pattern)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"tried": 0, "same": 0, "typed": 0, "silent": [], "untyped": []}
    for f in files:
        original = f.read_bytes()
        damages = [("flip", int(p), int(v)) for p, v in zip(rng.integers(0, len(original), flips),
                                                              rng.integers(1, 256, flips))]
        damages += [("cut", int(n), 0) for n in rng.integers(0, len(original), cuts)]
        try:
            for how, pos, val in damages:
                data = bytearray(original)
                if how == "flip":
                    data[pos] ^= val
                else:
                    del data[pos:]
                f.write_bytes(bytes(data))
                for reader, ref in zip(readers, refs):
                    outcome, detail = classify(reader, run, ref)
                    out["tried"] += 1
                    if outcome in ("same", "typed"):
                        out[outcome] += 1
                    else:
                        out[outcome].append(f"{f.name} {how}@{pos}^{val} {reader.__name__}: {detail}")
        finally:
            f.write_bytes(original)
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


# ---------------------------------------------------------------------------- JSON rewrites
_MARK = "\x00lightning-sketch-sweep\x00"


def _leaves(obj: Any, numbers: bool, path: tuple = ()) -> list[tuple]:
    """Paths of the leaves of a parsed JSON document: the numbers (``numbers=True``), else every leaf."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, numbers, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _leaves(v, numbers, (*path, i))]
    if numbers and (isinstance(obj, bool) or not isinstance(obj, (int, float))):
        return []
    return [path]


def _put(obj: Any, path: tuple, value: Any) -> Any:
    """A copy of ``obj`` with the leaf at ``path`` replaced by ``value``."""
    if not path:
        return value
    if isinstance(obj, dict):
        return {**obj, path[0]: _put(obj[path[0]], path[1:], value)}
    return [_put(v, path[1:], value) if i == path[0] else v for i, v in enumerate(obj)]


def _self_checksummed(kind: str) -> bool:
    return kind != "curvature sidecar"  # its ``sha256`` is the matrix's; the store manifest checksums it


def _digest(body: dict[str, Any]) -> str:
    """The document checksum of ``lightning_sketch.io.safeio`` (sha256 of the canonical JSON), extended
    to non-finite floats: what a reader that parsed them would compute."""
    import hashlib
    import json

    text = json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _rewrite(run: Path, kind: str, f: Path, doc: dict[str, Any], path: tuple, literal: str,
             value: Any) -> None:
    """Write ``doc`` to ``f`` with the leaf at ``path`` spelt ``literal`` (``value``: what it parses to), and
    re-record every checksum that covers ``f`` (its own, or the store manifest's entry for it), so that only
    the content itself can make a reader refuse the file."""
    import hashlib
    import json

    parsed = _put(doc, path, value)
    marked = _put(doc, path, _MARK)
    if _self_checksummed(kind):
        marked["sha256"] = _digest(parsed)
    text = json.dumps(marked, indent=1, sort_keys=True).replace(json.dumps(_MARK), literal) + "\n"
    f.write_bytes(text.encode())
    if not _self_checksummed(kind):
        manifest = run / "store" / "manifest.json"
        m = json.loads(manifest.read_text())
        rel = f.relative_to(run).as_posix()
        for entry in m["curvature"].values():
            for part in entry.values():
                if isinstance(part, dict) and part.get("file") == rel:
                    part.update(bytes=len(text.encode()), sha256=hashlib.sha256(text.encode()).hexdigest())
        manifest.write_bytes(sio.dump_checked_json(m))


#: JSON file kinds -> the readers of their content (readers that only check another file's checksum left out)
JSON_READERS: dict[str, list[Callable[[Path], Any]]] = {
    "store manifest": [_attribution, _inspect, _resume_store],
    "curvature sidecar": [_curvature],
    "spectrum index": [_spectrum, _resume_spectrum],
    "intrinsic-dimension state": [_intrinsic],
    "query result": [_query],
}
#: non-finite spellings a JSON parser may accept: Python's ``json`` turns each into a float nan/inf
NONFINITE = ("NaN", "Infinity", "-Infinity", "1e999")


def nonfinite_sweep(run: Path, kind: str, refs: list[Any], *, per_file: int, seed: int) -> dict[str, Any]:
    """Put each :data:`NONFINITE` literal in place of ``per_file`` seeded numbers of every JSON file of
    ``kind`` (checksums re-recorded, :func:`_rewrite`) and classify each reader of :data:`JSON_READERS`."""
    import json

    pattern, _ = KINDS[kind]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"tried": 0, "same": 0, "typed": 0, "silent": [], "untyped": [], "numbers": 0}
    backup = {p: p.read_bytes() for p in [*run.glob(pattern), run / "store" / "manifest.json"]}
    try:
        for f in sorted(run.glob(pattern)):
            doc = json.loads(backup[f])
            paths = _leaves(doc, numbers=True)
            chosen = rng.choice(len(paths), min(per_file, len(paths)), replace=False)
            picks = [paths[i] for i in sorted(chosen)]
            out["numbers"] += len(picks)
            for path in picks:
                for literal in NONFINITE:
                    _rewrite(run, kind, f, doc, path, literal, float(literal))
                    for reader, ref in zip(JSON_READERS[kind], refs):
                        outcome, detail = classify(reader, run, ref)
                        out["tried"] += 1
                        if outcome in ("same", "typed"):
                            out[outcome] += 1
                        else:
                            out[outcome].append(f"{f.name} {'/'.join(map(str, path))}={literal} "
                                                f"{reader.__name__}: {detail}")
                    for p, data in backup.items():
                        p.write_bytes(data)
    finally:
        for p, data in backup.items():
            p.write_bytes(data)
    return out


#: values a hand-written or hostile file may hold where the report expects something else
HOSTILE = ("<xss-probe>alert(1)</xss-probe>", "$\\frac{$ \\usepackage", "\u202e\x00\ufffe", "x" * 50_000,
           -1, 0, 2 ** 70, 1e308, True, None, [], {}, [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]],
           {"<xss-probe>": "</table><xss-probe>"})
#: file kinds whose content the report draws
REPORT_KINDS = ("store manifest", "spectrum index", "intrinsic-dimension state", "query result")


def hostile_report_sweep(run: Path, kind: str, *, cases: int, seed: int, timeout: int = 60) -> dict[str, Any]:
    """Put a :data:`HOSTILE` value in place of one seeded leaf of the file of ``kind`` at a time (checksum
    re-recorded), build the whole report and classify it: ``named`` (one more block flagged as refused
    than on the intact run), ``drawn`` (no more refused blocks), ``markup`` (a hostile tag reached the
    HTML unescaped), ``untyped`` (``build_report`` raised) or ``hang`` (over ``timeout`` seconds)."""
    import json
    import signal

    from lightning_sketch.report import build_report

    pattern, _ = KINDS[kind]
    (f,) = sorted(run.glob(pattern))
    backup = {p: p.read_bytes() for p in (f, run / "store" / "manifest.json")}
    doc = json.loads(backup[f])
    paths = [p for p in _leaves(doc, numbers=False) if p != ("sha256",)]
    base = build_report(run).count('class="bad"')
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"tried": 0, "named": 0, "drawn": 0, "markup": [], "untyped": [], "hang": []}

    def alarm(*_: Any) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for _ in range(cases):
            path = paths[int(rng.integers(len(paths)))]
            value = HOSTILE[int(rng.integers(len(HOSTILE)))]
            _rewrite(run, kind, f, doc, path, json.dumps(value), value)
            what = f"{f.name} {'/'.join(map(str, path))}={json.dumps(value)[:40]}"
            out["tried"] += 1
            signal.alarm(timeout)
            try:
                html = build_report(run)
            except TimeoutError:
                out["hang"].append(what)
                continue
            except Exception as err:
                out["untyped"].append(f"{what}: {type(err).__name__}: {str(err)[:160]}")
                continue
            finally:
                signal.alarm(0)
                for p, data in backup.items():
                    p.write_bytes(data)
            if "<xss-probe" in html:
                out["markup"].append(what)
            elif html.count('class="bad"') > base:
                out["named"] += 1
            else:
                out["drawn"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
        for p, data in backup.items():
            p.write_bytes(data)
    return out
