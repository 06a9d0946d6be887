"""What a database engine brings to kbms: one object per engine (``sqlite.BACKEND``, ``postgres.BACKEND``), listed
in ``kbms.storage.BACKENDS``. The shared storage code asks it, and never which engine it is.

An engine answers for its URLs (which it accepts, how they are checked and spelled, the file they name), makes
its store and the engines of ``kbms migrate`` and the schema checks, writes its SQL (``SqlFlavor``: the upsert
factory, search and its index, the feed's lock) and the migrations' lock, and classifies its driver's errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from sqlalchemy import URL
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from kbms.errors import StorageUnavailable
from kbms.settings import Settings
from kbms.storage.base import Store
from kbms.storage.statements import SqlFlavor


class FailureKind(enum.Enum):
    """What a database failure means to whoever runs kbms (``kbms.cli.exits`` tells each in its words)."""

    UNREACHABLE = "unreachable"  # a server that cannot be reached, or does not answer
    REFUSED = "refused"  # the server refused the user, the password or the database's name
    NO_SCHEMA = "no_schema"  # no schema the user may create tables in
    NO_PRIVILEGE = "no_privilege"  # the user lacks a privilege
    LOCKED = "locked"  # another process holds the database's write lock
    UNUSABLE = "unusable"  # a file that cannot be written: permissions, disk full, an I/O error, damaged


class Backend(Protocol):
    """One database engine. URLs given to its methods are those it ``accepts``, as ``checked_url`` returned them."""

    title: str  # as messages name it: "PostgreSQL"
    example: str  # one of its URLs, as messages show it
    aliases: frozenset[str]  # URL schemes that mean it but that SQLAlchemy does not know ("postgres")
    flavor: SqlFlavor
    migration_lock: str | None  # a statement that serializes concurrent migrators; None: BEGIN already does

    def accepts(self, url: URL) -> bool:
        """Whether ``url`` names a database of this engine, with a driver kbms can use."""
        ...

    def checked_url(self, url: URL) -> URL:
        """``url`` as kbms uses it (its driver chosen); ``ValueError`` saying why kbms cannot use it."""
        ...

    def database_file(self, url: URL) -> Path | None:
        """The file holding the database (which may not exist yet); None for a database on a server."""
        ...

    def open_store(self, url: URL, settings: Settings, *, command: bool) -> Store:
        """The store, configured from ``settings``; ``command``: for a ``kbms`` command rather than the server."""
        ...

    def admin_engine(self, url: URL, *, lock_wait: float | None) -> Engine:
        """An engine for migrations; ``lock_wait``: seconds to wait for another writer's lock (None: the default)."""
        ...

    def reading_engine(self, url: URL) -> Engine:
        """An engine that only reads (schema checks): it takes no write lock and creates nothing."""
        ...

    def unavailable(self, driver: BaseException, exc: BaseException) -> bool | None:
        """Whether the driver's error ``driver`` (raised as ``exc``) says the database cannot be used right now;
        None for an error that is not this engine's driver's."""
        ...

    def is_refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database refusing a value it will not store (the input's fault, a 422)."""
        ...

    def reason_line(self, driver: BaseException) -> str | None:
        """The first line of the driver's message, if it is safe to show (an operational error's); else None."""
        ...

    def refuses_access(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database refusing kbms (credentials, privileges): a failure, not a bug."""
        ...

    def failure_kind(self, reason: str, exc: BaseException | None) -> FailureKind:
        """What the failure told by ``reason`` (see ``failure_reason``), raised as ``exc`` if known, means."""
        ...


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception: hot statements run on the driver (see Sql.run), others through SQLAlchemy."""
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


# A backend's ``unavailable``: True or False for its driver's errors, None for others.
UnavailableTest = Callable[[BaseException, BaseException], bool | None]


def is_unavailable(exc: BaseException, tests: Iterable[UnavailableTest]) -> bool:
    """Errors that say the database cannot be used right now (down, locked, read-only, full), not a bug.

    Not every "operational" error: PostgreSQL reports an over-long index entry as one, and answering 503 to that
    would have the sender retry forever.
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    driver = driver_error(exc)
    for test in tests:
        answer = test(driver, exc)
        if answer is not None:
            return answer
    return isinstance(exc, OperationalError)


def failure_reason(exc: BaseException, backends: Iterable[Backend]) -> str:
    """Why the database failed, in a few words that are safe to show an operator (``kbms`` prints them).

    The first line of an operational error's own message ("database is locked", "Connection refused", 'database
    "x" does not exist'): these name hosts, users and files, never passwords or row data. Other errors are named
    by their type only: their messages may quote the data of a statement.
    """
    engines = tuple(backends)
    fallback = type(driver_error(exc)).__name__
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        driver = driver_error(error)
        line = next((found for b in engines if (found := b.reason_line(driver)) is not None), None)
        if line is not None:
            return line[:1].lower() + line[1:200]
        if isinstance(error, StorageUnavailable) and len(seen) == 1:
            fallback = error.message[:1].lower() + error.message[1:]  # kbms's own words, when no driver's follow
        error = error.__cause__ or error.__context__
    return fallback
