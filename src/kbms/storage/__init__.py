"""Storage: one ``Store`` interface (``base.py``), with one engine object per database engine behind it.

``BACKENDS`` lists them, by SQLAlchemy's name of the URL's backend; each is a ``backend.Backend``. What differs
between engines is asked of them, here and in the shared storage modules: none of them tests which engine it is.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL, make_url
from sqlalchemy.engine import Engine

from kbms.settings import Settings
from kbms.storage import backend, postgres, sqlite
from kbms.storage.backend import Backend, FailureKind
from kbms.storage.base import Store

BACKENDS: dict[str, Backend] = {
    "sqlite": sqlite.BACKEND,
    "postgresql": postgres.BACKEND,
}
EXAMPLES = " or ".join(engine.example for engine in BACKENDS.values())


def parse_database_url(text: str) -> URL:
    """A SQLAlchemy URL from a ``KBMS_DATABASE_URL``; ``ValueError`` if kbms cannot use it."""
    scheme = text.partition("://")[0]
    for name, engine in BACKENDS.items():
        if scheme in engine.aliases:
            text = name + text[len(scheme) :]
    try:
        url = make_url(text)
    except Exception:  # SQLAlchemy raises ArgumentError (and others) for garbage
        # Not quoted back: the text may hold a password.
        raise ValueError(f"not a database URL ({EXAMPLES})") from None
    for engine in BACKENDS.values():
        if engine.accepts(url):
            return engine.checked_url(url)
    raise ValueError(f"unsupported database {url.drivername!r}: use {EXAMPLES}")


def backend_of(url: URL) -> Backend:
    """The engine of a URL as ``parse_database_url`` returned it."""
    return BACKENDS[url.get_backend_name()]


def open_store(settings: Settings, *, command: bool = False) -> Store:
    """The store ``settings.database_url`` names, configured from ``settings``. ``command``: for a ``kbms``
    command rather than the server: on SQLite, it gives up waiting for another writer's lock after
    ``settings.db_timeout`` (see ``SqliteStore``'s ``lock_wait``)."""
    url = parse_database_url(settings.database_url)
    return backend_of(url).open_store(url, settings, command=command)


def admin_engine(database_url: str, *, lock_wait: float | None = None) -> Engine:
    """An engine for migrations: on SQLite it takes the write lock, and creates the file (and its directory).
    ``lock_wait``: seconds to wait for another writer's lock on SQLite (default: ``BUSY_TIMEOUT_MS``)."""
    url = parse_database_url(database_url)
    return backend_of(url).admin_engine(url, lock_wait=lock_wait)


def reading_engine(database_url: str | URL) -> Engine:
    """An engine that only reads (schema checks): on SQLite it takes no write lock and creates no file, so it
    works while another process writes, and leaves nothing behind where there was no database."""
    url = database_url if isinstance(database_url, URL) else parse_database_url(database_url)
    return backend_of(url).reading_engine(url)


def database_file(url: URL) -> Path | None:
    """The file of an SQLite database (which may not exist yet); None for a database on a server."""
    return backend_of(url).database_file(url)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says a database cannot be used right now (see ``backend.is_unavailable``), on any engine."""
    return backend.is_unavailable(exc, [engine.unavailable for engine in BACKENDS.values()])


def failure_reason(exc: BaseException) -> str:
    """Why the database failed, in a few words that are safe to show an operator (see ``backend.failure_reason``)."""
    return backend.failure_reason(exc, BACKENDS.values())


def is_database_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a database driver's failure kbms cannot help (unavailable, or kbms refused access),
    rather than a bug. kbms's own ``StorageUnavailable`` and a pool's timeout are not asked about here."""
    return is_unavailable(exc) or any(engine.refuses_access(exc) for engine in BACKENDS.values())


def failure_kind(url: URL, reason: str, exc: BaseException | None = None) -> FailureKind:
    """What a failure of the database at ``url``, told by ``reason`` (``failure_reason``) and raised as ``exc`` if
    known, means to whoever runs kbms."""
    return backend_of(url).failure_kind(reason, exc)


__all__ = [
    "BACKENDS",
    "Backend",
    "FailureKind",
    "Store",
    "admin_engine",
    "backend_of",
    "database_file",
    "failure_kind",
    "failure_reason",
    "is_database_failure",
    "is_unavailable",
    "open_store",
    "parse_database_url",
    "reading_engine",
]
