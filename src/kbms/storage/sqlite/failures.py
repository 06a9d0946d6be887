"""What the sqlite3 driver's errors mean: the database unavailable (a 503), or kbms's own mistake."""

from __future__ import annotations

import sqlite3

from kbms.storage.backend import FailureKind
from kbms.storage.backend import is_unavailable as _is_unavailable

# SQLite's primary result codes for a database file that cannot be used as it is: SQLITE_CORRUPT and SQLITE_NOTADB
# (a damaged or foreign file at the path). The sqlite3 module raises them as DatabaseError, not OperationalError;
# they are the database's state, not the request's: a 503, so that senders keep the payload and retry.
SQLITE_UNUSABLE_FILE = frozenset((11, 26))


def _sqlite_code(error: sqlite3.DatabaseError) -> int:
    """SQLite's primary result code; 0 for the errors the sqlite3 module raises itself (a ``ProgrammingError``
    such as "Cannot operate on a closed database" carries none)."""
    return int(getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF


def _tells_the_database(driver: BaseException) -> bool:
    """Locked, busy, read-only, disk full, an I/O error, a damaged file: the database's state, not a bug."""
    return isinstance(driver, sqlite3.OperationalError) or (
        isinstance(driver, sqlite3.DatabaseError) and _sqlite_code(driver) in SQLITE_UNUSABLE_FILE
    )


def unavailable(driver: BaseException, _exc: BaseException) -> bool | None:
    return True if _tells_the_database(driver) else None


def is_unavailable(exc: BaseException) -> bool:
    """``kbms.storage.backend.is_unavailable`` for SQLite's errors."""
    return _is_unavailable(exc, (unavailable,))


def is_refused(_exc: BaseException) -> bool:
    """SQLite stores any value kbms writes (no length or size limit it would reach first)."""
    return False


def reason_line(driver: BaseException) -> str | None:
    if not _tells_the_database(driver):
        return None
    return (str(driver).strip().splitlines() or [type(driver).__name__])[0].strip()


def refuses_access(_exc: BaseException) -> bool:
    return False  # no users: a file it may not write is unavailable (see ``unavailable``)


def failure_kind(reason: str, _exc: BaseException | None) -> FailureKind:
    # The driver's words ("database is locked") or kbms's ("Database busy: another process holds the write lock").
    return FailureKind.LOCKED if "locked" in reason or "busy" in reason else FailureKind.UNUSABLE
