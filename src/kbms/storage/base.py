"""The storage contract: what every backend (SQLite, PostgreSQL) offers, in terms of the internal model."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

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
from kbms.errors import FieldIssue, ValidationFailed
from kbms.model import Change, Conversation, ConversationSummary, Redactor
from kbms.storage.syncstate import KEEP as KEEP
from kbms.storage.syncstate import DeadLetter as DeadLetter
from kbms.storage.syncstate import JobReason as JobReason
from kbms.storage.syncstate import Keep as Keep
from kbms.storage.syncstate import SourceState as SourceState
from kbms.storage.syncstate import SyncCounts as SyncCounts
from kbms.storage.syncstate import SyncJob as SyncJob
from kbms.storage.syncstate import SyncStore


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position in the newest-updated-first order: the last item of the previous page."""

    updated_at: int
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Filters:
    """Which live conversations a list (or an export) is about; None: any. Times are microseconds, exclusive."""

    provider: str | None = None
    workspace: str | None = None
    state: str | None = None
    tag: str | None = None
    updated_after: int | None = None
    updated_before: int | None = None
    within: frozenset[str] | None = None  # the workspaces the caller may see (an API key's); None: all
    truncated: bool | None = None  # only conversations the provider cut short (True), or only the others (False)


ALL = Filters()


@dataclass(frozen=True, slots=True)
class Page:
    items: list[ConversationSummary]
    next_cursor: Cursor | None


@dataclass(frozen=True, slots=True)
class Hit:
    """A conversation found by full-text search: higher ``score`` is more relevant."""

    summary: ConversationSummary
    score: float
    snippet: str | None
    message_id: str | None  # the message the snippet comes from; None for the subject


@dataclass(frozen=True, slots=True)
class ExportBatch:
    total: int  # conversations in the whole export (the same snapshot)
    details: list[bytes]


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One committed change of a conversation, as the feed serves it."""

    seq: int
    conversation_id: str
    provider: str
    workspace: str
    external_id: str
    action: Literal["created", "updated", "deleted"]
    revision: int
    changed_at: int


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """How busy one of a store's connection pools is, right now (for ``/metrics``)."""

    pool: str  # e.g. "postgresql", "sqlite_writer"
    in_use: int  # connections (or the writer) busy
    size: int  # connections the pool may hold
    waiting: int  # callers queued for one: requests waiting for a connection, writes waiting for the next commit


@dataclass(frozen=True, slots=True)
class WorkspaceCount:
    """How many live conversations one provider's workspace holds (the console's overview)."""

    provider: str
    workspace: str
    conversations: int


