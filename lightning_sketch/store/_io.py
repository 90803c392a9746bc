"""Crash-safe file primitives of the sketch store: atomic writes, checksums and the writer lock.

Every file the store publishes is written to a temporary name in the same directory, flushed,
``fsync``-ed, renamed over its final name with :func:`os.replace` (atomic on POSIX), and then the
directory itself is ``fsync``-ed so the rename survives a power loss. A reader therefore sees
either the old file or the complete new one, never a torn write. All bytes go through
:func:`os.write` so one place handles short writes and ``ENOSPC``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sketch.exceptions import StoreCorruptError, StoreNotFoundError, StoreWriteError

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


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems refuse fsync on directories
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


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


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes], *, fsync: bool = True) -> tuple[str, int]:
    """Write ``chunks`` to ``path`` atomically; return ``(sha256 hex, size in bytes)``.

    The data goes to ``<path>.tmp-<pid>``, is flushed and fsync-ed, then renamed over ``path`` and
    the parent directory is fsync-ed. On any ``OSError`` the temporary file is removed and
    :class:`StoreWriteError` is raised; ``path`` keeps its previous content (or stays absent).

    Raises:
        StoreWriteError: the write, fsync or rename failed (e.g. ``ENOSPC``, disk full).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for chunk in chunks:
            view = memoryview(chunk)
            digest.update(view)
            size += len(view)
            while len(view):
                written = os.write(fd, view)
                view = view[written:]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except OSError as err:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = "disk full (ENOSPC)" if err.errno == errno.ENOSPC else str(err)
        raise StoreWriteError(
            f"Could not write store file {str(path)!r}: {reason}. The last committed state is intact; "
            f"free space (or fix permissions) and call commit() again: the uncommitted buffer is kept."
        ) from err
    return digest.hexdigest(), size


def write_json_atomic(path: str | os.PathLike, obj: Any) -> tuple[str, int]:
    """Atomically write ``obj`` as indented JSON (see :func:`atomic_write`)."""
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
    return atomic_write(path, [text])


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`.

    Raises:
        StoreNotFoundError: the file is missing.
        StoreCorruptError: the file is not valid UTF-8 JSON (truncated or bit-flipped).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise StoreNotFoundError(f"Store file {str(path)!r} does not exist.") from err
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreCorruptError(
            f"Store file {str(path)!r} is not valid JSON ({err}); it is truncated or corrupted. "
            f"Restore it from a backup; segment files are left untouched."
        ) from err


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class WriterLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<store>/.writer.lock``.

    Only one process may append to a store (or to one shard) at a time; readers take no lock.
    The lock is released when :meth:`release` is called or the process dies.

    Raises:
        StoreWriteError: another process already holds the lock.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / ".writer.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._fd)
            self._fd = None
            raise StoreWriteError(
                f"Another process holds the writer lock {str(self.path)!r}; a store has one writer at a "
                f"time. Open it with mode='r' to read, or give each DDP rank its own shard "
                f"(SketchStore.open_shard)."
            ) from err

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        self.release()
