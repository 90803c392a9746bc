"""Confined paths and capped reads of untrusted run files (part of :mod:`lightning_sketch.io.safeio`).

:func:`confined` keeps a path named inside a file under its run directory; :func:`open_regular`
refuses devices, FIFOs and directories; :func:`read_capped` counts its cap from the bytes read;
:func:`read_json` refuses non-finite numbers
(NaN, Infinity, 1e999). Import these from :mod:`lightning_sketch.io.safeio`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from lightning_sketch.exceptions import StoreCorruptError, StoreNotFoundError, UnsafeFileError

__all__ = ["JSON_CAP", "confined", "open_regular", "read_capped", "read_json", "read_json_bytes"]

#: default cap on JSON documents a reader accepts (manifests, indexes, summaries, query results).
JSON_CAP = 64 << 20
#: bytes per ``os.read`` when streaming a file.
CHUNK = 1 << 22


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
        raise UnsafeFileError(f"{what} path {rel!r} is not a plain relative file name; the file that names "
                              "it was edited or corrupted. Restore the run directory from a trusted copy.")
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
            raise UnsafeFileError(
                f"{what} {str(path)!r} is a symlink; it is refused. Replace it by the file."
            ) from err
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
            f"{what} {str(path)!r} is {kind}, not a regular file; it is refused (reading it could hang or "
            "never end). Replace it by the file the run wrote."
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
            block = os.read(fd, min(CHUNK, cap + 1 - total))
            if not block:
                break
            parts.append(block)
            total += len(block)
            if total > cap:
                raise UnsafeFileError(
                    f"{what} {str(path)!r} holds more than {cap} bytes, more than any file of this kind the "
                    "library writes; it is refused. Restore it from the run that wrote it."
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
    """Parse JSON bytes read from ``path``; non-finite numbers are refused.

    ``NaN``/``Infinity`` literals and numbers that overflow a float (``1e999``) would parse to
    nan/inf, which no writer of this library produces and which break the canonical JSON a
    checksum is recomputed from, so they are refused like any other corruption.

    Raises:
        StoreCorruptError: not UTF-8 JSON, or it holds a non-finite number.

    Example:
        >>> read_json_bytes(b'{"a": 1.5}', path="x.json", what="doc")
        {'a': 1.5}
        >>> read_json_bytes(b'{"a": 1e999}', path="x.json", what="doc")
        Traceback (most recent call last):
        ...
        lightning_sketch.exceptions.StoreCorruptError: doc 'x.json' is not valid JSON (non-finite ...
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StoreCorruptError(
            f"{what} {str(path)!r} is not valid JSON ({str(err)[:200]}); it is truncated or corrupted. "
            "Restore it from a backup or re-run the step that wrote it."
        ) from err


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:40]} is not allowed")
    return value
