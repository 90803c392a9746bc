"""Sketched curvature for influence, gathered during fit: TRAK's margin kernel or a sampled-label Fisher.

Both are ``[D, D]`` second moments K = Σ_t φ_t φ_tᵀ of per-example sketched gradients φ_t = Φ∇(·),
independent of N and of T; they differ in what is differentiated.

**TRAK's margin kernel** (estimators ``"margin"``, ``"margin-logits"``; ``GradientSketch``'s default
for classifiers): φ_t = Φ∇m_t with m the margin log p_y − log(1 − p_y) (Park et al. 2023). For the
cross-entropy the stored loss gradient is g_t = −(1 − p_t)∇m_t, so TRAK's score
φ(z)ᵀ(Σφφᵀ)⁻¹φ_t(1 − p_t) is q(z)ᵀ(K + λI)⁻¹g_t up to sign: the rows carry TRAK's out-to-loss
weighting and only the kernel has to be gathered. The margin comes from the module's
``per_example_margin(batch)`` or, under the classification convention below, from the logits
(:func:`resolve_margin_loss`).

**The sampled-label Fisher** (estimator ``"sampled"``; ``curvature="fisher"``). For a per-example
loss that is a negative log-likelihood −log p_θ(y | x), the
gradient with a label drawn from the model's own predictive distribution, ĝ = ∇_θ[−log p_θ(ŷ | x)]
with ŷ ~ p_θ(· | x), satisfies E_ŷ[ĝ ĝᵀ] = Jᵀ(diag p − p pᵀ)J, the Gauss–Newton matrix of the
cross-entropy (Martens 2020, §9). The *empirical* Fisher Σ_t g_t g_tᵀ with the true labels (the
kernel GᵀG of the stored rows) vanishes on well-fitted examples and is a poor curvature estimate
late in training (Kunstner et al. 2019). Kronfluence's EK-FAC factors use sampled labels for the
same reason (Grosse et al. 2023).

How labels are sampled (one protocol, :func:`resolve_sampled_loss`):

1. the module's ``sample_labels(batch, generator) -> batch`` if it defines one: the batch with its
   targets drawn from the model's predictive distribution (any likelihood: regression, sequence
   models, ...); the per-example loss is then the module's usual one on that batch;
2. otherwise the classification convention: ``batch`` is a mapping with integer targets
   ``batch["y"]`` ``[B]`` and the module gives logits ``[B, K]`` through
   ``per_example_logits(batch)`` or ``module(batch["x"])``; ŷ is drawn from ``softmax(logits)``
   and the module's own ``per_example_loss`` is evaluated on the batch with ``"y"`` replaced. This
   is used only after checking, on the first batch, that ``per_example_loss`` is the cross-entropy
   of those logits;
3. otherwise the empirical Fisher (true labels) is used, and the reason is recorded.

Files: one ``<run>/curvature/<slice>.npy`` (float64 ``[D, D]``, written with ``allow_pickle=False``)
per checkpoint slice, and ``<run>/curvature/<slice>.json`` with the slice name, sketch spec,
number of examples, the estimator and the SHA-256 of the ``.npy`` bytes, both written atomically
through :mod:`lightning_sketch._safeio`. :func:`read_curvature` treats both as untrusted: confined to
the run's ``curvature/`` folder, regular files only, size capped, checksum, shape, symmetry and
finiteness verified, typed errors otherwise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sketch._safeio import atomic_write, confined, read_capped, read_json, sha256_bytes
from lightning_sketch.attribution.scores import classification_margin
from lightning_sketch.exceptions import (
    SketchConfigError,
    StoreCorruptError,
    StoreWriteError,
)

__all__ = [
    "CURVATURE_DIR",
    "CURVATURE_KINDS",
    "LabelSampler",
    "accumulate_fisher",
    "curvature_estimator",
    "curvature_slices",
    "is_margin_estimator",
    "logits_margin_loss",
    "read_curvature",
    "resolve_label_sampler",
    "resolve_margin_loss",
    "write_curvature",
]

#: sub-folder of a GradientSketch run directory holding the per-slice curvature files.
CURVATURE_DIR = "curvature"
_FORMAT = "lightning_sketch.curvature/v1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: JSON sidecars are tiny; a larger file is refused before parsing.
_JSON_CAP = 1 << 16

LabelSampler = Callable[[nn.Module, Any, torch.Generator], Any]
LossFn = Callable[[nn.Module, Any], Tensor]


# ---------------------------------------------------------------------------- sampling protocol
def resolve_label_sampler(
    module: nn.Module, loss_fn: LossFn, probe: Any | None = None
) -> tuple[LabelSampler | None, str]:
    """How to draw targets from the model: ``(sampler or None, kind)``.

    ``sampler(module, batch, gen) -> batch`` returns the batch with sampled targets.

    Sampling happens outside any ``vmap`` or hook pass (one plain forward under ``no_grad``), so the
    per-example gradients of ``loss_fn`` on the returned batch are taken as usual. ``kind`` is
    ``"sampled"`` (case 1 or 2 of the module docstring) or a sentence saying why only the empirical
    Fisher can be used (``sampler`` is then ``None``). ``probe`` is one batch used to check that
    ``loss_fn`` is the cross-entropy of the logits (case 2); without it case 2 is not used.

    Example:
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.net = nn.Linear(3, 4)
        ...     def forward(self, x): return self.net(x)
        ...     def per_example_loss(self, b): return F.cross_entropy(self(b["x"]), b["y"], reduction="none")
        >>> m = M(); b = {"x": torch.randn(5, 3), "y": torch.tensor([0, 1, 2, 3, 0])}
        >>> sampler, kind = resolve_label_sampler(m, lambda mod, bb: mod.per_example_loss(bb), b)
        >>> kind, sampler(m, b, torch.Generator().manual_seed(0))["y"].shape
        ('sampled', torch.Size([5]))
    """
    own = getattr(module, "sample_labels", None)
    if callable(own):
        return (lambda mod, batch, gen: mod.sample_labels(batch, gen)), "sampled"
    why = _classification_convention(module, loss_fn, probe, "`sample_labels(batch, generator)`")
    if why is not None:
        return None, why
    logits_of = _logits_fn(module)

    def sampler(mod: nn.Module, batch: Any, gen: torch.Generator) -> Any:
        with torch.no_grad():
            p = torch.softmax(logits_of(mod, batch).detach().to(torch.float64), dim=-1).cpu()
            y_hat = torch.multinomial(p, 1, generator=gen)[:, 0].to(batch["y"].device, batch["y"].dtype)
        return {**batch, "y": y_hat}

    return sampler, "sampled"


def _classification_convention(module: nn.Module, loss_fn: LossFn, probe: Any | None, own: str) -> str | None:
    """``None`` if ``probe`` and ``module`` follow the classification convention, else why not.

    The convention: ``probe`` is a mapping with integer targets ``"y"`` ``[B]``, the module gives
    logits ``[B, K]`` (``per_example_logits(batch)`` or ``module(batch["x"])``), and ``loss_fn`` is
    their cross-entropy (checked on ``probe`` under ``no_grad``). ``own`` names the module method
    that would have made the convention unnecessary (for the message).
    """
    if probe is None:
        return "no probe batch to check the classification convention"
    if not isinstance(probe, Mapping) or "y" not in probe:
        return (
            f"{type(module).__name__} has no {own} and its batches are not mappings with integer "
            "targets 'y'"
        )
    y = probe["y"]
    if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point():
        return "batch['y'] is not an integer tensor [B]"
    with torch.no_grad():
        try:
            logits = _logits_fn(module)(module, probe)
            own_loss = loss_fn(module, probe)
        except Exception as err:  # a model outside the convention: fall back, say why
            return f"the classification convention does not apply ({type(err).__name__}: {err})"
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != y.shape[0]:
            return "the model's output is not [B, K] logits"
        ce = F.cross_entropy(logits.float(), y.to(logits.device), reduction="none")
        if own_loss.shape != ce.shape or not torch.allclose(own_loss.float(), ce, rtol=1e-4, atol=1e-5):
            return "per_example_loss is not the cross-entropy of the model's logits"
    return None


def logits_margin_loss(module: nn.Module) -> LossFn:
    """−m per example ``[B]``, m = z_y − logsumexp_{j≠y} z_j the TRAK margin of the convention's logits."""
    logits_of = _logits_fn(module)
    return lambda mod, batch: -classification_margin(logits_of(mod, batch), batch["y"])


