"""How the ``kbms`` command ends: its exit codes, and the one place where a failure becomes one of them.

    0  success
    1  ``kbms ingest`` rejected at least one line (the others are stored)
    2  usage or configuration: a bad flag (text that is not UTF-8 too) or KBMS_* value, a database URL kbms
       cannot use (an option libpq or sqlite3 would refuse too), no database at an SQLite path, a schema not
       migrated, an address or port it cannot listen on, nothing to ingest, an unknown ``--conversation-id``
    3  the database failed: unreachable, credentials refused, unknown database, privileges missing, locked beyond
       KBMS_DB_TIMEOUT, not writable, an I/O error
    4  ``kbms sync``: a provider refused a source's credentials (or their scope)
    5  ``kbms sync``: a provider could not be reached, or kept answering something that is not its API

``kbms sync`` also exits 1 when a conversation ended among the dead letters (the others are stored).

A failure is told in one line on stderr that names the database (without its password; nor does a password in
anything URL-like reach the line) and the next step; the traceback follows only with ``kbms --debug`` (or
KBMS_LOG_LEVEL=debug). An error that is none of these is a bug, and keeps its traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kbms.errors import InputError, StorageUnavailable
from kbms.providers.pull import ProviderRefused, ProviderUnreachable
from kbms.storage import FailureKind, backend_of, failure_kind, failure_reason, is_database_failure

OK = 0
REJECTED = 1
USAGE = 2
DATABASE = 3
PROVIDER_REFUSED = 4
PROVIDER_UNREACHABLE = 5


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
        return backend_of(self.url).database_file(self.url)

    @property
    def engine(self) -> str:
        """The database engine, as messages name it ("PostgreSQL")."""
        return backend_of(self.url).title

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


def database_failure(
    reason: str, database: Database | None, *, exc: BaseException | None = None, after: str = ""
) -> Failure:
    """The database failed for ``reason`` (see ``kbms.storage.failure_reason``), raised as ``exc`` if it is known
    (its engine tells what it means: ``kbms.storage.failure_kind``). ``after``: a clause on what was done before it
    failed, told last."""
    if database is None:
        return Failure(f"the database failed ({reason}): check KBMS_DATABASE_URL / --database-url{after}", DATABASE)
    shown = database.shown
    kind = failure_kind(database.url, reason, exc)
    if kind is FailureKind.REFUSED:
        return Failure(
            f"the server refused the database {shown} ({reason}): fix the user, password or database "
            f"name in KBMS_DATABASE_URL / --database-url{after}",
            DATABASE,
        )
    if kind is FailureKind.NO_SCHEMA:
        return Failure(
            f"the database {shown} has no schema for kbms ({reason}): create the schema that "
            f"search_path names, grant the user USAGE and CREATE on it, or fix KBMS_DATABASE_URL / "
            f"--database-url{after}",
            DATABASE,
        )
    if kind is FailureKind.NO_PRIVILEGE:
        return Failure(
            f"the user of the database {shown} lacks a privilege ({reason}): grant it (kbms migrate "
            f"creates tables in the schema), or name another user in KBMS_DATABASE_URL / --database-url{after}",
            DATABASE,
        )
    if kind is FailureKind.UNREACHABLE:
        return Failure(
            f"cannot reach the database {shown} ({reason}): start {database.engine} or fix "
            f"KBMS_DATABASE_URL / --database-url{after}",
            DATABASE,
        )
    if kind is FailureKind.LOCKED:
        return Failure(
            f"the database {shown} is locked by another process ({reason}): let the other writer "
            f"finish, then run again (KBMS_DB_TIMEOUT sets how long kbms waits for it){after}",
            DATABASE,
        )
    return Failure(
        f"cannot use the database {shown} ({reason}): check that the file and its directory "
        f"are writable and the disk has room{after}",
        DATABASE,
    )


def explain(exc: BaseException, database: Database | None) -> Failure | None:
    """What ``exc`` means to whoever ran ``kbms`` (the one mapping to exit codes); None for a bug."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, StorageUnavailable | PoolTimeout) or is_database_failure(exc):
        return database_failure(failure_reason(exc), database, exc=exc)
    if isinstance(exc, InputError):
        return Failure(exc.message, USAGE)
    if isinstance(exc, ProviderRefused):
        return Failure(exc.message, PROVIDER_REFUSED)
    if isinstance(exc, ProviderUnreachable):
        return Failure(exc.message, PROVIDER_UNREACHABLE)
    return None
