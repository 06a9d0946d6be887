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
import fcntl
import logging
import os
import sqlite3
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anyio.to_thread
from sqlalchemy import URL, Connection, RootTransaction, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SAWarning
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from kbms.errors import StorageUnavailable
from kbms.storage.base import PoolUsage
from kbms.storage.feed import discard_changes, flush_changes, pending_changes
from kbms.storage.statements import Sql
from kbms.storage.store import Job, SqlStore, is_unavailable, unavailable, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
MAX_BATCH = 256
READ_POOL_SIZE = 8
# How long a write waits for the write lock before its caller hears 503 (KBMS_DB_TIMEOUT). The lock is normally
# held for milliseconds (a batch of another kbms process); longer means a foreign writer (a sqlite3 shell, a long
# migration) or a stopped process, and webhook senders commonly give up after 5 to 15 s.
LOCK_TIMEOUT = 5.0
FileIdentity = tuple[int, int] | None  # (device, inode) of the file at the database's path; None: no file there


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


class _WriterLock:
    """A lock file shared by every kbms process writing to one database. ``wait``: None waits as long as another
    process holds it; seconds give up after that long, with "Database busy"."""

    def __init__(self, path: Path, *, wait: float | None = None) -> None:
        self._path = path
        self._wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            if self._wait is None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                self._acquire_within(self._fd, self._wait)
        except OSError as exc:  # e.g. a directory that cannot be written: the database is not writable either
            raise StorageUnavailable(f"Cannot take the write lock ({exc.strerror})") from exc

    @staticmethod
    def _acquire_within(fd: int, wait: float) -> None:
        # flock has no timeout: poll. Only commands bound their wait (see SqliteStore), where 5 ms hardly matter.
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StorageUnavailable("Database busy: another process holds the write lock") from None
                time.sleep(0.005)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# A write waiting for its transaction: the job, its caller's future, and when it was queued (loop time).
Waiting = tuple[Job[Any], "asyncio.Future[Any]", float]


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
        super().__init__(Sql(insert=sqlite_insert, dialect=self._writer_engine.dialect), clock=clock)
        self._max_batch = max_batch
        self._lock_timeout = lock_timeout
        self._path = sqlite_path(url)
        self._reader_engine = make_engine(url, immediate=False, pool_size=READ_POOL_SIZE, busy_timeout=busy_timeout)
        self._inline_engine = make_engine(url, immediate=None, busy_timeout=busy_timeout)
        self._inline: Connection | None = None
        self._writer: Connection | None = None
        self._identity: FileIdentity = None  # of the file the writer opened
        self._lock = _WriterLock(self._path.with_name(self._path.name + ".writer-lock"), wait=lock_wait)
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
        # Savepoints on the driver: SQLAlchemy's own cost 50 us per write, and the writes run on the driver anyway.
        cursor = writer.connection.driver_connection.cursor()  # type: ignore[union-attr]
        discard_changes(writer)
        try:
            for job, future, _queued in batch:
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
                self._identity = _identity_of(self._path)
            return self._writer, self._writer.begin()
        except BaseException:
            self._lock.release()
            raise

    def _commit(self, transaction: RootTransaction) -> None:
        """In a thread: commit, unless the file at the database's path is no longer the one written to."""
        if _identity_of(self._path) != self._identity:
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
        if _identity_of(self._path) != self._identity:
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
        if self._identity is not None and _identity_of(self._path) != self._identity and self._idle():
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


def _identity_of(path: Path) -> FileIdentity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


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
