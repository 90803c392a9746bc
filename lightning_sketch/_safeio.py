"""Safe file I/O for everything a run writes and reads back: confined paths, capped reads,
atomic writes, self-checksummed JSON, a writer lock, and a pickle-free checkpoint loader.

A run directory (store, weights, spectrum snapshots, intrinsic-dimension state, query results)
is a file users copy, share and download, so every reader treats it as untrusted input:

- :func:`confined` resolves a path named *inside* a file (a manifest entry, an index entry)
  under its run directory and refuses absolute paths, ``..``, NUL bytes and symlinks that leave
  the directory (:class:`~lightning_sketch.exceptions.UnsafeFileError`).
- :func:`open_regular` opens without blocking (``O_NONBLOCK``: a FIFO never hangs) and refuses
  anything but a regular file (devices such as ``/dev/zero``, FIFOs, directories);
  :func:`read_capped` counts its cap from the bytes actually read, never from ``st_size``
  (which is 0 for ``/dev/zero``).
- :func:`atomic_write` writes through a fresh ``mkstemp`` file (``O_CREAT | O_EXCL``: a planted
  symlink is never followed) in the target directory, ``fsync``-s it and ``os.replace``-s it over
  the target (which replaces a symlink instead of writing through it). Any ``OSError`` (disk
  full) removes the temporary file and raises
  :class:`~lightning_sketch.exceptions.StoreWriteError`: no debris, the old file intact.
- :func:`dump_checked_json` / :func:`load_checked_json`: JSON documents that carry the sha256
  of their own canonical content, so a flipped byte that still parses is detected.
- :class:`DirLock`: one writer per directory (``fcntl.flock``), with a check that the lock file
  was not deleted or replaced behind the holder's back.
- :func:`load_torch_file`: the one place the library reads a ``torch.save`` file. It uses
  ``torch.load(weights_only=True)`` (no arbitrary pickle: a payload in a checkpoint never runs)
  with only the extra types a Lightning checkpoint needs allow-listed.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write(d / "a.json", [dump_checked_json({"x": 1})])
    >>> load_checked_json(d / "a.json", root=d, what="example")["x"]
    1
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import (
    CheckpointLoadError,
    StoreConflictError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreWriteError,
    UnsafeFileError,
)

__all__ = [
    "CHECKSUM_KEY",
    "JSON_CAP",
    "DirLock",
    "atomic_write",
    "confined",
    "dump_checked_json",
    "file_sha256",
    "load_checked_json",
    "load_torch_bytes",
    "load_torch_file",
    "open_regular",
    "read_capped",
    "read_json",
    "read_json_bytes",
    "verify_checked",
    "write_checked_json",
]

#: default cap on JSON documents a reader accepts (manifests, indexes, summaries, query results).
JSON_CAP = 64 << 20
#: the key under which a checked JSON document stores the sha256 of its own canonical content.
CHECKSUM_KEY = "sha256"
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------- paths
def confined(root: str | os.PathLike, rel: Any, *, what: str) -> Path:
    """The real path of ``root/rel``, which must stay inside ``root``.

    Args:
        root: the run (or store) directory.
        rel: a relative POSIX path read from an untrusted file.
        what: how to name the file in errors (e.g. "store segment").

    Raises:
        UnsafeFileError: ``rel`` is not a non-empty str, is absolute, has ``..`` parts or NUL bytes,
            or resolves (through symlinks) outside ``root``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> confined(d, "a/b.npy", what="x").name
        'b.npy'
        >>> confined(d, "../etc/passwd", what="x")
        Traceback (most recent call last):
        ...
        lightning_sketch.exceptions.UnsafeFileError: x path '../etc/passwd' ...
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise UnsafeFileError(f"{what} path {rel!r} is not a plain relative file name; the file that names it "
                              f"was edited or corrupted. Restore the run directory from a trusted copy.")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafeFileError(
            f"{what} path {rel!r} leaves the run directory (absolute path or '..'); it is refused. The file "
            f"that names it was edited: restore the run directory from a trusted copy."
        )
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(base / rel))
    if real != base and base not in real.parents:
        raise UnsafeFileError(
            f"{what} {str(Path(root) / rel)!r} is a symlink to {str(real)!r}, outside the run directory "
            f"{str(base)!r}; it is refused. Replace the link by the file itself."
        )
    return real


