"""Deliveries and what became of them: the values the use cases, the lifecycle and storage hand each other.

Neutral ground: importing it loads no database, driver or framework, so the pure lifecycle (``kbms.lifecycle``)
and storage can both speak these types without one depending on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from kbms.errors import FieldIssue
from kbms.model import Change, IngestResult

DeliveryKind = Literal["push", "webhook", "pull"]  # pull: fetched from the provider's API (kbms.sync)
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
    verified: bool = True
    named_workspace: str | None = None  # the workspace the request named (?workspace=), if any


@dataclass(frozen=True, slots=True)
class Applied:
    """What storing one delivery did to its conversation (none for an ignored delivery)."""

    result: IngestResult | Literal["ignored"]
    conversation_id: str | None
    external_id: str | None
    duplicate_delivery: bool = False


@dataclass(frozen=True, slots=True)
class Pending:
    """One delivery of a batch: its change (``None``: ignored), or the issues it was rejected for."""

    delivery: Delivery
    change: Change | None = None
    issues: list[FieldIssue] | None = None


@dataclass(frozen=True, slots=True)
class KnownDelivery:
    """A delivery already in the ledger, and the conversation it went to (if any)."""

    outcome: Outcome
    conversation_id: str | None
    external_id: str | None
    workspace: str | None = None  # the conversation's


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A delivery as the ledger keeps it, for re-deriving what it says."""

    pk: int
    provider: str
    kind: DeliveryKind
    workspace: str
    topic: str | None
    body: bytes
    received_at: int
    outcome: Outcome
    error: str | None
    conversation_pk: int | None
    named_workspace: str | None


@dataclass(frozen=True, slots=True)
class Reading:
    """What today's mappers make of a stored delivery: a change, nothing (ignored), or a rejection (``error``)."""

    change: Change | None
    error: str | None = None


class Keyed(Protocol):
    """Anything that names a conversation: a change, a stored state, a key."""

    @property
    def provider(self) -> str: ...
    @property
    def workspace(self) -> str: ...
    @property
    def external_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """What names a conversation: ``(provider, workspace, external_id)``, the database's unique key."""

    provider: str
    workspace: str
    external_id: str

    @classmethod
    def of(cls, keyed: Keyed) -> ConversationKey:
        """The key of a change, a stored state, or anything else that carries the three."""
        return cls(keyed.provider, keyed.workspace, keyed.external_id)


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What re-deriving one conversation from its deliveries did."""

    changed: bool
    deliveries_reclassified: int
    # Deliveries that today's mappers assign to another conversation, by that conversation.
    moved: dict[ConversationKey, list[int]] = field(default_factory=dict)


Reader = Callable[[LedgerEntry], Reading]


class ConcurrentCreation(Exception):
    """A live delivery created the conversation while it was being re-derived: run its rebuild again."""
