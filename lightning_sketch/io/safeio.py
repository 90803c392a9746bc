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
import hashlib
import json
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import (
    LightningSketchError,
    StoreCorruptError,
    StoreWriteError,
    UnsafeFileError,
)
from lightning_sketch.io.dirlock import DirLock
from lightning_sketch.io.paths import (
    CHUNK,
    JSON_CAP,
    confined,
    open_regular,
    read_capped,
    read_json,
    read_json_bytes,
)
from lightning_sketch.io.torchload import load_torch_bytes, load_torch_file

__all__ = [
    "CHECKSUM_KEY",
    "JSON_CAP",
    "DirLock",
    "RUN_ID_KEY",
    "atomic_write",
    "check_run_id",
    "check_write_dir",
    "confined",
    "dump_checked_json",
    "file_sha256",
    "load_checked_json",
    "load_torch_bytes",
    "load_torch_file",
    "new_run_id",
    "open_regular",
    "read_capped",
    "read_json",
    "read_json_bytes",
    "sweep_temp_files",
    "verify_checked",
    "write_checked_json",
]

#: the key under which a checked JSON document stores the sha256 of its own canonical content.
CHECKSUM_KEY = "sha256"


# ---------------------------------------------------------------------------- run ids
#: the key under which every file a writer publishes records the id of the run that wrote it.
RUN_ID_KEY = "run_id"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def new_run_id() -> str:
    """A fresh run id (uuid4, 32 lowercase hex digits), made when a writer creates its directory."""
    return uuid.uuid4().hex


def check_run_id(value: Any, *, path: str | os.PathLike, what: str) -> str | None:
    """``value`` if it is a run id or ``None`` (a file written before run ids were recorded).

    Raises:
        StoreCorruptError: anything else (the field was edited).
    """
    if value is None or (isinstance(value, str) and _RUN_ID.match(value)):
        return value
    raise StoreCorruptError(
        f"{what} {str(path)!r} records run_id {str(value)[:80]!r}, which is not a run id (32 hex "
        "digits); the "
        "file was edited. Restore it from the run that wrote it."
    )


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
    text = json.dumps({**body, CHECKSUM_KEY: digest}, indent=indent, sort_keys=True, allow_nan=False)
    return text.encode() + b"\n"


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


def write_checked_json(
    path: str | os.PathLike[str], obj: dict[str, Any], *, what: str = "file",
    before_replace: Callable[[], object] | None = None,
) -> tuple[str, int]:
    """Atomically write ``obj`` as self-checksummed JSON (:func:`dump_checked_json`, :func:`atomic_write`).

    Raises:
        StoreWriteError: the write failed (disk full); the previous file is intact, no debris left.
        StoreConflictError: raised by ``before_replace`` (see :func:`atomic_write`).
    """
    return atomic_write(path, [dump_checked_json(obj)], what=what, before_replace=before_replace)


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


#: the temporary names :func:`atomic_write` creates: ``<target name>.tmp-`` and mkstemp's 8 random characters.
_TEMP_NAME = re.compile(r"(?P<target>.+)\.tmp-[a-z0-9_]{8}")