def open_regular(path: str | os.PathLike, *, what: str, follow: bool = True) -> int:
    """Open ``path`` read-only and return the fd, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (it is then refused); with
    ``follow=False`` a symlink as the last component is refused too (``O_NOFOLLOW``).

    Raises:
        StoreNotFoundError: the file does not exist.
        UnsafeFileError: a device, FIFO, socket, directory, or (``follow=False``) a symlink.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(os.fspath(path), flags)
    except FileNotFoundError as err:
        raise StoreNotFoundError(f"{what} {str(path)!r} does not exist.") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFileError(f"{what} {str(path)!r} is a symlink; it is refused. Replace it by the file.") from err
        raise UnsafeFileError(f"{what} {str(path)!r} cannot be opened ({err.strerror}).") from err
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise UnsafeFileError(
            f"{what} {str(path)!r} is {kind}, not a regular file; it is refused (reading it could hang or never "
            f"end). Replace it by the file the run wrote."
        )
    return fd


def read_capped(path: str | os.PathLike, cap: int, *, what: str, follow: bool = True) -> bytes:
    """All bytes of the regular file ``path``, refusing more than ``cap`` bytes actually read.

    Raises:
        StoreNotFoundError / UnsafeFileError: see :func:`open_regular`; ``UnsafeFileError`` also when
            the file holds more than ``cap`` bytes.
    """
    fd = open_regular(path, what=what, follow=follow)
    parts, total = [], 0
    try:
        while True:
            block = os.read(fd, min(_CHUNK, cap + 1 - total))
            if not block:
                break
            parts.append(block)
            total += len(block)
            if total > cap:
                raise UnsafeFileError(
                    f"{what} {str(path)!r} holds more than {cap} bytes, more than any file of this kind the library "
                    f"writes; it is refused. Restore it from the run that wrote it."
                )
    finally:
        os.close(fd)
    return b"".join(parts)


def read_json(path: str | os.PathLike, *, what: str, cap: int = JSON_CAP, follow: bool = True) -> Any:
    """Parse a capped, regular JSON file (no NaN/Infinity literals).

    Raises:
        StoreNotFoundError / UnsafeFileError: see :func:`read_capped`.
        StoreCorruptError: not UTF-8 JSON, or it holds NaN/Infinity.
    """
    return read_json_bytes(read_capped(path, cap, what=what, follow=follow), path=path, what=what)


def read_json_bytes(raw: bytes, *, path: str | os.PathLike, what: str) -> Any:
    """Parse JSON bytes read from ``path`` (NaN/Infinity literals refused).

    Raises:
        StoreCorruptError: not UTF-8 JSON.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StoreCorruptError(
            f"{what} {str(path)!r} is not valid JSON ({str(err)[:200]}); it is truncated or corrupted. Restore it "
            f"from a backup or re-run the step that wrote it."
        ) from err


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite constant {name} is not allowed")


# ---------------------------------------------------------------------------- checksummed JSON
def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def dump_checked_json(obj: dict[str, Any], indent: int | None = 1) -> bytes:
    """``obj`` as JSON bytes with ``obj[CHECKSUM_KEY]`` = sha256 of its canonical form (without it).

    Raises:
        ValueError: ``obj`` is not JSON-serialisable or holds NaN/inf.
    """
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps({**body, CHECKSUM_KEY: digest}, indent=indent, sort_keys=True, allow_nan=False).encode() + b"\n"


def verify_checked(obj: Any, *, path: str | os.PathLike, what: str, required: bool = True) -> dict[str, Any]:
    """Check a document read from ``path`` against its own checksum; return it without the checksum.

    Raises:
        StoreCorruptError: not a JSON object, checksum missing (when ``required``) or wrong.
    """
    if not isinstance(obj, dict):
        raise StoreCorruptError(f"{what} {str(path)!r} is not a JSON object; it was edited or corrupted.")
    recorded = obj.get(CHECKSUM_KEY)
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    if recorded is None and not required:
        return body
    if not isinstance(recorded, str) or hashlib.sha256(_canonical(body)).hexdigest() != recorded:
        raise StoreCorruptError(
            f"{what} {str(path)!r} fails its own sha256 checksum (field {CHECKSUM_KEY!r}"
            f"{' is missing' if recorded is None else ''}): its content was edited or corrupted. Restore it "
            f"from a backup or re-run the step that wrote it."
        )
    return body


def load_checked_json(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, what: str, cap: int = JSON_CAP,
    required: bool = True,
) -> dict[str, Any]:
    """Read a document written with :func:`dump_checked_json` and verify its checksum.

    With ``root``, ``path`` must lie inside ``root`` (symlinks that leave it are refused).

    Raises:
        StoreNotFoundError, UnsafeFileError, StoreCorruptError: see :func:`read_json`, :func:`verify_checked`.
    """
    if root is not None:
        path = confined(root, os.path.relpath(os.path.abspath(path), os.path.abspath(root)), what=what)
    return verify_checked(read_json(path, what=what, cap=cap), path=path, what=what, required=required)