def resolve_margin_loss(
    module: nn.Module, loss_fn: LossFn, probe: Any | None = None
) -> tuple[LossFn | None, str]:
    """The per-example −margin whose gradients form TRAK's kernel: ``(loss or None, estimator)``.

    1. the module's ``per_example_margin(batch) -> [B]`` (estimator ``"margin"``);
    2. the classification convention (see :func:`resolve_label_sampler`), with TRAK's margin
       m = log p_y − log(1 − p_y) of the logits (estimator ``"margin-logits"``);
    3. otherwise ``None`` and a sentence saying why.

    Example:
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.net = nn.Linear(3, 4)
        ...     def forward(self, x): return self.net(x)
        ...     def per_example_loss(self, b): return F.cross_entropy(self(b["x"]), b["y"], reduction="none")
        >>> m = M(); b = {"x": torch.randn(5, 3), "y": torch.tensor([0, 1, 2, 3, 0])}
        >>> fn, kind = resolve_margin_loss(m, lambda mod, bb: mod.per_example_loss(bb), b)
        >>> kind, fn(m, b).shape
        ('margin-logits', torch.Size([5]))
    """
    if callable(getattr(module, "per_example_margin", None)):
        return (lambda mod, batch: -mod.per_example_margin(batch)), "margin"
    why = _classification_convention(module, loss_fn, probe, "`per_example_margin(batch)`")
    if why is not None:
        return None, why
    return logits_margin_loss(module), "margin-logits"

