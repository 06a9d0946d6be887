"""How the ``kbms`` command ends: its exit codes, and the one place where a failure becomes one of them.

    0  success
    1  ``kbms ingest`` rejected at least one line (the others are stored)
    2  usage or configuration: a bad flag (text that is not UTF-8 too) or KBMS_* value, a database URL kbms
       cannot use (an option libpq or sqlite3 would refuse too), no database at an SQLite path, a schema not
       migrated, an address or port it cannot listen on, nothing to ingest, an unknown ``--conversation-id``
    3  the database failed: unreachable, credentials refused, unknown database, privileges missing, locked beyond
       KBMS_DB_TIMEOUT, not writable, an I/O error

A failure is told in one line on stderr that names the database (without its password; nor does a password in
anything URL-like reach the line) and the next step; the traceback follows only with ``kbms --debug`` (or
KBMS_LOG_LEVEL=debug). An error that is none of these is a bug, and keeps its traceback.
"""

from __future__ import annotations

import re
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
# database (3D000), missing privileges (42501, e.g. on the schema kbms migrates), no schema to create tables in
# (3F000: search_path names none that exists and the user may use).
REFUSING_STATES = ("28", "3D000", "42501", "3F000")


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
        driver kbms chose. Bytes that are not UTF-8 (an environment variable can hold any) are shown escaped."""
        hidden = {key: "***" for key in self.url.query if "password" in key.lower()}
        url = self.url.set(drivername=self.url.get_backend_name()).update_query_dict(hidden)
        try:
            shown = url.render_as_string(hide_password=True)
        except UnicodeEncodeError:  # quoting a part encodes it as UTF-8, which refuses surrogates
            # Escaped as \xff, and that backslash not quoted again (%5C).
            shown = _escaped(url).render_as_string(hide_password=True).replace("%5C", "\\")
        return shown.replace("%2A%2A%2A", "***")

    @property
    def file(self) -> Path | None:
        return database_file(self.url)

    @property
    def migrate_command(self) -> str:
        # Not the URL itself: what is shown has no password, and so could not be pasted.
        return "kbms migrate with the same --database-url" if self.named_by_flag else "kbms migrate"


def printable(text: str) -> str:
    """``text`` as it can be printed: the bytes of a command line or environment that are not UTF-8 (which Python
    holds as lone surrogates) as ``\\xff``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escaped(url: URL) -> URL:
    """``url`` with the bytes that are not UTF-8 in its text parts shown as ``\\xff``."""

    def escape(part: str | None) -> str | None:
        return None if part is None else printable(part)

    query = {
        escape(key) or "": escape(value) or "" if isinstance(value, str) else tuple(escape(v) or "" for v in value)
        for key, value in url.query.items()
    }
    return url.set(username=escape(url.username), host=escape(url.host), database=escape(url.database), query=query)


SECRETS_IN_TEXT = (
    # A URL's user:password@ (how a misplaced --database-url comes back in a usage message).
    (re.compile(r"(://[^\s/:@]*:)\S*(?=@)"), r"\1***"),
    # libpq's password=..., in a URL's query or a key=value connection string.
    (re.compile(r"(password=)[^\s&]*", re.IGNORECASE), r"\1***"),
)


def without_secrets(text: str) -> str:
    """``text`` with the passwords of what looks like a database URL or connection string masked."""
    for pattern, replacement in SECRETS_IN_TEXT:
        text = pattern.sub(replacement, text)
    return text


def database_failure(reason: str, database: Database | None, *, state: str = "", after: str = "") -> Failure:
    """The database failed for ``reason`` (see ``kbms.storage.failure_reason``); ``state``: the SQLSTATE of a
    PostgreSQL error (see ``sqlstate``). ``after``: a clause on what was done before it failed, told last."""
    if database is None:
        return Failure(f"the database failed ({reason}): check KBMS_DATABASE_URL / --database-url{after}", DATABASE)
    if database.file is None:
        if state.startswith(("28", "3D000")):
            return Failure(
                f"the server refused the database {database.shown} ({reason}): fix the user, password or database "
                f"name in KBMS_DATABASE_URL / --database-url{after}",
                DATABASE,
            )
        if state.startswith("3F000"):
            return Failure(
                f"the database {database.shown} has no schema for kbms ({reason}): create the schema that "
                f"search_path names, grant the user USAGE and CREATE on it, or fix KBMS_DATABASE_URL / "
                f"--database-url{after}",
                DATABASE,
            )
        if state.startswith("42501"):
            return Failure(
                f"the user of the database {database.shown} lacks a privilege ({reason}): grant it (kbms migrate "
                f"creates tables in the schema), or name another user in KBMS_DATABASE_URL / --database-url{after}",
                DATABASE,
            )
        return Failure(
            f"cannot reach the database {database.shown} ({reason}): start PostgreSQL or fix "
            f"KBMS_DATABASE_URL / --database-url{after}",
            DATABASE,
        )
    if "locked" in reason or "busy" in reason:
        return Failure(
            f"the database {database.shown} is locked by another process ({reason}): let the other writer "
            f"finish, then run again (KBMS_DB_TIMEOUT sets how long kbms waits for it){after}",
            DATABASE,
        )
    return Failure(
        f"cannot use the database {database.shown} ({reason}): check that the file and its directory "
        f"are writable and the disk has room{after}",
        DATABASE,
    )


def explain(exc: BaseException, database: Database | None) -> Failure | None:
    """What ``exc`` means to whoever ran ``kbms`` (the one mapping to exit codes); None for a bug."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, StorageUnavailable | PoolTimeout) or is_unavailable(exc) or _refusing(exc):
        return database_failure(failure_reason(exc), database, state=sqlstate(exc))
    if isinstance(exc, InputError):
        return Failure(exc.message, USAGE)
    return None


def _refusing(exc: BaseException) -> bool:
    driver = getattr(exc, "orig", None) or exc
    return isinstance(driver, psycopg.Error) and sqlstate(exc).startswith(REFUSING_STATES)


# libpq tells a refusal at connection time in words only, without its SQLSTATE: these are the server's words
# (in English unless its lc_messages says otherwise; then the failure is told as "cannot reach").
CONNECTION_REFUSALS = (
    (re.compile(r"password authentication failed|role \".*\" does not exist|no pg_hba\.conf entry"), "28000"),
    (re.compile(r"database \".*\" does not exist"), "3D000"),
    (re.compile(r"permission denied"), "42501"),
)


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of the PostgreSQL error in ``exc`` or its causes ("" if none is known)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        driver = getattr(error, "orig", None) or error
        if isinstance(driver, psycopg.Error):
            if driver.sqlstate:
                return driver.sqlstate
            text = str(driver)
            if "FATAL:" in text:  # the server answered, refusing
                return next((state for pattern, state in CONNECTION_REFUSALS if pattern.search(text)), "")
        error = error.__cause__ or error.__context__
    return ""
