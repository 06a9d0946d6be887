"""PostgreSQL, the scale-out store: many API processes (or hosts) on one database.

Driver: psycopg 3, synchronous, in worker threads. Measured against asyncpg and psycopg's async mode (both through
SQLAlchemy's ``run_sync``) on kbms's own statements, 32 concurrent callers, 1,500 real deliveries: equal or better
on ingest (254-297/s vs 190-244/s) and on lookups (1,570-2,561/s vs 920-1,583/s), and it keeps one synchronous SQL
layer (the ``storage`` modules by job) for both engines.

Each write is its own transaction; concurrency is the database's business: unique keys settle races between
creators, ``SELECT ... FOR UPDATE`` serializes merges of one conversation. A deadlock or serialization failure is
retried; a lock or statement that waits too long, or a lost connection, is ``StorageUnavailable`` (a 503).

The pool is bounded, and callers wait for one of its connections at most ``pool_timeout`` seconds: a slot is taken
before a thread is, so an exhausted pool answers 503 quickly instead of queueing requests behind a 30 s timeout.

A caller waits for its transaction at most ``answer_timeout`` seconds. A server that stops answering while its
TCP connections stay up (frozen, or its disk stalled) trips no timeout of the driver's, nor its own
``statement_timeout``: without this bound, as many requests as the pool has connections hung until it came back
(measured: forever, with the server stopped by SIGSTOP). The worker thread cannot be stopped; it is left to
finish, holding its pool connection, and a transaction it commits afterwards was answered 503: the sender sends
it again and the retry is recognized (delivery keys, unique keys), as after any commit whose answer was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import psycopg
from sqlalchemy import URL, Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kbms.errors import StorageUnavailable
from kbms.storage.base import PoolUsage
from kbms.storage.feed import discard_changes, flush_changes, writing_alone
from kbms.storage.postgres.connect import make_engine
from kbms.storage.postgres.failures import is_refused, is_unavailable
from kbms.storage.postgres.syntax import FLAVOR
from kbms.storage.statements import Sql
from kbms.storage.store import Job, SqlStore, refused, unavailable, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRIED_SQLSTATES = frozenset(("40001", "40P01"))  # serialization_failure, deadlock_detected
ATTEMPTS = 3
LINES_PER_TIMEOUT = 100  # a batch's lines per KBMS_DB_TIMEOUT (see _write_many): about 0.6 s of work here
EXPORT_IDLE_MS = 600_000


def _sqlstate(exc: BaseException) -> str | None:
    driver: Any = getattr(exc, "orig", None) or exc
    return getattr(driver, "sqlstate", None)


class PostgresStore(SqlStore):
    def __init__(
        self,
        url: URL,
        *,
        pool_size: int = 10,
        pool_timeout: float = 1.5,
        answer_timeout: float = 5.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._engine = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout)
        super().__init__(Sql(FLAVOR, self._engine.dialect), is_refused=is_refused, clock=clock)
        self._pool_timeout = pool_timeout
        self._answer_timeout = answer_timeout
        self._pool_size = pool_size
        self._slots = anyio.Semaphore(pool_size)
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="kbms-postgres")
        self._jobs: set[Future[Any]] = set()  # submitted to the threads and not yet done

    async def _write(self, job: Job[T]) -> T:
        return await self._run(job)

    async def _write_alone(self, job: Job[T]) -> T:
        return await self._in_slot(partial(self._transaction, job, alone=True))

    async def _write_many(self, job: Job[T], *, lines: int) -> T:
        # A batch's transaction takes as long as its lines need: KBMS_DB_TIMEOUT bounds each LINES_PER_TIMEOUT of
        # them. A single bound made `kbms ingest` (500 lines a transaction, about 3 s here with two workers) fail
        # whenever the server slowed down, and always on a slower one.
        seconds = self._answer_timeout * max(1, math.ceil(lines / LINES_PER_TIMEOUT))
        return await self._in_slot(partial(self._transaction, job), seconds=seconds)

    _read_many = _write_many  # a batch's ledger lookup: a transaction too, bounded the same way

    async def _read(self, job: Job[T]) -> T:
        return await self._run(job)

    async def _run(self, job: Job[T]) -> T:
        return await self._in_slot(partial(self._transaction, job))

    async def _lookup(self, job: Job[T]) -> T:
        # One statement needs no transaction: in autocommit, no COMMIT (a round trip each, and the server's work).
        return await self._in_slot(partial(self._call, partial(self._autocommit, job)))

    async def _in_slot(self, function: Callable[[], T], *, seconds: float | None = None) -> T:
        await self._take_slot()
        try:
            return await self._in_thread(function, self._answer_timeout if seconds is None else seconds)
        finally:
            self._slots.release()

    def _autocommit(self, job: Job[T]) -> T:
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return job(conn)

    async def _take_slot(self) -> None:
        # A free slot is taken at once, without the timer (a cancel scope) that only a wait needs.
        try:
            self._slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        try:
            with anyio.fail_after(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise StorageUnavailable("Database busy: no connection free") from None

    async def _in_thread(self, function: Callable[[], T], seconds: float) -> T:
        """``function()`` in a worker thread, answered within ``seconds`` (see the module's docstring).

        The store's executor rather than ``anyio.to_thread``, whose limiter, cancel scope and backend lookup were
        the main thread's largest cost after parsing on PostgreSQL (py-spy). Cancelling the wait abandons the
        thread, as above: it finishes on its own, and its result is dropped (``close`` waits for it).
        """
        timeout = asyncio.timeout(seconds)
        job = self._threads.submit(function)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        try:
            async with timeout:
                return await asyncio.wrap_future(job)
        except TimeoutError:
            if timeout.expired():
                raise StorageUnavailable("Database did not answer in time") from None
            raise

    def _transaction(self, job: Job[T], *, alone: bool = False) -> T:
        """``job`` in a transaction, committed; ``alone``: the job is one write (see ``feed.writing_alone``)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._engine.begin() as conn:
                    discard_changes(conn)  # whatever an earlier, failed attempt left on this connection
                    if alone:
                        writing_alone(self._sql, conn)
                    result = job(conn)
                    # Last: numbered in commit order (see flush_changes). What the job kept for the commit, the
                    # feed's lock and rows and the COMMIT go in one round trip.
                    try:
                        with self._sql.pipelined(conn):
                            flush_changes(self._sql, conn)
                            conn.commit()
                    except BaseException:
                        _end_failed_commit(conn)
                        raise
                    return result
            except (DBAPIError, psycopg.Error) as exc:
                if _sqlstate(exc) in RETRIED_SQLSTATES and attempt < ATTEMPTS:
                    log.info("retrying a transaction after %s", _sqlstate(exc))
                    continue
                if is_refused(exc):
                    raise refused(exc) from exc
                if is_unavailable(exc):
                    raise unavailable(exc) from exc
                raise
            except PoolTimeout as exc:
                raise unavailable(exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Callable[[Job[Any]], Awaitable[Any]]]:
        """A REPEATABLE READ transaction: one snapshot for all its reads. It holds a pool slot until it ends."""
        await self._take_slot()
        handoff = _Handoff()

        def begin() -> Connection:
            opened = handoff.keep(self._engine.connect().execution_options(isolation_level="REPEATABLE READ"))
            opened.begin()
            # A client reading an export slowly leaves the transaction idle between reads: not for 30 s only.
            opened.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {EXPORT_IDLE_MS}")
            return opened

        try:
            conn = await self._in_thread(partial(self._call, begin), self._answer_timeout)

            async def run(job: Job[T]) -> T:
                return await self._in_thread(partial(self._call, partial(job, conn)), self._answer_timeout)

            yield run
        finally:
            opened = handoff.release()
            if opened is not None:
                with contextlib.suppress(StorageUnavailable):
                    await self._in_thread(opened.close, self._answer_timeout)
            self._slots.release()

    def _call(self, function: Callable[[], T]) -> T:
        try:
            return function()
        except (DBAPIError, psycopg.Error, PoolTimeout) as exc:
            if is_refused(exc):
                raise refused(exc) from exc
            if isinstance(exc, PoolTimeout) or is_unavailable(exc):
                raise unavailable(exc) from exc
            raise

    def pool_usage(self) -> list[PoolUsage]:
        # Slots are taken before connections: a slot holder is about to use one, and the waiters are the queue.
        waiting = self._slots.statistics().tasks_waiting
        return [PoolUsage("postgresql", self._pool_size - self._slots.value, self._pool_size, waiting)]

    async def close(self) -> None:
        # Jobs not started yet are dropped, and those running are waited for (as long as one may take to answer):
        # a job left running, or one started after close, would use the database after its owner let it go (a test
        # dropping its schema met one mid-query: a deadlock). A thread stuck on a frozen server is left behind.
        # No thread is asked to wait: at interpreter exit (a backfill worker closes its store then) none can start.
        self._threads.shutdown(wait=False, cancel_futures=True)
        running = [asyncio.wrap_future(job) for job in list(self._jobs) if not job.done()]
        if running:
            await asyncio.wait(running, timeout=self._answer_timeout)
        self._engine.dispose()


def _end_failed_commit(conn: Connection) -> None:
    """After a pipelined COMMIT that failed: a statement before it failed, so COMMIT never ran and the transaction
    is still open, in error, on the driver. SQLAlchemy took it for ended (commit was called) and would hand the
    connection back to the pool as it is, and its next user would fail (InFailedSqlTransaction): end it here,
    or, if even that fails, drop the connection."""
    try:
        conn.connection.driver_connection.rollback()  # type: ignore[union-attr]
    except Exception:
        conn.invalidate()


class _Handoff:
    """A connection opened in a worker thread whose caller may have stopped waiting (``answer_timeout``): whoever
    comes last, the thread or the caller, closes it, so that no pool connection is lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._released = False

    def keep(self, connection: Connection) -> Connection:
        """In the thread, once the connection is open."""
        with self._lock:
            if self._released:
                connection.close()
                raise StorageUnavailable("Database did not answer in time")
            self._connection = connection
        return connection

    def release(self) -> Connection | None:
        """For the caller, when it is done: the connection to close, if it was opened already."""
        with self._lock:
            self._released = True
            connection, self._connection = self._connection, None
        return connection