def _logits_fn(module: nn.Module) -> Callable[[nn.Module, Any], Tensor]:
    if callable(getattr(module, "per_example_logits", None)):
        return lambda mod, batch: mod.per_example_logits(batch)  # type: ignore[operator]  # checked callable
    return lambda mod, batch: mod(batch["x"])


def accumulate_fisher(
    sketched: Iterable[Tensor], sketch_dim: int, out: Tensor | None = None
) -> tuple[Tensor, int]:
    """Σ_t s_t s_tᵀ over sketched gradients ``[B, D]`` chunks: ``([D, D] float64, count)``.

    Example:
        >>> f, n = accumulate_fisher([torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])], 2)
        >>> f.tolist(), n
        ([[1.0, 2.0], [2.0, 5.0]], 2)
    """
    acc = torch.zeros(sketch_dim, sketch_dim, dtype=torch.float64) if out is None else out
    n = 0
    for s in sketched:
        s = s.detach().to("cpu", torch.float64)
        s = s[torch.isfinite(s).all(dim=1)]
        acc.addmm_(s.T, s)
        n += int(s.shape[0])
    return acc, n


# ---------------------------------------------------------------------------- files
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise StoreCorruptError(
            f"Invalid curvature slice name {name!r}: only letters, digits, '_', '.', '-'."
        )
    return name


def write_curvature(
    run_dir: str | Path, name: str, matrix: Tensor, count: int, spec: Mapping[str, Any], estimator: str
) -> Path:
    """Write one slice's ``[D, D]`` curvature and its checksummed sidecar atomically; returns the .npy path.

    Raises:
        StoreWriteError: when the files cannot be written (disk full, permissions): nothing partial stays.
    """
    name = _check_name(name)
    folder = Path(run_dir) / CURVATURE_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreWriteError(f"Could not create {folder} ({err}).") from err
    m = matrix.detach().to("cpu", torch.float64)
    m = 0.5 * (m + m.T)
    buf = io.BytesIO()
    np.save(buf, m.numpy(), allow_pickle=False)
    digest, _ = atomic_write(folder / f"{name}.npy", [buf.getvalue()], what="curvature matrix")
    meta = {
        "format": _FORMAT,
        "slice": name,
        "count": int(count),
        "estimator": str(estimator),
        "dim": int(m.shape[0]),
        "spec": dict(spec),
        "sha256": digest,
    }
    atomic_write(
        folder / f"{name}.json", [json.dumps(meta, sort_keys=True).encode()], what="curvature sidecar"
    )
    return folder / f"{name}.npy"


