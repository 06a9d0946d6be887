"""The ``Store`` contract over SQL. Backends decide how a write or a read reaches a connection."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from sqlalchemy import Connection

from kbms.deliveries import (
    Applied,
    ConversationKey,
    Delivery,
    KnownDelivery,
    LedgerEntry,
    Outcome,
    Pending,
    Reader,
    Rebuilt,
)
from kbms.errors import FieldIssue, StorageUnavailable, ValidationFailed
from kbms.model import Change, Conversation, ConversationSnapshot, Redactor, micros
from kbms.storage import feed, overview, reads, rebuild, state, writes
from kbms.storage.backend import driver_error
from kbms.storage.base import (
    ALL,
    Activity,
    ChangeRecord,
    Cursor,
    DeliveryRecord,
    ExportBatch,
    Filters,
    Hit,
    Page,
    WorkspaceCount,
)
from kbms.storage.statements import Sql
from kbms.storage.sync import SyncSql
from kbms.storage.sync_store import SyncStateStore

T = TypeVar("T")
Job = Callable[[Connection], T]
EXPORT_CHUNK = 500  # conversations per read of an export: about 2.5 MB of detail JSON


def _sort_key(item: Pending) -> tuple[str, str, str, str]:
    # The delivery key breaks ties: two batches holding the same deliveries claim their ledger rows in one order.
    change, key = item.change, item.delivery.delivery_key
    return ("", "", "", key) if change is None else (change.provider, change.workspace, change.external_id, key)


def utc_now() -> datetime:
    return datetime.now(UTC)


def refused(exc: BaseException) -> ValidationFailed:
    issue = FieldIssue("body", "unstorable_value", f"The database refused a value ({type(driver_error(exc)).__name__})")
    return ValidationFailed([issue])


def unavailable(exc: BaseException) -> StorageUnavailable:
    # The driver's message can carry SQL parameters (payload data): keep it out of what the caller sees.
    return StorageUnavailable(f"Database unavailable ({type(exc.__cause__ or exc).__name__})")


class SqlStore(SyncStateStore, abc.ABC):
    """Implements ``kbms.storage.base.Store`` with the statements of ``kbms.storage.statements``."""

    def __init__(
        self,
        statements: Sql,
        *,
        is_refused: Callable[[BaseException], bool] | None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """``is_refused``: the engine's test for an error that is a value the database will not store; None when it
        never refuses one (SQLite), so that a batch needs no savepoint per item to fail one alone."""
        self._sql = statements
        self._sync = SyncSql(statements.flavor)
        self._is_refused = is_refused
        self._clock = clock

    @abc.abstractmethod
    async def _write(self, job: Job[T]) -> T:
        """Run ``job`` inside a write transaction; return once that transaction is committed."""

    @abc.abstractmethod
    async def _read(self, job: Job[T]) -> T:
        """Run ``job`` on a connection that sees committed data (a short, bounded read)."""

    async def _write_many(self, job: Job[T], *, lines: int) -> T:
        """``_write`` of a job of ``lines`` writes (a batch): backends that bound a transaction's time bound it by
        its size."""
        return await self._write(job)

    async def _read_many(self, job: Job[T], *, lines: int) -> T:
        """``_read`` of a job about ``lines`` items at once (a batch's ledger lookup): bounded by its size too."""
        return await self._read(job)

    async def _write_alone(self, job: Job[T]) -> T:
        """``_write`` of a job that is one write (one delivery): backends that give it a transaction of its own may
        send its statements with the commit (``feed.writing_alone``)."""
        return await self._write(job)

    async def _lookup(self, job: Job[T]) -> T:
        """A read of one statement (a ledger lookup, a detail): it sees one snapshot without a transaction, which
        backends may spare it."""
        return await self._read(job)

    async def _read_long(self, job: Job[T]) -> T:
        """A read that may take long (scans): backends that read on the event loop move it elsewhere."""
        return await self._read(job)

    async def ingest(self, delivery: Delivery, change: Change | None, *, redact: Redactor | None = None) -> Applied:
        # Rows are built before the write (see state.Creation); wasted only when the conversation already exists.
        creation = state.prepare(change) if isinstance(change, ConversationSnapshot) else None
        now = micros(self._clock())
        job = partial(
            writes.apply_delivery,
            self._sql,
            delivery=delivery,
            change=change,
            now=now,
            redact=redact,
            creation=creation,
        )
        return await self._write_alone(job)

    async def ingest_many(
        self, items: Sequence[Pending], *, redact: Redactor | None = None
    ) -> list[Applied | ValidationFailed | None]:
        creations = [state.prepare(i.change) if isinstance(i.change, ConversationSnapshot) else None for i in items]
        # One conversation order for every writer: two batches sharing conversations lock them in the same order
        # on PostgreSQL (no deadlock between them), and a batch's repeats of one conversation merge in turn.
        order = sorted(range(len(items)), key=lambda i: _sort_key(items[i]))
        now = micros(self._clock())

        def apply(conn: Connection, index: int) -> Applied | None:
            item = items[index]
            if item.issues is not None:
                writes.record_rejection(self._sql, conn, item.delivery, item.issues)
                return None
            return writes.apply_delivery(
                self._sql, conn, item.delivery, item.change, now=now, redact=redact, creation=creations[index]
            )

        def job(conn: Connection) -> list[Applied | ValidationFailed | None]:
            results: list[Applied | ValidationFailed | None] = [None] * len(items)
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            is_refused = self._is_refused
            for index in order:
                if is_refused is None:
                    # Nothing to fail alone: a savepoint per item cost a third of a backfill's time on SQLite.
                    results[index] = apply(conn, index)
                    continue
                cursor.execute("SAVEPOINT item")
                mark = feed.pending_changes(conn)
                try:
                    results[index] = apply(conn, index)
                except Exception as exc:
                    if not is_refused(exc):
                        raise  # the database failed, or a bug: the whole batch goes
                    cursor.execute("ROLLBACK TO item")
                    feed.discard_changes(conn, mark)
                    results[index] = refused(exc)
                cursor.execute("RELEASE item")
            return results

        return await self._write_many(job, lines=len(items))

    async def reject(self, delivery: Delivery, issues: list[FieldIssue]) -> None:
        await self._write(partial(writes.record_rejection, self._sql, delivery=delivery, issues=issues))

    async def unlinked_deliveries(
        self, *, provider: str | None, since: int | None, after: tuple[int, int] | None, limit: int
    ) -> list[LedgerEntry]:
        job = partial(rebuild.unlinked_deliveries, provider=provider, since=since, after=after, limit=limit)
        return await self._read_long(job)

    async def conversations_in_scope(
        self, *, provider: str | None, since: int | None, conversation_id: str | None
    ) -> list[ConversationKey]:
        job = partial(rebuild.conversations_in_scope, provider=provider, since=since, conversation_id=conversation_id)
        return await self._read_long(job)

    async def rebuild(self, key: ConversationKey, extra: list[int], read: Reader, redact: Redactor | None) -> Rebuilt:
        now = micros(self._clock())
        job = partial(rebuild.rebuild, self._sql, key=key, extra=extra, read=read, redact=redact, now=now)
        return await self._write(job)

    async def reclassify(self, ledger_pk: int, outcome: Outcome, error: str | None) -> None:
        await self._write(partial(rebuild.reclassify, ledger_pk=ledger_pk, outcome=outcome, error=error))

    async def refresh_statistics(self) -> None:
        statement = self._sql.analyze
        if statement is not None:
            await self._read_long(lambda conn: self._sql.run(conn, statement, {}))

    async def find_delivery(self, provider: str, delivery_key: str) -> KnownDelivery | None:
        return await self._lookup(partial(reads.find_delivery, self._sql, provider=provider, delivery_key=delivery_key))

    async def find_deliveries(self, provider: str, delivery_keys: Sequence[str]) -> dict[str, KnownDelivery]:
        if not delivery_keys:
            return {}
        job = partial(reads.find_deliveries, self._sql, provider=provider, keys=delivery_keys)
        return await self._read_many(job, lines=len(delivery_keys))

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return await self._read(partial(reads.get_detail, self._sql, conversation_id=conversation_id))

    async def get_conversation_json(
        self, conversation_id: str, *, within: frozenset[str] | None = None
    ) -> bytes | None:
        job = partial(reads.get_detail_json, self._sql, conversation_id=conversation_id, within=within)
        text = await self._lookup(job)
        return None if text is None else text.encode()

    async def list_conversations(self, *, limit: int, cursor: Cursor | None, filters: Filters = ALL) -> Page:
        return await self._read(partial(reads.list_page, self._sql, limit=limit, cursor=cursor, filters=filters))

    async def search(self, terms: Sequence[str], *, filters: Filters, limit: int, offset: int) -> list[Hit]:
        # The index answers fast, but a common word can match many conversations: not on the event loop.
        job = partial(reads.search_page, self._sql, terms=terms, filters=filters, limit=limit, offset=offset)
        return await self._read_long(job)

    async def changes(self, *, after: int, limit: int, within: frozenset[str] | None = None) -> list[ChangeRecord]:
        return await self._read(partial(reads.changes_after, self._sql, after=after, limit=limit, within=within))

    async def count(self, filters: Filters) -> int:
        return await self._read_long(partial(reads.count, self._sql, filters=filters))

    async def export(self, filters: Filters) -> AsyncGenerator[ExportBatch]:
        async with self._snapshot() as run:
            total = await run(partial(reads.count, self._sql, filters=filters))
            cursor: Cursor | None = None
            while True:
                job = partial(reads.export_chunk, self._sql, filters=filters, cursor=cursor, size=EXPORT_CHUNK)
                chunk, cursor = await run(job)
                yield ExportBatch(total, chunk)
                if cursor is None:
                    return

    @abc.abstractmethod
    def _snapshot(self) -> AbstractAsyncContextManager[Callable[[Job[T]], Awaitable[T]]]:
        """One read transaction (one snapshot of the database) for a sequence of jobs, each run off the loop."""

    async def workspace_counts(self, *, within: frozenset[str] | None = None) -> list[WorkspaceCount]:
        return await self._read_long(partial(overview.workspace_counts, within=within))

    async def activity(self, *, since: int, until: int, within: frozenset[str] | None = None) -> list[Activity]:
        return await self._read_long(partial(overview.activity, since=since, until=until, within=within))

    async def conversation_deliveries(self, conversation_id: str, *, limit: int) -> list[DeliveryRecord]:
        job = partial(overview.conversation_deliveries, conversation_id=conversation_id, limit=limit)
        return await self._read_long(job)

    async def rejected_deliveries(
        self,
        *,
        provider: str | None = None,
        workspace: str | None = None,
        within: frozenset[str] | None = None,
        since: int | None = None,
        before: tuple[int, int] | None = None,
        limit: int,
    ) -> list[DeliveryRecord]:
        job = partial(
            overview.rejected_deliveries,
            provider=provider,
            workspace=workspace,
            within=within,
            since=since,
            before=before,
            limit=limit,
        )
        return await self._read_long(job)

    async def ledger_entry(self, pk: int) -> LedgerEntry | None:
        return await self._read(partial(overview.ledger_entry, pk=pk))

    async def ping(self) -> None:
        await self._read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
