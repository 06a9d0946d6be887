"""Storage: one ``Store`` interface (``base.py``), with SQLite and PostgreSQL behind it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL, make_url
from sqlalchemy.engine import Engine

from kbms.settings import Settings
from kbms.storage import postgres, sqlite
from kbms.storage.base import Store
from kbms.storage.store import failure_reason

POSTGRES_SCHEMES = frozenset(("postgresql", "postgres"))


def parse_database_url(text: str) -> URL:
    """A SQLAlchemy URL from a ``KBMS_DATABASE_URL``; ``ValueError`` if kbms cannot use it."""
    scheme = text.partition("://")[0]
    if scheme == "postgres":  # the libpq spelling, which SQLAlchemy does not know
        text = "postgresql" + text[len(scheme) :]
    try:
        url = make_url(text)
    except Exception:  # SQLAlchemy raises ArgumentError (and others) for garbage
        # Not quoted back: the text may hold a password.
        raise ValueError("not a database URL (sqlite:///path/to/kbms.db or postgresql://user@host/db)") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        sqlite.sqlite_path(url)  # refuses in-memory databases
        sqlite.check_options(url)
        return url
    if backend in POSTGRES_SCHEMES and url.get_driver_name() in ("psycopg", "psycopg2", "postgresql"):
        postgres.check_options(url)
        return postgres.postgres_url(url)
    raise ValueError(f"unsupported database {url.drivername!r}: use sqlite:///path/to/kbms.db or postgresql://...")


def is_postgres(url: URL) -> bool:
    return url.get_backend_name() == "postgresql"


def open_store(settings: Settings, *, command: bool = False) -> Store:
    """The store ``settings.database_url`` names, configured from ``settings``. ``command``: for a ``kbms``
    command rather than the server: on SQLite, it gives up waiting for another writer's lock after
    ``settings.db_timeout`` (see ``SqliteStore``'s ``lock_wait``)."""
    url = parse_database_url(settings.database_url)
    if is_postgres(url):
        return postgres.PostgresStore(
            url,
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout,
            answer_timeout=settings.db_timeout,
        )
    lock_wait = settings.db_timeout if command else None
    return sqlite.SqliteStore(url, lock_timeout=settings.db_timeout, lock_wait=lock_wait)


def admin_engine(database_url: str, *, lock_wait: float | None = None) -> Engine:
    """An engine for migrations: on SQLite it takes the write lock, and creates the file (and its directory).
    ``lock_wait``: seconds to wait for another writer's lock on SQLite (default: ``sqlite.BUSY_TIMEOUT_MS``)."""
    url = parse_database_url(database_url)
    if is_postgres(url):
        return postgres.make_engine(url, pool_size=1, pool_timeout=10)
    if lock_wait is None:
        return sqlite.make_engine(url, immediate=True, create=True)
    return sqlite.make_engine(url, immediate=True, create=True, busy_timeout=lock_wait)


def reading_engine(database_url: str | URL) -> Engine:
    """An engine that only reads (schema checks): on SQLite it takes no write lock and creates no file, so it
    works while another process writes, and leaves nothing behind where there was no database."""
    url = database_url if isinstance(database_url, URL) else parse_database_url(database_url)
    if is_postgres(url):
        return postgres.make_engine(url, pool_size=1, pool_timeout=10)
    return sqlite.make_engine(url, immediate=False)


def database_file(url: URL) -> Path | None:
    """The file of an SQLite database (which may not exist yet); None for a database on a server."""
    return None if is_postgres(url) else sqlite.sqlite_path(url)


__all__ = [
    "Store",
    "admin_engine",
    "database_file",
    "failure_reason",
    "open_store",
    "parse_database_url",
    "reading_engine",
]
