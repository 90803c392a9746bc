"""Crash-safe file primitives of the sketch store: atomic writes, checksums and the writer lock.

Every file the store publishes is written to a fresh temporary file in the same directory
(``mkstemp``: ``O_CREAT | O_EXCL``, so a planted symlink is never followed), flushed,
``fsync``-ed, renamed over its final name with :func:`os.replace` (atomic on POSIX), and then the
directory itself is ``fsync``-ed so the rename survives a power loss. A reader therefore sees
either the old file or the complete new one, never a torn write. The primitives live in
:mod:`lightning_sketch.io.safeio`, shared with the other writers of a run directory.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.exceptions import StoreConflictError, StoreWriteError
from lightning_sketch.io import safeio as sio

__all__ = [
    "WriterLock",
    "atomic_write",
    "file_sha256",
    "fsync_dir",
    "npy_bytes",
    "read_json",
    "write_json_atomic",
]

_CHUNK = 1 << 22
fsync_dir = sio.fsync_dir


def npy_bytes(array: np.ndarray) -> Iterable[bytes]:
    """The bytes of ``array`` in ``.npy`` format, as a header chunk then data chunks.

    Example:
        >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> blob = b"".join(npy_bytes(a))
        >>> np.array_equal(np.load(io.BytesIO(blob)), a)
        True
    """
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    yield header.getvalue()
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        yield flat[start : start + _CHUNK].tobytes()


def atomic_write(
    path: str | os.PathLike, chunks: Iterable[bytes | memoryview], *, fsync: bool = True
) -> tuple[str, int]:
    """Write ``chunks`` to ``path`` atomically; return ``(sha256 hex, size in bytes)``.

    See :func:`lightning_sketch.io.safeio.atomic_write`: on any ``OSError`` the temporary file is
    removed and ``path`` keeps its previous content (or stays absent).

    Raises:
        StoreWriteError: the write, fsync or rename failed (e.g. ``ENOSPC``, disk full). The last
            committed state is intact; commit() can be retried (the uncommitted buffer is kept).
    """
    return _store_write(path, chunks, fsync, "store file")


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, before_replace: Callable[[], object] | None = None
) -> tuple[str, int]:
    """Atomically write ``obj`` as indented JSON carrying its own sha256.

    See :func:`~lightning_sketch.io.safeio.dump_checked_json`; ``before_replace`` runs right before the
    rename (:func:`~lightning_sketch.io.safeio.atomic_write`).
    """
    return _store_write(path, [sio.dump_checked_json(obj)], True, "store manifest", before_replace)


def _store_write(
    path: str | os.PathLike, chunks: Iterable[bytes | memoryview], fsync: bool, what: str,
    before_replace: Callable[[], object] | None = None,
) -> tuple[str, int]:
    try:
        return sio.atomic_write(path, chunks, fsync=fsync, what=what, before_replace=before_replace)
    except StoreConflictError:
        raise
    except StoreWriteError as err:
        cause = err.__cause__
        reason = "disk full (ENOSPC)" if getattr(cause, "errno", None) == errno.ENOSPC else str(cause)
        raise StoreWriteError(
            f"Could not write {what} {str(path)!r}: {reason}. The last committed state is intact; free space "
            "(or fix permissions) and call commit() again: the uncommitted buffer is kept."
        ) from cause


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file of the store (a regular file, capped; not followed out of its directory).

    Raises:
        StoreNotFoundError: the file is missing.
        StoreCorruptError: the file is not valid UTF-8 JSON (truncated or bit-flipped).
        UnsafeFileError: a device, FIFO, or a symlink leaving the store directory.
    """
    path = Path(path)
    real = sio.confined(path.parent, path.name, what="store file")
    return sio.read_json(real, what="store file")


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a regular file, read in 4 MiB chunks."""
    return sio.file_sha256(path, what="store file")


class WriterLock(sio.DirLock):
    """An exclusive, non-blocking ``fcntl.flock`` on ``<store>/.writer.lock``.

    Only one process may append to a store (or to one shard) at a time; readers take no lock.
    The lock is released when :meth:`release` is called or the process dies; :meth:`check`
    detects a lock file deleted or replaced behind the holder's back. Once it holds the lock, the
    writer removes the temporary files a killed writer left in the directory
    (:func:`~lightning_sketch.io.safeio.sweep_temp_files`).

    Raises:
        StoreWriteError: another process already holds the lock.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        try:
            super().__init__(directory, ".writer.lock", what="store")
        except StoreWriteError as err:
            raise StoreWriteError(
                f"{err} Open the store with mode='r' to read, or give each DDP rank its own shard "
                f"(SketchStore.open_shard)."
            ) from err.__cause__
        try:
            sio.sweep_temp_files(directory)
        except StoreWriteError:
            self.release()
            raise
