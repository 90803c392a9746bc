"""A small but complete run directory and one reader per file kind, for the integrity sweeps.

Used by ``tests/security`` (sampled sweeps, fast) and ``benchmarks/reliability.py`` (the figures
in ``docs/reliability.md``). The run directory holds every kind of file a run writes:

    run/store/manifest.json, seg-*.npy, seg-*.ids.npy, index-*.faiss   (SketchStore, 2 checkpoints)
    run/weights/step-1.pt, step-2.pt                                     (recorded in the manifest)
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

from lightning_sketch.io import safeio as sio
from lightning_sketch.exceptions import LightningSketchError

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
            "residuals": torch.tensor([1e-9, 1e-3], dtype=torch.float64), "converged": torch.tensor([True, False]),
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
        out.append((e["step"], e["scalars"], {k: v.numpy() for k, v in snap.items() if k != "meta"}, snap["meta"]))
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
    "weights": ("weights/*.pt", [_weights, _attribution]),
    "spectrum index": ("spectrum/index.json", [_spectrum, _resume_spectrum]),
    "spectrum snapshot": ("spectrum/step_*.npz", [_spectrum, _resume_spectrum]),
    "intrinsic-dimension state": ("intrinsic_dimension.json", [_intrinsic]),
    "query result": ("query.json", [_query]),
}


#: file kind -> readers for the swap sweeps: every reader of the kind, plus the checkpoint's check where
#: the kind is part of what a checkpoint records (store, spectrum and intrinsic-dimension files).
SWAP_READERS: dict[str, list[Callable[[Path], Any]]] = {
    kind: readers + ([_checkpoint_resume] if pattern.startswith(("store/", "weights/", "spectrum/", "intr"))
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
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
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
