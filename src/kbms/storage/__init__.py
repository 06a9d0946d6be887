"""Storage: one ``Store`` interface (``base.py``), with SQLite and PostgreSQL behind it."""

from __future__ import annotations

from sqlalchemy import URL, make_url
from sqlalchemy.engine import Engine

from kbms.storage.base import Store
from kbms.storage.sqlite import SqliteStore
from kbms.storage.sqlite import make_engine as make_sqlite_engine


def parse_database_url(text: str) -> URL:
    """A SQLAlchemy URL from a ``KBMS_DATABASE_URL``; ``ValueError`` if kbms cannot use it."""
    try:
        url = make_url(text)
    except Exception as exc:  # SQLAlchemy raises ArgumentError (and others) for garbage
        raise ValueError(f"not a database URL: {text!r}") from exc
    if url.get_backend_name() != "sqlite":
        raise ValueError(f"unsupported database {url.get_backend_name()!r}: use sqlite:///path/to/kbms.db")
    return url


def open_store(database_url: str) -> Store:
    return SqliteStore(parse_database_url(database_url))


def admin_engine(database_url: str) -> Engine:
    """An engine for migrations and schema checks."""
    return make_sqlite_engine(parse_database_url(database_url), immediate=True)


__all__ = ["Store", "admin_engine", "open_store", "parse_database_url"]
