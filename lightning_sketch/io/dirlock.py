"""``DirLock``: one writer per directory (part of :mod:`lightning_sketch.io.safeio`, which re-exports it)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lightning_sketch.exceptions import StoreConflictError, StoreWriteError

__all__ = ["DirLock"]


# ---------------------------------------------------------------------------- locking
class DirLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<directory>/<name>``: one writer per directory.

    :meth:`check` verifies the lock is still the one on disk: if the lock file was deleted or
    replaced (so that a second writer could take a new one), the holder must not publish.

    Raises:
        StoreWriteError: another process holds the lock, or the lock file cannot be created.
    """

    #: the open lock file; ``None`` once released, or when ``__init__`` failed before opening it.
    _fd: int | None = None

    def __init__(
        self, directory: str | os.PathLike[str], name: str = ".writer.lock", *, what: str = "directory"
    ) -> None:
        self.path = Path(directory) / name
        self.what = what
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise StoreWriteError(f"Cannot create the writer lock {str(self.path)!r} ({err.strerror}); check "
                                  f"that the {what} is writable and the lock is a plain file.") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._fd)
            self._fd = None
            raise StoreWriteError(
                f"Another process holds the writer lock {str(self.path)!r}: a {what} has one writer at a "
                "time. Wait for the other run to finish, or write to another directory."
            ) from err
        self._ino = os.fstat(self._fd).st_ino

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Raise :class:`StoreConflictError` if the lock file on disk is no longer ours."""
        if self._fd is None:
            raise StoreWriteError(f"The writer lock {str(self.path)!r} was released; reopen the {self.what} "
                                  "to write.")
        try:
            ino = os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            ino = None
        if ino != self._ino:
            raise StoreConflictError(
                f"The writer lock {str(self.path)!r} was deleted or replaced while this writer held it, so "
                f"another writer may be active in the {self.what}; nothing was published. Stop the other "
                "writer and reopen."
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
