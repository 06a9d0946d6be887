"""The storage contract: what every backend (SQLite, PostgreSQL) offers, in terms of the internal model."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from kbms.errors import FieldIssue
from kbms.model import Conversation, ConversationSnapshot, ConversationSummary, IngestResult

DeliveryKind = Literal["push", "webhook"]
Outcome = Literal["created", "updated", "unchanged", "ignored", "rejected"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One payload as it arrived, kept raw in the ledger whatever becomes of it."""

    provider: str
    workspace: str
    kind: DeliveryKind
    topic: str | None
    delivery_key: str
    body_hash: str
    body: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Applied:
    """What storing one delivery did to its conversation."""

    result: IngestResult
    conversation_id: str
    external_id: str
    duplicate_delivery: bool = False


@dataclass(frozen=True, slots=True)
class KnownDelivery:
    """A delivery already in the ledger, and the conversation it went to (if any)."""

    outcome: Outcome
    conversation_id: str | None
    external_id: str | None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position in the newest-updated-first order: the last item of the previous page."""

    updated_at: int
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Page:
    items: list[ConversationSummary]
    next_cursor: Cursor | None


class Store(Protocol):
    """One storage interface; every backend passes the same contract suite (tests/test_store_contract.py).

    A successful ``ingest`` or ``reject`` means the write is committed and durable. Failures to reach or write
    the database raise ``StorageUnavailable``.
    """

    async def ingest(self, delivery: Delivery, snapshot: ConversationSnapshot) -> Applied:
        """Record the delivery and merge its snapshot into the stored conversation, in one transaction."""
        ...

    async def reject(self, delivery: Delivery, issues: list[FieldIssue]) -> None:
        """Record a delivery that failed validation (so a later mapper can re-derive it)."""
        ...

    async def find_delivery(self, provider: str, delivery_key: str) -> KnownDelivery | None:
        """The ledger entry for this delivery key, if it was seen before."""
        ...

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        """A live conversation's detail, or None if unknown or deleted."""
        ...

    async def get_conversation_json(self, conversation_id: str) -> bytes | None:
        """The same detail, as the JSON bytes the API serves (the read model: one lookup)."""
        ...

    async def list_conversations(self, *, limit: int, cursor: Cursor | None) -> Page:
        """Live conversations, newest-updated first, keyset-paginated."""
        ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` unless the database answers."""
        ...

    async def close(self) -> None:
        """Finish pending writes and release connections."""
        ...
