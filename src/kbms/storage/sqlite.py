"""SQLite, the embedded default: WAL, durable commits, one writer thread with group commit.

Why one writer: SQLite allows one write transaction at a time. Letting request threads race for it surfaces
"database is locked" under load; funnelling every write through one thread never does, and it lets writes that
arrive together share one transaction and one fsync (group commit). Each write still runs in its own savepoint,
so one failing write is rolled back alone, and a caller is answered only after the transaction holding its write
is committed: a 2xx always means "on disk" (``synchronous=FULL``).

Reads run inline, on the event loop's own connection: every read the API makes is bounded (a row by key, or an
index-ordered page of at most 500), takes microseconds, and in WAL mode never waits for the writer. Handing them
to a thread pool cost more than the reads (about 120 us per hop, and 300-500 us per lookup with the GIL
hand-offs, measured). Reads that may run long (scans, search, exports) use ``_read_long``.

Several processes on one file still work: ``BEGIN IMMEDIATE`` plus a busy timeout serialize their writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import URL, Connection, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry

from kbms.errors import StorageUnavailable
from kbms.storage.sql import Sql
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


@dataclass(slots=True)
class _Write:
    job: Job[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)

    def settle(self, result: Any, error: BaseException | None) -> None:
        # A RuntimeError means the caller's loop is gone (shutdown): nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; its write is committed all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_STOP = object()


class SqliteStore(SqlStore):
    def __init__(self, url: URL, *, max_batch: int = MAX_BATCH, clock: Callable[[], datetime] = utc_now) -> None:
        self._writer_engine = make_engine(url, immediate=True)
        super().__init__(Sql(insert=sqlite_insert, dialect=self._writer_engine.dialect), clock=clock)
        self._max_batch = max_batch
        self._reader_engine = make_engine(url, immediate=False, pool_size=READ_POOL_SIZE)
        self._inline_engine = make_engine(url, immediate=None)
        self._inline: Connection | None = None
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="kbms-sqlite-writer", daemon=True)
        self._thread.start()

    async def _write(self, job: Job[T]) -> T:
        if self._closed:
            raise StorageUnavailable("The store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Write(job, loop, future))
        return await future

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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await anyio.to_thread.run_sync(self._thread.join)
        if self._inline is not None:
            self._inline.close()
        for engine in (self._writer_engine, self._reader_engine, self._inline_engine):
            engine.dispose()

    def _drain(self) -> None:
        """The writer thread: take every write waiting, run them in one transaction, answer them all.

        It must outlive any bug in a write: a dead writer would leave every caller waiting forever."""
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Write] = [first]  # type: ignore[list-item]
            stopping = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            try:
                self._commit(batch)
            except BaseException as exc:  # a bug in _commit itself: answer the batch, keep the thread alive
                log.exception("SQLite writer failed a batch")
                for write in batch:
                    write.settle(None, exc)
            if stopping:
                return

    def _commit(self, batch: list[_Write]) -> None:
        settled: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            with self._writer_engine.connect() as conn, conn.begin():
                for write in batch:
                    try:
                        with conn.begin_nested():
                            settled.append((write, write.job(conn), None))
                    except Exception as exc:
                        if is_unavailable(exc):
                            raise  # the database itself failed: the whole batch goes
                        settled.append((write, None, exc))
        except Exception as exc:
            # Nothing of this batch is committed: every caller hears so, and may retry.
            if not is_unavailable(exc):
                log.exception("SQLite write batch failed")
            failure: BaseException = unavailable(exc) if is_unavailable(exc) else exc
            for write in batch:
                write.settle(None, failure)
            return
        for write, result, error in settled:
            write.settle(result, error)
