"""SQLite, the embedded default: one file, written by group commits on the event loop (``store.py``).

The engine object (``BACKEND``) of ``kbms.storage.BACKENDS``: its URLs and connections (``connect.py``), its SQL
(``syntax.py``), its errors (``failures.py``), its store (``store.py``, with ``lock.py``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL
from sqlalchemy.engine import Engine

from kbms.settings import Settings
from kbms.storage.base import Store
from kbms.storage.sqlite import failures
from kbms.storage.sqlite.connect import check_options, make_engine, sqlite_path
from kbms.storage.sqlite.store import SqliteStore
from kbms.storage.sqlite.syntax import FLAVOR


class SqliteBackend:
    """``kbms.storage.backend.Backend`` for SQLite."""

    title = "SQLite"
    example = "sqlite:///path/to/kbms.db"
    aliases: frozenset[str] = frozenset()
    flavor = FLAVOR
    migration_lock: str | None = None  # the admin engine's BEGIN IMMEDIATE serializes migrators

    unavailable = staticmethod(failures.unavailable)
    is_refused = staticmethod(failures.is_refused)
    reason_line = staticmethod(failures.reason_line)
    refuses_access = staticmethod(failures.refuses_access)
    failure_kind = staticmethod(failures.failure_kind)

    def accepts(self, url: URL) -> bool:
        return url.get_backend_name() == "sqlite"

    def checked_url(self, url: URL) -> URL:
        sqlite_path(url)  # refuses in-memory databases
        check_options(url)
        return url

    def database_file(self, url: URL) -> Path | None:
        return sqlite_path(url)

    def open_store(self, url: URL, settings: Settings, *, command: bool) -> Store:
        # A command gives up waiting for another writer's lock after KBMS_DB_TIMEOUT (see SqliteStore's lock_wait).
        lock_wait = settings.db_timeout if command else None
        return SqliteStore(url, lock_timeout=settings.db_timeout, lock_wait=lock_wait)

    def admin_engine(self, url: URL, *, lock_wait: float | None) -> Engine:
        # It takes the write lock, and creates the file (and its directory).
        if lock_wait is None:
            return make_engine(url, immediate=True, create=True)
        return make_engine(url, immediate=True, create=True, busy_timeout=lock_wait)

    def reading_engine(self, url: URL) -> Engine:
        # No write lock and no file created: it works while another process writes, and leaves nothing behind
        # where there was no database.
        return make_engine(url, immediate=False)


BACKEND = SqliteBackend()

__all__ = ["BACKEND", "SqliteBackend", "SqliteStore"]