def curvature_slices(run_dir: str | Path) -> list[str]:
    """Names of the slices that have a curvature sidecar in ``<run_dir>/curvature`` (sorted)."""
    folder = Path(run_dir) / CURVATURE_DIR
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(
        p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json") and _NAME_RE.match(p.name[:-5])
    )


def read_curvature(run_dir: str | Path, name: str, spec: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Read and verify one slice's curvature: ``([D, D] float64, metadata)``.

    Raises:
        StoreNotFoundError: when the slice has no curvature file.
        StoreCorruptError: on a checksum, format, shape, spec, symmetry or finiteness mismatch.
        UnsafeFileError: for a path that is not a regular file inside the run's ``curvature/`` folder.
    """
    name = _check_name(name)
    root = Path(run_dir)
    side = confined(root, f"{CURVATURE_DIR}/{name}.json", what="curvature sidecar")
    meta = read_json(side, what="curvature sidecar", cap=_JSON_CAP)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("slice") != name:
        raise StoreCorruptError(f"{side} is not the curvature sidecar of slice {name!r}.")
    dim = meta.get("dim")
    if not isinstance(dim, int) or not 1 <= dim <= 1 << 16:
        raise StoreCorruptError(f"{side} has an invalid dim {dim!r}.")
    if dict(meta.get("spec") or {}) != dict(spec):
        raise StoreCorruptError(
            f"The curvature of slice {name!r} was sketched with {meta.get('spec')}, the store with "
            f"{dict(spec)}; "
            f"it belongs to another run."
        )
    path = confined(root, f"{CURVATURE_DIR}/{name}.npy", what="curvature matrix")
    data = read_capped(path, dim * dim * 8 + 4096, what="curvature matrix")
    if sha256_bytes(data) != meta.get("sha256"):
        raise StoreCorruptError(f"{path} fails its SHA-256 check: the file was changed or damaged.")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise StoreCorruptError(f"{path} is not a numpy array file ({err}).") from err
    if arr.dtype != np.float64 or arr.shape != (dim, dim):
        raise StoreCorruptError(f"{path} holds {arr.dtype} {arr.shape}, expected float64 ({dim}, {dim}).")
    m = torch.from_numpy(np.array(arr))
    if not bool(torch.isfinite(m).all()) or not torch.allclose(m, m.T):
        raise StoreCorruptError(f"{path} is not a finite symmetric matrix.")
    count = meta.get("count")
    if not isinstance(count, int) or count < 0 or float(m.trace()) < 0:
        raise StoreCorruptError(f"{side} has an invalid count or trace.")
    return m, meta


#: the values of ``GradientSketch(curvature=...)``.
CURVATURE_KINDS = ("auto", "margin", "fisher", "none")


def check_curvature_arg(curvature: str) -> str:
    """Validate the ``curvature`` argument of the callback (one of :data:`CURVATURE_KINDS`)."""
    if curvature not in CURVATURE_KINDS:
        raise SketchConfigError(f"`curvature` must be one of {CURVATURE_KINDS}, got {curvature!r}.")
    return curvature


def is_margin_estimator(estimator: Any) -> bool:
    """Whether a sidecar's ``estimator`` names TRAK's margin kernel (else a Fisher estimate)."""
    return isinstance(estimator, str) and estimator.startswith("margin")


def curvature_estimator(run_dir: str | Path, name: str) -> str | None:
    """The ``estimator`` in slice ``name``'s sidecar, or ``None`` when the slice has no curvature.

    Reads only the small JSON sidecar (confined, capped); :func:`read_curvature` verifies the matrix.
    """
    name = _check_name(name)
    side = Path(run_dir) / CURVATURE_DIR / f"{name}.json"
    if not side.exists():
        return None
    safe = confined(Path(run_dir), f"{CURVATURE_DIR}/{name}.json", what="curvature sidecar")
    meta = read_json(safe, what="curvature sidecar", cap=_JSON_CAP)
    estimator = meta.get("estimator") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not isinstance(estimator, str):
        raise StoreCorruptError(f"{side} is not a curvature sidecar.")
    return estimator
