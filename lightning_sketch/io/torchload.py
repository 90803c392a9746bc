"""The one reader of ``torch.save`` files: ``torch.load(weights_only=True)``, never a pickle that runs.

Part of :mod:`lightning_sketch.io.safeio`, which re-exports :func:`load_torch_file` and
:func:`load_torch_bytes`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
from typing import Any

from lightning_sketch.exceptions import CheckpointLoadError
from lightning_sketch.io.paths import open_regular

__all__ = ["CHECKPOINT_DIGEST_KEY", "check_torch_archive", "checkpoint_digest", "load_torch_bytes",
           "load_torch_file"]

#: the key under which a callback records :func:`checkpoint_digest` in its checkpoint state.
CHECKPOINT_DIGEST_KEY = "checkpoint_sha256"
#: the parts of a Lightning checkpoint :func:`checkpoint_digest` covers.
DIGEST_PARTS = ("state_dict", "optimizer_states", "lr_schedulers")


# ---------------------------------------------------------------------------- torch files
def _lightning_safe_globals() -> list[Any]:
    """Types a Lightning checkpoint legitimately holds beyond tensors and builtins (hyper-parameters)."""
    import argparse
    import collections
    import pathlib

    import torch

    out: list[Any] = [argparse.Namespace, collections.OrderedDict, pathlib.PosixPath, pathlib.PurePosixPath,
                      torch.Size]
    try:
        from jsonargparse import Namespace as JNamespace

        out.append(JNamespace)
    except ImportError:
        pass
    return out


def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint", follow: bool = True) -> Any:
    """Load a ``torch.save`` file (a Lightning checkpoint, a weights file) without running its pickle.

    ``torch.load(weights_only=True)``: only tensors, containers and builtins are rebuilt, plus
    ``argparse``/``jsonargparse`` ``Namespace`` and ``pathlib`` paths (hyper-parameters; Lightning
    saves them as plain dicts). Anything else (e.g. a ``__reduce__`` that calls ``os.system``) is refused
    before it runs.

    Raises:
        StoreNotFoundError: the file does not exist.
        UnsafeFileError: it is a device, FIFO or directory.
        CheckpointLoadError: it holds a refused object, or is not a (complete) PyTorch file.

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"w": torch.ones(2)}, p)
        >>> load_torch_file(p)["w"].tolist()
        [1.0, 1.0]
    """
    fd = open_regular(path, what=what, follow=follow)
    with os.fdopen(fd, "rb") as fh:
        _check_archive(fh, f"{what} {str(path)!r}")
        return _torch_load(fh, f"{what} {str(path)!r}")


def load_torch_bytes(data: bytes, *, what: str) -> Any:
    """:func:`load_torch_file` on bytes already read and sha256-verified by the caller (so the
    archive's CRC-32 pass of :func:`load_torch_file` is not repeated)."""
    return _torch_load(io.BytesIO(data), what)


def check_torch_archive(path: str | os.PathLike, *, what: str = "checkpoint") -> None:
    """Check a ``torch.save`` file's integrity without unpickling anything.

    A ``torch.save`` file is a zip archive whose every member (the pickle and each tensor's bytes)
    carries a CRC-32; ``torch.load`` does not check them, so a flipped byte in a tensor loads as a
    different number. This reads every member and compares its CRC (about 0.2 GB/s of Python-side
    work on one core); a truncated file or a flipped byte in any member is refused. A file that is
    not a zip archive (the legacy format, which carries no CRC, or no PyTorch file) passes here and
    is left to the loader.

    Raises:
        StoreNotFoundError / UnsafeFileError: see :func:`load_torch_file`.
        CheckpointLoadError: the file is truncated, corrupted or not a PyTorch file.
    """
    fd = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as fh:
        _check_archive(fh, f"{what} {str(path)!r}")


def _check_archive(fh: Any, what: str) -> None:
    """Compare the CRC-32 of every member of the zip archive ``fh`` (left at offset 0)."""
    head = fh.read(4)
    fh.seek(0)
    if head != b"PK\x03\x04":  # the legacy pickle format, or no PyTorch file: torch.load decides
        return
    try:
        with zipfile.ZipFile(fh) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            struct.error, MemoryError, OverflowError) as err:
        raise CheckpointLoadError(
            f"{what} is damaged: its archive cannot be read ({type(err).__name__}: {str(err)[:200]}); it is "
            "truncated or corrupted. Restore the file, or use an earlier checkpoint of the run."
        ) from None
    finally:
        fh.seek(0)
    if bad is not None:
        raise CheckpointLoadError(
            f"{what} is damaged: member {bad!r} fails its CRC-32 (a flipped byte or a partial overwrite), "
            "so it would load different numbers. Restore the file, or use an earlier checkpoint of the run."
        )


def checkpoint_digest(checkpoint: dict[str, Any]) -> str:
    """sha256 of a checkpoint's model weights, optimizer and scheduler states (:data:`DIGEST_PARTS`).

    The walk is canonical: dict keys in sorted order, each tensor as its dtype, shape and raw bytes,
    each number or string by its ``repr``; anything else by its type name. A callback records it in
    ``on_save_checkpoint`` (Lightning writes the file after the hook, so the file's own hash cannot
    be recorded inside it); a reader recomputes it after loading and refuses a mismatch.
    """
    digest = hashlib.sha256()
    for part in DIGEST_PARTS:
        digest.update(part.encode() + b"\0")
        _feed(digest, checkpoint.get(part))
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        digest.update(b"{")
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode() + b":")
            _feed(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _feed(digest, item)
            digest.update(b",")
        digest.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        digest.update(repr(obj).encode())
    else:
        digest.update(f"<{type(obj).__name__}>".encode())


def _torch_load(fh: Any, what: str) -> Any:
    import pickle
    import zipfile

    import torch

    try:
        with torch.serialization.safe_globals(_lightning_safe_globals()):
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = (detail[0] if detail else str(err))[:300]
        raise CheckpointLoadError(
            f"Refused to load {what}: it holds objects the safe loader (torch.load with weights_only=True) "
            f"does not rebuild, because unpickling them can run arbitrary code ({reason}). A checkpoint "
            "written by this library and Lightning loads safely; if the file comes from elsewhere, do not "
            "trust it. If you wrote it yourself with custom objects, re-save just its state_dict (tensors) "
            "with torch.save and pass that file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile, MemoryError, OverflowError) as err:
        raise CheckpointLoadError(
            f"{what} is not a readable PyTorch file ({type(err).__name__}: {str(err)[:200]}); it is "
            f"truncated, corrupted or of another format. Pass the .ckpt/.pt file the run wrote."
        ) from None
