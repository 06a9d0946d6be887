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
SQLite's sleeping busy handler); ``BEGIN IMMEDIATE`` and a busy timeout cover any other writer. Whoever holds the
lock, callers wait for it at most ``lock_timeout`` seconds, then hear 503 (see ``_begin_in_time``).

When the database fails (disk full, a file the kernel refuses to write, the file replaced underneath), the batch
is rolled back and its callers hear 503; the connections involved are closed, so that the next write opens the
file again: a connection opened while the file was read-only stays read-only, and one opened on a file that has
since been replaced writes to the old file, where an acknowledged write would be lost.

Reads run inline, on the event loop's own connection: every read the API makes is bounded (a row by key, or an
index-ordered page of at most 500), takes microseconds, and in WAL mode never waits for the writer. Handing them
to a thread pool cost more than the reads (about 120 us per hop, and 300-500 us per lookup with the GIL
hand-offs, measured). Reads that may run long (scans, search, exports) use ``_read_long``.

A store belongs to one event loop: the loop that first writes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import URL, Connection, RootTransaction
from sqlalchemy.pool import QueuePool

from kbms.errors import StorageUnavailable
from kbms.storage.base import PoolUsage
from kbms.storage.feed import discard_changes, flush_changes, pending_changes
from kbms.storage.sqlite.connect import BUSY_TIMEOUT_MS, make_engine, sqlite_path
from kbms.storage.sqlite.failures import is_unavailable
from kbms.storage.sqlite.lock import FileIdentity, WriterLock, identity_of
from kbms.storage.sqlite.syntax import FLAVOR
from kbms.storage.statements import Sql
from kbms.storage.store import Job, SqlStore, unavailable, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256
READ_POOL_SIZE = 8
# How long a write waits for the write lock before its caller hears 503 (KBMS_DB_TIMEOUT). The lock is normally
# held for milliseconds (a batch of another kbms process); longer means a foreign writer (a sqlite3 shell, a long
# migration) or a stopped process, and webhook senders commonly give up after 5 to 15 s.
LOCK_TIMEOUT = 5.0


Waiting = tuple[Job[Any], "asyncio.Future[Any]", float]


class _JobFailed(Exception):
    """A job of a batch run without savepoints failed: the batch starts again, each job in its own."""