def sweep_temp_files(
    directory: str | os.PathLike, targets: Iterable[str] | re.Pattern[str] | None = None
) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``directory``; return their names.

    Only the caller may write ``directory`` (it holds the directory's writer lock), so no write of
    another process is in flight there. Removed: regular files (never a symlink or anything else,
    not followed) directly in ``directory`` whose name is ``<target>.tmp-`` plus mkstemp's 8
    characters, with ``<target>`` in ``targets`` (names, or a pattern a whole name must match) when
    given. A missing directory, or one that is itself a symlink, removes nothing: the folder is
    opened without following a link, and its entries are listed and removed through that handle.

    Raises:
        StoreWriteError: the directory cannot be listed or a temporary file could not be removed
            (permissions).
    """
    if targets is None or isinstance(targets, re.Pattern):
        pattern = targets
        wanted = None
    else:
        pattern, wanted = None, set(targets)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.fspath(directory), flags)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        if err.errno == errno.ELOOP:  # the folder is a symlink: never followed
            return []
        raise StoreWriteError(
            f"Cannot list {os.fspath(directory)!r} to remove temporary files: {err}."
        ) from err
    removed = []
    try:
        try:
            with os.scandir(fd) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            raise StoreWriteError(
                f"Cannot list {os.fspath(directory)!r} to remove temporary files: {err}."
            ) from err
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match is None or (wanted is not None and match["target"] not in wanted) or (
                    pattern is not None and pattern.fullmatch(match["target"]) is None):
                continue
            try:
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    continue
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as err:
                path = os.path.join(os.fspath(directory), entry.name)
                raise StoreWriteError(
                    f"Cannot remove the temporary file {path!r} an interrupted write left behind: {err}. "
                    "Fix the directory's permissions or delete the file."
                ) from err
            removed.append(entry.name)
    finally:
        os.close(fd)
    return removed


def atomic_write(
    path: str | os.PathLike, chunks: Iterable[bytes | memoryview], *, fsync: bool = True, what: str = "file",
    before_replace: Callable[[], object] | None = None, root: str | os.PathLike | None = None,
) -> tuple[str, int]:
    """Write ``chunks`` to ``path`` atomically; return ``(sha256 hex, size in bytes)``.

    The bytes go to a new ``mkstemp`` file ``<name>.tmp-<random>`` in the same directory (created with
    ``O_EXCL``, so a pre-planted symlink is never followed), are flushed and fsync-ed, then renamed
    over ``path`` (a symlink at ``path`` is replaced, not written through) and the directory is
    fsync-ed. On any ``OSError`` the temporary file is removed and ``path`` keeps its old content.

    Args:
        root: the run directory ``path`` must lie in; a folder between ``root`` and ``path`` that is a
            symlink is refused before anything is written (:func:`check_write_dir`), as readers
            refuse files reached through links (:func:`confined`).
        before_replace: called after the bytes are on disk and immediately before the rename, e.g. a
            writer's lock and generation check (:meth:`DirLock.check`); whatever it raises is raised
            unchanged, the temporary file is removed and ``path`` keeps its old content; what it
            returns is ignored.

    Raises:
        StoreWriteError: the write, fsync or rename failed (e.g. ``ENOSPC``, disk full).
        UnsafeFileError: with ``root``, ``path`` is outside it or reached through a symlinked folder.
    """
    path = Path(path)
    if root is not None:
        check_write_dir(root, path.parent, what=what)
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
        if before_replace is not None:
            try:
                before_replace()
            except BaseException:
                os.unlink(tmp)
                tmp = None
                raise
        os.replace(tmp, path)
        tmp = None
        if fsync:
            fsync_dir(path.parent)
    except LightningSketchError:  # a typed error (a failed lock check) is raised as it is
        raise
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
            f"Could not write {what} {str(path)!r}: {reason}. The previous version of the file is intact and "
            "no temporary file is left; free space (or fix permissions) and retry."
        ) from err
    return digest.hexdigest(), size


def check_write_dir(root: str | os.PathLike, directory: str | os.PathLike, *, what: str = "file") -> Path:
    """Refuse to write into ``directory`` unless it lies in ``root`` without any symlinked folder between.

    ``root`` itself may be a link (the user chose it); every folder below it down to ``directory`` must
    be a real directory, so a link planted in a run directory never redirects a write elsewhere.

    Raises:
        UnsafeFileError: ``directory`` is outside ``root`` or one of its folders below ``root`` is a symlink.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / "sub").mkdir(); os.symlink(tempfile.mkdtemp(), d / "link")
        >>> check_write_dir(d, d / "sub") == d / "sub"
        True
        >>> check_write_dir(d, d / "link")
        Traceback (most recent call last):
        ...
        lightning_sketch.exceptions.UnsafeFileError: ... is a symlink ...
    """
    root, directory = Path(os.path.abspath(root)), Path(os.path.abspath(directory))
    try:
        parts = directory.relative_to(root).parts
    except ValueError:
        raise UnsafeFileError(f"Cannot write {what} into {str(directory)!r}: it is outside the run directory "
                              f"{str(root)!r}.") from None
    current = root
    for part in parts:
        current = current / part
        if part == ".." or os.path.islink(current):
            raise UnsafeFileError(
                f"Cannot write {what}: {str(current)!r} is a symlink (or '..') inside the run directory "
                f"{str(root)!r}, so the write could land outside it; it is refused. Replace the link by a "
                "real folder."
            )
    return directory


def file_sha256(path: str | os.PathLike, *, what: str = "file", follow: bool = True) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a regular file, read in 4 MiB chunks (devices/FIFOs refused)."""
    digest = hashlib.sha256()
    size = 0
    fd = open_regular(path, what=what, follow=follow)
    try:
        while True:
            block = os.read(fd, CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def sha256_bytes(data: bytes) -> str:
    """sha256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()

