"""The one reader of ``torch.save`` files: ``torch.load(weights_only=True)``, never a pickle that runs.

Part of :mod:`lightning_sketch._safeio`, which re-exports :func:`load_torch_file` and
:func:`load_torch_bytes`.
"""

from __future__ import annotations

import io
import os
from typing import Any

from lightning_sketch._safepaths import open_regular
from lightning_sketch.exceptions import CheckpointLoadError

__all__ = ["load_torch_bytes", "load_torch_file"]


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
        return _torch_load(fh, f"{what} {str(path)!r}")


def load_torch_bytes(data: bytes, *, what: str) -> Any:
    """:func:`load_torch_file` on bytes already read (and checksum-verified) by the caller."""
    return _torch_load(io.BytesIO(data), what)


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