class SqliteStore(SqlStore):
    def __init__(
        self,
        url: URL,
        *,
        max_batch: int = MAX_BATCH,
        lock_timeout: float = LOCK_TIMEOUT,
        lock_wait: float | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """``lock_wait``: None (the server) lets the thread that takes the write lock wait on after callers hear
        503 (the kbms lock file as long as it is held, SQLite's lock ``BUSY_TIMEOUT_MS``), so that the writes
        arriving meanwhile join the batch once the lock comes (see ``_begin_in_time``). A command has no one
        arriving later: with seconds here, the thread gives up after that long, so that the command ends then,
        instead of waiting for the thread when it closes the store."""
        busy_timeout = BUSY_TIMEOUT_MS / 1000 if lock_wait is None else lock_wait
        self._writer_engine = make_engine(url, immediate=True, busy_timeout=busy_timeout)
        # SQLite stores any value kbms writes (``failures.is_refused``): no test, and no savepoint per batch item.
        super().__init__(Sql(FLAVOR, self._writer_engine.dialect), is_refused=None, clock=clock)
        self._max_batch = max_batch
        self._lock_timeout = lock_timeout
        self._path = sqlite_path(url)
        self._reader_engine = make_engine(url, immediate=False, pool_size=READ_POOL_SIZE, busy_timeout=busy_timeout)
        self._inline_engine = make_engine(url, immediate=None, busy_timeout=busy_timeout)
        self._inline: Connection | None = None
        self._writer: Connection | None = None
        self._identity: FileIdentity = None  # of the file the writer opened
        self._lock = WriterLock(self._path.with_name(self._path.name + ".writer-lock"), wait=lock_wait)
        self._pending: list[Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    async def _write(self, job: Job[T]) -> T:
        if self._closed:
            raise StorageUnavailable("The store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((job, future, loop.time()))
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
                for _job, future, _queued in pending:
                    _settle(future, None, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _commit_batch(self) -> None:
        try:
            writer, transaction = await self._begin_in_time()
        except Exception as exc:
            self._fail_pending(exc)
            return
        # Taken after the lock: everything that arrived meanwhile joins this commit.
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        discard_changes(writer)
        try:
            try:
                settled = self._run_jobs(writer, batch, isolated=False)
            except _JobFailed:
                # A job failed (a bug: SQLite refuses no value kbms writes). Start again, each job in a savepoint
                # of its own, so that only that job fails.
                transaction.rollback()
                discard_changes(writer)
                transaction = await anyio.to_thread.run_sync(writer.begin)
                settled = self._run_jobs(writer, batch, isolated=True)
            flush_changes(self._sql, writer)  # one writer at a time: the feed's order is the commit order
            await anyio.to_thread.run_sync(self._commit, transaction)
        except Exception as exc:
            # Nothing of this batch is committed: every caller hears so, and may retry.
            discard_changes(writer)
            with contextlib.suppress(Exception):
                transaction.rollback()
            failure = self._failure(exc)
            settled = [(future, None, failure) for _job, future, _queued in batch]
        finally:
            self._lock.release()
        for future, result, error in settled:
            _settle(future, result, error)

    def _run_jobs(
        self, writer: Connection, batch: list[Waiting], *, isolated: bool
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run a batch's jobs in its transaction. Not ``isolated``: none in a savepoint, and the first to fail
        raises ``_JobFailed``. An open savepoint makes SQLite copy every page a write changes to its statement
        journal first: per write, that was a third of a backfill's time at 40,000 conversations, and grows with the
        database. ``isolated``: each in a savepoint of its own (on the driver: SQLAlchemy's own cost 50 us a
        write), where a failure is rolled back alone and handed to its caller."""
        cursor = writer.connection.driver_connection.cursor()  # type: ignore[union-attr]
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for job, future, _queued in batch:
            if isolated:
                cursor.execute("SAVEPOINT write")
                mark = pending_changes(writer)
            try:
                settled.append((future, job(writer), None))
            except Exception as exc:
                if is_unavailable(exc):
                    raise  # the database itself failed: the whole batch goes
                if not isolated:
                    raise _JobFailed from exc
                cursor.execute("ROLLBACK TO write")  # if even this fails, the whole batch goes
                discard_changes(writer, mark)
                settled.append((future, None, exc))
            if isolated:
                cursor.execute("RELEASE write")
        return settled

    async def _begin_in_time(self) -> tuple[Connection, RootTransaction]:
        """Take the write lock and begin, in a thread; callers that wait longer than ``lock_timeout`` hear 503.

        The wait itself goes on: a thread blocked in ``flock`` cannot be called back, and one abandoned there would
        take the lock later with nobody to release it. Whoever is still pending when the lock comes joins the batch.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        begin = asyncio.ensure_future(anyio.to_thread.run_sync(self._begin))
        try:
            while True:
                # Wake at the oldest caller's deadline, and often enough to see those who arrive meanwhile.
                deadline = min((max(queued, started) for _j, _f, queued in self._pending), default=loop.time())
                timeout = min(deadline + self._lock_timeout - loop.time(), self._lock_timeout / 4)
                done, _ = await asyncio.wait({begin}, timeout=max(timeout, 0))
                if done:
                    return begin.result()
                self._expire(started, loop.time())
        except asyncio.CancelledError:
            begin.add_done_callback(self._abandon)
            raise

    def _expire(self, started: float, now: float) -> None:
        waiting: list[Waiting] = []
        for job, future, queued in self._pending:
            if max(queued, started) + self._lock_timeout <= now:
                _settle(future, None, StorageUnavailable("Database busy: another process holds the write lock"))
            else:
                waiting.append((job, future, queued))
        self._pending = waiting

    def _abandon(self, begin: asyncio.Future[tuple[Connection, RootTransaction]]) -> None:
        """A begin whose batch was cancelled: give its lock back once it has it."""
        if begin.cancelled() or begin.exception() is not None:
            return
        _writer, transaction = begin.result()
        with contextlib.suppress(Exception):
            transaction.rollback()
        self._lock.release()

    def _begin(self) -> tuple[Connection, RootTransaction]:
        """In a thread: wait for the other writers, then BEGIN IMMEDIATE (both may block)."""
        self._lock.acquire()
        try:
            if self._writer is None:
                self._writer = self._writer_engine.connect()
                self._identity = identity_of(self._path)
            return self._writer, self._writer.begin()
        except BaseException:
            self._lock.release()
            raise

    def _commit(self, transaction: RootTransaction) -> None:
        """In a thread: commit, unless the file at the database's path is no longer the one written to."""
        if identity_of(self._path) != self._identity:
            raise StorageUnavailable("The database file was replaced or removed while in use")
        transaction.commit()

    def _failure(self, exc: BaseException) -> BaseException:
        """What the callers of a failed write hear. A database failure also closes the writer, which the next
        batch opens again (see the module's docstring)."""
        if not isinstance(exc, StorageUnavailable) and not is_unavailable(exc):
            log.exception("SQLite write batch failed", exc_info=exc)
            return exc
        self._discard_writer()
        return exc if isinstance(exc, StorageUnavailable) else unavailable(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        failure = self._failure(exc)
        pending, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        for _job, future, _queued in pending:
            _settle(future, None, failure)

    def _discard_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.invalidate()
        if identity_of(self._path) != self._identity:
            self._discard_readers()
        self._identity = None  # the next writer records the file it opens

    def _discard_readers(self) -> None:
        """Close every reading connection (a file replaced underneath: see ``ping``)."""
        self._discard_inline()
        self._reader_engine.dispose()

    def _discard_inline(self) -> None:
        inline, self._inline = self._inline, None
        if inline is not None:
            with contextlib.suppress(Exception):
                inline.invalidate()

    async def _read(self, job: Job[T]) -> T:
        try:
            if self._inline is None:
                self._inline = self._inline_engine.connect()
            try:
                return job(self._inline)
            finally:
                # No BEGIN was sent; this only ends SQLAlchemy's own bookkeeping of the "autobegun" transaction.
                self._inline.rollback()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._discard_inline()  # opened again by the next read: the file may be back, or another one
            raise unavailable(exc) from exc

    async def _read_long(self, job: Job[T]) -> T:
        """Reads that may take long (scans) must not hold up the event loop: a pooled connection, in a thread."""
        return await _off_loop(self._read_now, job)

    def _read_now(self, job: Job[T]) -> T:
        with self._reader_engine.connect() as conn, conn.begin():
            return job(conn)

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Callable[[Job[Any]], Awaitable[Any]]]:
        """A deferred read transaction on a pooled connection: in WAL mode, its first read fixes the snapshot it
        sees until it ends, while writers go on."""
        conn = await _off_loop(self._reader_engine.connect)
        try:
            await _off_loop(conn.begin)

            async def run(job: Job[T]) -> T:
                return await _off_loop(job, conn)

            yield run
        finally:
            await anyio.to_thread.run_sync(conn.close)

    async def ping(self) -> None:
        """Read the schema's version from the file now at the database's path.

        ``SELECT 1`` would not even read the file. A file replaced meanwhile is noticed here too: when no write is
        under way, every connection is closed before any is opened on the new file, because a connection opened
        while the old ones are still open would read the old file's WAL as the new file's.
        """
        if self._identity is not None and identity_of(self._path) != self._identity and self._idle():
            self._discard_writer()
        await self._read(lambda conn: conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar())

    def _idle(self) -> bool:
        return self._committer is None or self._committer.done()

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


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a thread; a database failure becomes ``StorageUnavailable``."""
    try:
        return await anyio.to_thread.run_sync(function, *args)
    except Exception as exc:
        if is_unavailable(exc):
            raise unavailable(exc) from exc
        raise


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; its write is committed all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
