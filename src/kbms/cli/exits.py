"""How the ``kbms`` command ends: its exit codes, and the one place where a failure becomes one of them.

    0  success
    1  ``kbms ingest`` rejected at least one line (the others are stored)
    2  usage or configuration: a bad flag or KBMS_* value, a database URL kbms cannot use, no database at an SQLite
       path, a schema not migrated, an address or port it cannot listen on, nothing to ingest, an unknown
       ``--conversation-id``
    3  the database failed: unreachable, credentials refused, unknown database, locked beyond KBMS_DB_TIMEOUT,
       not writable, an I/O error

A failure is told in one line on stderr that names the database (without its password) and the next step; the
traceback follows only with ``kbms --debug`` (or KBMS_LOG_LEVEL=debug). An error that is none of these is a bug,
and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import URL
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kbms.errors import InputError, StorageUnavailable
from kbms.storage import database_file, failure_reason
from kbms.storage.store import is_unavailable

OK = 0
REJECTED = 1
USAGE = 2
DATABASE = 3

# PostgreSQL refusals that are about the database, not about kbms: invalid authorization (class 28), an unknown
# database (3D000), missing privileges (42501, e.g. on the schema kbms migrates).
REFUSING_STATES = ("28", "3D000", "42501")


class Failure(Exception):
    """A failure that ``kbms`` tells in one line (``message``, without the ``kbms:`` prefix) and exits ``code``."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Database:
    """The database a command works on, as messages name it."""

    url: URL
    named_by_flag: bool  # --database-url, rather than KBMS_DATABASE_URL or the default

    @property
    def shown(self) -> str:
        """The URL without its password (``***`` in its place, also for libpq's ``?password=``) and without the
        driver kbms chose."""
        hidden = {key: "***" for key in self.url.query if "password" in key.lower()}
        url = self.url.set(drivername=self.url.get_backend_name()).update_query_dict(hidden)
        return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")

    @property
    def file(self) -> Path | None:
        return database_file(self.url)

    @property
    def migrate_command(self) -> str:
        return f"kbms migrate --database-url {self.shown}" if self.named_by_flag else "kbms migrate"


def database_failure(reason: str, database: Database | None, *, after: str = "") -> Failure:
    """The database failed for ``reason`` (see ``kbms.storage.failure_reason``). ``after``: a sentence on what
    was done before it failed."""
    if database is None:
        return Failure(f"the database failed ({reason}){after}: check KBMS_DATABASE_URL / --database-url", DATABASE)
    if database.file is None:
        return Failure(
            f"cannot reach the database {database.shown} ({reason}){after}: start PostgreSQL or fix "
            "KBMS_DATABASE_URL / --database-url",
            DATABASE,
        )
    if "locked" in reason or "busy" in reason:
        return Failure(
            f"the database {database.shown} is locked by another process ({reason}){after}: let the other writer "
            "finish, then run again (KBMS_DB_TIMEOUT sets how long kbms waits for it)",
            DATABASE,
        )
    return Failure(
        f"cannot use the database {database.shown} ({reason}){after}: check that the file and its directory "
        "are writable and the disk has room",
        DATABASE,
    )


def explain(exc: BaseException, database: Database | None) -> Failure | None:
    """What ``exc`` means to whoever ran ``kbms`` (the one mapping to exit codes); None for a bug."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, StorageUnavailable | PoolTimeout) or is_unavailable(exc) or _refusing(exc):
        return database_failure(failure_reason(exc), database)
    if isinstance(exc, InputError):
        return Failure(exc.message, USAGE)
    return None


def _refusing(exc: BaseException) -> bool:
    driver = getattr(exc, "orig", None) or exc
    state = getattr(driver, "sqlstate", None) or ""
    return isinstance(driver, psycopg.Error) and state.startswith(REFUSING_STATES)
