"""The lock file that serializes the writers of every kbms process on one database, and the identity of the file
at the database's path (to notice it replaced underneath)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from kbms.errors import StorageUnavailable

FileIdentity = tuple[int, int] | None  # (device, inode) of the file at the database's path; None: no file there


class WriterLock:
    """A lock file shared by every kbms process writing to one database. ``wait``: None waits as long as another
    process holds it; seconds give up after that long, with "Database busy"."""

    def __init__(self, path: Path, *, wait: float | None = None) -> None:
        self._path = path
        self._wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            if self._wait is None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                self._acquire_within(self._fd, self._wait)
        except OSError as exc:  # e.g. a directory that cannot be written: the database is not writable either
            raise StorageUnavailable(f"Cannot take the write lock ({exc.strerror})") from exc

    @staticmethod
    def _acquire_within(fd: int, wait: float) -> None:
        # flock has no timeout: poll. Only commands bound their wait (see SqliteStore), where 5 ms hardly matter.
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StorageUnavailable("Database busy: another process holds the write lock") from None
                time.sleep(0.005)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def identity_of(path: Path) -> FileIdentity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino
