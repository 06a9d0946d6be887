"""SQLite's URLs and connections: the file a URL names, the options it may carry, and engines whose connections
are in WAL mode with durable commits."""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import URL, Connection, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SAWarning
from sqlalchemy.pool import ConnectionPoolEntry

from kbms.errors import StorageUnavailable

BUSY_TIMEOUT_MS = 10_000


def sqlite_path(url: URL) -> Path:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ValueError("kbms needs an SQLite file (sqlite:///path/to/kbms.db), not an in-memory database")
    return Path(database)


def check_options(url: URL) -> None:
    """``ValueError`` naming an option of the URL's query that the sqlite3 driver would refuse (``?timeout=abc``)
    or ignore (``?foo=bar``), checked without opening the file."""
    dialect = url.get_dialect()()
    for key, value in url.query.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", SAWarning)  # what the driver ignores, SQLAlchemy only warns about
                dialect.create_connect_args(url.set(query={key: value}))
        except (ValueError, SAWarning):
            raise ValueError(
                f"the SQLite option ?{key}= is unknown or its value is not valid here (kbms sets the connection's "
                "options itself; KBMS_DB_TIMEOUT sets how long it waits for a lock)"
            ) from None


def make_engine(
    url: URL,
    *,
    immediate: bool | None,
    pool_size: int = 1,
    create: bool = False,
    busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
) -> Engine:
    """An engine whose connections are in WAL mode with durable commits.

    ``immediate``: True takes the write lock at BEGIN; False begins a deferred (read) transaction; None emits no
    BEGIN at all, so each statement is its own implicit transaction (single-statement reads). ``create``: make the
    file (and its directory) when there is none, as ``kbms migrate`` does; otherwise a missing file is an error,
    so that a command started in the wrong directory leaves no empty database behind. ``busy_timeout``: seconds a
    statement waits for a lock another connection holds before "database is locked".
    """
    path = sqlite_path(url)
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"Cannot create the directory {path.parent} ({exc.strerror})") from exc
    engine = create_engine(
        url,
        hide_parameters=True,  # SQL parameters are payload data: keep them out of exception messages and logs
        connect_args={"check_same_thread": False, "timeout": busy_timeout},
        pool_size=pool_size,
        max_overflow=pool_size,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the sqlite3 module, so BEGIN is ours (SQLAlchemy's pysqlite recipe).
        dbapi_connection.isolation_level = None
        _enable_wal(dbapi_connection, busy_timeout)
        for pragma in (
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            # Savepoint journals in memory: every write of a batch runs in a savepoint, and with them in a temp
            # file a batch made 60 writes to it per conversation (strace; sys time was 30 % of a backfill's CPU).
            "PRAGMA temp_store=MEMORY",
            f"PRAGMA busy_timeout={round(busy_timeout * 1000)}",
        ):
            dbapi_connection.execute(pragma)

    if not create:

        @event.listens_for(engine, "do_connect")
        def _existing_file_only(_dialect: Any, _record: ConnectionPoolEntry, cargs: list[Any], cparams: Any) -> None:
            # SQLite's mode=rw opens the file that is there and never creates one (a check before connecting would
            # race with a file removed meanwhile).
            # The path's bytes, quoted: a name that is not UTF-8 is still the file's name.
            cargs[:] = [f"file:{quote(os.fsencode(path))}?mode=rw"]
            cparams["uri"] = True

    if immediate is not None:

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _enable_wal(dbapi_connection: Any, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock it needs.

    On a new file, switching to WAL takes an exclusive lock, and SQLite answers "database is locked" at once,
    without its busy handler, when another connection is switching too (its deadlock avoidance): 24 of 800
    connections, four at a time on fresh files; once in 15 runs of the concurrent-migrators test. Once the file is
    in WAL mode the pragma takes no lock.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
