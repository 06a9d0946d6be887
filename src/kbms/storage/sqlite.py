"""SQLite, the embedded default: WAL, durable commits, writes batched into group commits on the event loop.

Why batches: SQLite allows one write transaction at a time. Letting requests race for it surfaces "database is
locked" under load; queueing every write and running whatever is waiting in one transaction never does, and one
commit (one fsync) then serves them all. Each write still runs in its own savepoint, so a failing write is rolled
back alone, and a caller is answered only after the transaction holding its write is committed: a 2xx always
means "on disk" (``synchronous=FULL``).

Why on the event loop, not in a writer thread: the statements take microseconds, while a second Python thread
made the two threads trade the GIL around every SQLite call (each release cost up to a switch interval), which
doubled the CPU time of every request (measured with py-spy). So the batch runs inline; only what blocks goes to a
thread: taking the write lock and committing (the fsync), during which the loop parses the next requests.

Several processes on one file: a lock file serializes their writers (waiters wake as soon as it is released, unlike
SQLite's sleeping busy handler); ``BEGIN IMMEDIATE`` and a busy timeout cover any other writer.

Reads run inline, on the event loop's own connection: every read the API makes is bounded (a row by key, or an
index-ordered page of at most 500), takes microseconds, and in WAL mode never waits for the writer. Handing them
to a thread pool cost more than the reads (about 120 us per hop, and 300-500 us per lookup with the GIL
hand-offs, measured). Reads that may run long (scans, search, exports) use ``_read_long``.

A store belongs to one event loop: the loop that first writes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import URL, Connection, RootTransaction, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from kbms.errors import StorageUnavailable
from kbms.storage.base import PoolUsage
from kbms.storage.sql import Sql, discard_changes, flush_changes, pending_changes
from kbms.storage.store import Job, SqlStore, is_unavailable, unavailable, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
MAX_BATCH = 256
READ_POOL_SIZE = 8


def sqlite_path(url: URL) -> Path:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ValueError("kbms needs an SQLite file (sqlite:///path/to/kbms.db), not an in-memory database")
    return Path(database)


def make_engine(url: URL, *, immediate: bool | None, pool_size: int = 1) -> Engine:
    """An engine whose connections are in WAL mode with durable commits.

    ``immediate``: True takes the write lock at BEGIN; False begins a deferred (read) transaction; None emits no
    BEGIN at all, so each statement is its own implicit transaction (single-statement reads).
    """
    sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        hide_parameters=True,  # SQL parameters are payload data: keep them out of exception messages and logs
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        pool_size=pool_size,
        max_overflow=pool_size,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the sqlite3 module, so BEGIN is ours (SQLAlchemy's pysqlite recipe).
        dbapi_connection.isolation_level = None
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        ):
            dbapi_connection.execute(pragma)

    if immediate is not None:

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class _WriterLock:
    """A lock file shared by every kbms process writing to one database."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SqliteStore(SqlStore):
    def __init__(self, url: URL, *, max_batch: int = MAX_BATCH, clock: Callable[[], datetime] = utc_now) -> None:
        self._writer_engine = make_engine(url, immediate=True)
        super().__init__(Sql(insert=sqlite_insert, dialect=self._writer_engine.dialect), clock=clock)
        self._max_batch = max_batch
        self._reader_engine = make_engine(url, immediate=False, pool_size=READ_POOL_SIZE)
        self._inline_engine = make_engine(url, immediate=None)
        self._inline: Connection | None = None
        self._writer: Connection | None = None
        self._lock = _WriterLock(sqlite_path(url).with_name(sqlite_path(url).name + ".writer-lock"))
        self._pending: list[tuple[Job[Any], asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    async def _write(self, job: Job[T]) -> T:
        if self._closed:
            raise StorageUnavailable("The store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending())
        return await future

    async def _commit_pending(self) -> None:
        while self._pending:
            try:
                await self._commit_batch()
            except BaseException as exc:  # a bug here must not strand the callers: answer them, and go on
                log.exception("SQLite write batch failed")
                pending, self._pending = self._pending, []
                for _job, future in pending:
                    _settle(future, None, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _commit_batch(self) -> None:
        writer = self._writer
        if writer is None:
            writer = self._writer = self._writer_engine.connect()
        try:
            transaction = await anyio.to_thread.run_sync(self._begin, writer)
        except Exception as exc:
            self._fail_pending(exc)
            return
        # Taken after the lock: everything that arrived meanwhile joins this commit.
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        # Savepoints on the driver: SQLAlchemy's own cost 50 us per write, and the writes run on the driver anyway.
        cursor = writer.connection.driver_connection.cursor()  # type: ignore[union-attr]
        discard_changes(writer)
        try:
            for job, future in batch:
                cursor.execute("SAVEPOINT write")
                mark = pending_changes(writer)
                try:
                    settled.append((future, job(writer), None))
                except Exception as exc:
                    if is_unavailable(exc):
                        raise  # the database itself failed: the whole batch goes
                    cursor.execute("ROLLBACK TO write")  # if even this fails, the whole batch goes
                    discard_changes(writer, mark)
                    settled.append((future, None, exc))
                cursor.execute("RELEASE write")
            flush_changes(self._sql, writer)  # one writer at a time: the feed's order is the commit order
            await anyio.to_thread.run_sync(transaction.commit)
        except Exception as exc:
            # Nothing of this batch is committed: every caller hears so, and may retry.
            discard_changes(writer)
            with contextlib.suppress(Exception):
                transaction.rollback()
            if not is_unavailable(exc):
                log.exception("SQLite write batch failed")
            failure: BaseException = unavailable(exc) if is_unavailable(exc) else exc
            settled = [(future, None, failure) for _job, future in batch]
        finally:
            self._lock.release()
        for future, result, error in settled:
            _settle(future, result, error)

    def _begin(self, writer: Connection) -> RootTransaction:
        """In a thread: wait for the other writers, then BEGIN IMMEDIATE (both may block)."""
        self._lock.acquire()
        try:
            return writer.begin()
        except BaseException:
            self._lock.release()
            raise

    def _fail_pending(self, exc: BaseException) -> None:
        failure: BaseException = unavailable(exc) if is_unavailable(exc) else exc
        if not is_unavailable(exc):
            log.exception("SQLite could not begin a write", exc_info=exc)
        pending, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        for _job, future in pending:
            _settle(future, None, failure)

    async def _read(self, job: Job[T]) -> T:
        if self._inline is None:
            self._inline = self._inline_engine.connect()
        try:
            return job(self._inline)
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise
        finally:
            # No BEGIN was sent; this only ends SQLAlchemy's own bookkeeping of the "autobegun" transaction.
            self._inline.rollback()

    async def _read_long(self, job: Job[T]) -> T:
        """Reads that may take long (scans) must not hold up the event loop: a pooled connection, in a thread."""
        return await anyio.to_thread.run_sync(self._read_now, job)

    def _read_now(self, job: Job[T]) -> T:
        try:
            with self._reader_engine.connect() as conn, conn.begin():
                return job(conn)
        except Exception as exc:
            if is_unavailable(exc):
                raise unavailable(exc) from exc
            raise

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Callable[[Job[Any]], Awaitable[Any]]]:
        """A deferred read transaction on a pooled connection: in WAL mode, its first read fixes the snapshot it
        sees until it ends, while writers go on."""
        conn = await anyio.to_thread.run_sync(self._reader_engine.connect)
        try:
            await anyio.to_thread.run_sync(conn.begin)

            async def run(job: Job[T]) -> T:
                try:
                    return await anyio.to_thread.run_sync(job, conn)
                except Exception as exc:
                    if is_unavailable(exc):
                        raise unavailable(exc) from exc
                    raise

            yield run
        finally:
            await anyio.to_thread.run_sync(conn.close)

    def pool_usage(self) -> list[PoolUsage]:
        # The writer: one connection, busy while a group commit runs; waiting are the writes queued for the next.
        committing = int(self._committer is not None and not self._committer.done())
        reader = self._reader_engine.pool
        checked_out = reader.checkedout() if isinstance(reader, QueuePool) else 0
        return [
            PoolUsage("sqlite_writer", committing, 1, len(self._pending)),
            PoolUsage("sqlite_reader", checked_out, 2 * READ_POOL_SIZE, 0),  # make_engine: as many again overflow
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await self._committer
        for connection in (self._inline, self._writer):
            if connection is not None:
                connection.close()
        for engine in (self._writer_engine, self._reader_engine, self._inline_engine):
            engine.dispose()
        self._lock.close()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; its write is committed all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