@dataclass(frozen=True, slots=True)
class Activity:
    """Deliveries received in one minute (``minute``: its start, microseconds), and how many of them were refused."""

    minute: int
    received: int
    rejected: int


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One ledger row as the console shows it, raw payload included."""

    pk: int
    provider: str
    workspace: str
    kind: str
    topic: str | None
    received_at: int
    outcome: str
    error: str | None
    body: bytes


class Store(SyncStore, Protocol):
    """One storage interface; every backend passes the same contract suite (tests/storage/test_contract.py).
    It keeps the sync state too (``storage.syncstate``; tests/storage/test_sync_state.py).

    A successful ``ingest`` or ``reject`` means the write is committed and durable. Failures to reach or write
    the database raise ``StorageUnavailable``.
    """

    async def ingest(self, delivery: Delivery, change: Change | None, *, redact: Redactor | None = None) -> Applied:
        """Record the delivery and apply its change (merge, or delete), in one transaction.

        ``change`` None records the delivery as ignored. ``redact`` (the provider's) rewrites raw payloads in the
        ledger when a message is redacted, so the old text survives nowhere.
        """
        ...

    async def reject(self, delivery: Delivery, issues: list[FieldIssue]) -> None:
        """Record a delivery that failed validation (so a later mapper can re-derive it)."""
        ...

    async def ingest_many(
        self, items: Sequence[Pending], *, redact: Redactor | None = None
    ) -> list[Applied | ValidationFailed | None]:
        """``ingest`` (or ``reject``, for items with ``issues``) every item, committed together.

        One result per item, in order: what ``ingest`` returns, ``None`` for a recorded rejection, or the
        ``ValidationFailed`` of an item the database refused, which is rolled back alone.
        """
        ...

    async def find_deliveries(self, provider: str, delivery_keys: Sequence[str]) -> dict[str, KnownDelivery]:
        """``find_delivery`` for many keys at once: the known ones, by key."""
        ...

    async def unlinked_deliveries(
        self, *, provider: str | None, since: int | None, after: tuple[int, int] | None, limit: int
    ) -> list[LedgerEntry]:
        """Deliveries tied to no conversation (rejected or ignored), in received order, after ``after``."""
        ...

    async def conversations_in_scope(
        self, *, provider: str | None, since: int | None, conversation_id: str | None
    ) -> list[ConversationKey]:
        """Conversations with deliveries from ``provider`` received at or after ``since`` (all filters optional)."""
        ...

    async def rebuild(self, key: ConversationKey, extra: list[int], read: Reader, redact: Redactor | None) -> Rebuilt:
        """Re-derive one conversation from all its ledger deliveries (plus ``extra`` ones), in received order.

        Raises ``ConcurrentCreation`` when a live delivery created the conversation meanwhile (run it again).
        """
        ...

    async def reclassify(self, ledger_pk: int, outcome: Outcome, error: str | None) -> None:
        """Record a new outcome for a delivery that still belongs to no conversation."""
        ...

    async def find_delivery(self, provider: str, delivery_key: str) -> KnownDelivery | None:
        """The ledger entry for this delivery key, if it was seen before."""
        ...

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        """A live conversation's detail, or None if unknown or deleted."""
        ...

    async def get_conversation_json(
        self, conversation_id: str, *, within: frozenset[str] | None = None
    ) -> bytes | None:
        """The same detail, as the JSON bytes the API serves (the read model: one lookup); None also when
        ``within`` is given and the conversation is of another workspace."""
        ...

    async def list_conversations(self, *, limit: int, cursor: Cursor | None, filters: Filters = ALL) -> Page:
        """Live conversations matching ``filters``, newest-updated first, keyset-paginated."""
        ...

    async def search(self, terms: Sequence[str], *, filters: Filters, limit: int, offset: int) -> list[Hit]:
        """Live conversations matching ``filters`` that contain every term (see ``kbms.search``), most relevant
        first (ties by id); ``limit`` of them after the first ``offset``."""
        ...

    async def changes(self, *, after: int, limit: int, within: frozenset[str] | None = None) -> list[ChangeRecord]:
        """Committed changes with ``seq`` greater than ``after``, in commit (``seq``) order; ``within``: only
        those of these workspaces."""
        ...

    def export(self, filters: Filters) -> AsyncGenerator[ExportBatch]:
        """Every live conversation matching ``filters``, as the detail JSON the API serves, in batches, newest-updated
        first, from one consistent snapshot of the database (constant memory, whatever is written meanwhile). At
        least one batch comes, with the total."""
        ...

    async def count(self, filters: Filters) -> int:
        """How many live conversations match ``filters``."""
        ...

    async def workspace_counts(self, *, within: frozenset[str] | None = None) -> list[WorkspaceCount]:
        """Live conversations per provider and workspace (``within``: only these workspaces), by provider and
        workspace."""
        ...

    async def activity(self, *, since: int, until: int, within: frozenset[str] | None = None) -> list[Activity]:
        """Deliveries received in ``[since, until)`` per minute, in order; minutes with none are left out."""
        ...

    async def conversation_deliveries(self, conversation_id: str, *, limit: int) -> list[DeliveryRecord]:
        """The newest ``limit`` ledger deliveries of a conversation, in received order."""
        ...

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
        """Rejected deliveries, newest first (by received time, then ledger row), received at or after ``since``
        and before the ``(received_at, pk)`` position ``before`` (a keyset page)."""
        ...

    async def ledger_entry(self, pk: int) -> LedgerEntry | None:
        """One ledger delivery, as ``kbms reprocess`` reads it."""
        ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` unless the database answers."""
        ...

    def pool_usage(self) -> list[PoolUsage]:
        """How busy the store's connection pools are (cheap: read from memory, no database call)."""
        ...

    async def refresh_statistics(self) -> None:
        """After a bulk load: bring the planner's statistics up to date where the engine plans with them."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release connections."""
        ...