def write_checked_json(path: str | os.PathLike, obj: dict[str, Any], *, what: str = "file") -> tuple[str, int]:
    """Atomically write ``obj`` as self-checksummed JSON (:func:`dump_checked_json`, :func:`atomic_write`).

    Raises:
        StoreWriteError: the write failed (disk full); the previous file is intact, no debris left.
    """
    return atomic_write(path, [dump_checked_json(obj)], what=what)


# ---------------------------------------------------------------------------- writing
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


def atomic_write(
    path: str | os.PathLike, chunks: Iterable[bytes | memoryview], *, fsync: bool = True, what: str = "file"
) -> tuple[str, int]:
    """Write ``chunks`` to ``path`` atomically; return ``(sha256 hex, size in bytes)``.

    The bytes go to a new ``mkstemp`` file ``<name>.tmp-<random>`` in the same directory (created with
    ``O_EXCL``, so a pre-planted symlink is never followed), are flushed and fsync-ed, then renamed
    over ``path`` (a symlink at ``path`` is replaced, not written through) and the directory is
    fsync-ed. On any ``OSError`` the temporary file is removed and ``path`` keeps its old content.

    Raises:
        StoreWriteError: the write, fsync or rename failed (e.g. ``ENOSPC``, disk full).
    """
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = -1, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            digest.update(view)
            size += len(view)
            while len(view):
                written = os.write(fd, view)
                view = view[written:]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        if fsync:
            fsync_dir(path.parent)
    except OSError as err:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        reason = "disk full (ENOSPC)" if err.errno == errno.ENOSPC else str(err)
        raise StoreWriteError(
            f"Could not write {what} {str(path)!r}: {reason}. The previous version of the file is intact and no "
            f"temporary file is left; free space (or fix permissions) and retry."
        ) from err
    return digest.hexdigest(), size


def file_sha256(path: str | os.PathLike, *, what: str = "file", follow: bool = True) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a regular file, read in 4 MiB chunks (devices/FIFOs refused)."""
    digest = hashlib.sha256()
    size = 0
    fd = open_regular(path, what=what, follow=follow)
    try:
        while True:
            block = os.read(fd, _CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


# ---------------------------------------------------------------------------- locking
class DirLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<directory>/<name>``: one writer per directory.

    :meth:`check` verifies the lock is still the one on disk: if the lock file was deleted or
    replaced (so that a second writer could take a new one), the holder must not publish.

    Raises:
        StoreWriteError: another process holds the lock, or the lock file cannot be created.
    """

    def __init__(self, directory: str | os.PathLike, name: str = ".writer.lock", *, what: str = "directory") -> None:
        self.path = Path(directory) / name
        self.what = what
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                                           0o644)
        except OSError as err:
            raise StoreWriteError(f"Cannot create the writer lock {str(self.path)!r} ({err.strerror}); check that "
                                  f"the {what} is writable and the lock is a plain file.") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._fd)
            self._fd = None
            raise StoreWriteError(
                f"Another process holds the writer lock {str(self.path)!r}: a {what} has one writer at a time. Wait "
                f"for the other run to finish, or write to another directory."
            ) from err
        self._ino = os.fstat(self._fd).st_ino

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Raise :class:`StoreConflictError` if the lock file on disk is no longer ours."""
        if self._fd is None:
            raise StoreWriteError(f"The writer lock {str(self.path)!r} was released; reopen the {self.what} to write.")
        try:
            ino = os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            ino = None
        if ino != self._ino:
            raise StoreConflictError(
                f"The writer lock {str(self.path)!r} was deleted or replaced while this writer held it, so another "
                f"writer may be active in the {self.what}; nothing was published. Stop the other writer and reopen."
            )

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
            f"Refused to load {what}: it holds objects the safe loader (torch.load with "
            f"weights_only=True) does not rebuild, because unpickling them can run arbitrary code ({reason}). "
            f"A checkpoint written by this library and Lightning loads safely; if the file comes from elsewhere, "
            f"do not trust it. If you wrote it yourself with custom objects, re-save just its state_dict "
            f"(tensors) with torch.save and pass that file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile, MemoryError, OverflowError) as err:
        raise CheckpointLoadError(
            f"{what} is not a readable PyTorch file ({type(err).__name__}: {str(err)[:200]}); it is "
            f"truncated, corrupted or of another format. Pass the .ckpt/.pt file the run wrote."
        ) from None


def sha256_bytes(data: bytes) -> str:
    """sha256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()


def bytes_reader(data: bytes) -> io.BytesIO:
    """A seekable in-memory reader over bytes already read and verified (for ``np.load``/``torch.load``)."""
    return io.BytesIO(data)
