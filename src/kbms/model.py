"""The internal model: what every provider maps into and what every consumer reads.

This is the contract's single source of truth. It is strict (``extra="forbid"``) and frozen; fields are only ever
added. Two invariants hold for every instance, whichever provider produced it:

- strings carry no NUL character (PostgreSQL cannot store one, and no consumer wants one);
- timestamps are timezone-aware UTC, serialized as ISO-8601 with ``Z``.

``ConversationSnapshot`` is not part of the contract: it is what one provider payload says about a conversation,
before it is merged with what is already stored (see ``kbms.merge``).

Three small things every layer shares live here too, so that none has to import another layer for them: the time
codec (``micros`` and ``from_micros``: how timestamps are stored and compared), the conversation id (its shape,
``CONVERSATION_ID``, and its one mint, ``conversation_id``) and the ``Redactor`` type (what a provider hands the
write path to rewrite its raw payloads).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _strip_nul(value: str) -> str:
    return value.replace("\x00", "") if "\x00" in value else value


def _utc(value: datetime) -> datetime:
    if value.tzinfo is UTC:  # what every mapper produces: nothing to convert
        return value
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


Text = Annotated[str, AfterValidator(_strip_nul)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
# Text no engine can take: PostgreSQL refuses NUL in any text value, and neither driver can encode a lone surrogate
# as UTF-8 (what Python makes of bytes that are not UTF-8 in a command line or environment). kbms strips NUL from
# what it stores (``Text``) and never stores a surrogate, so a filter holding either can match nothing.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# Every conversation id is minted by ``conversation_id`` below (a UUID, as ``str`` writes it), so any other text
# names no conversation, whatever a database would make of it: the API and the CLI refuse it without asking one.
CONVERSATION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# kbms's own UUID namespace: conversation ids are derived from the provider's key, never random.
ID_NAMESPACE = uuid.UUID("7f1c9f52-4a1e-5d3b-9a58-6b2f0e0c4d11")


def conversation_id(provider: str, workspace: str, external_id: str) -> str:
    """The stable id of a conversation: the same on every engine, and after a rebuild from the ledger."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join((provider, workspace, external_id))))


# A workspace names a provider account (an Intercom app_id, a Zendesk subdomain): short and URL-safe.
WORKSPACE = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
DEFAULT_WORKSPACE = "default"
WORKSPACE_PATTERN = f"^{WORKSPACE}$"  # for pydantic and OpenAPI, whose "$" is the end of the text

Role = Literal["customer", "agent", "bot", "system"]
State = Literal["open", "closed", "snoozed", "pending", "solved"]
Visibility = Literal["public", "internal"]
EventType = Literal["assigned", "opened", "closed", "snoozed", "unsnoozed", "priority_changed", "tagged", "other"]
IngestResult = Literal["created", "updated", "unchanged"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attachment(_Frozen):
    """A file attached to a message, as the provider describes it (kbms does not download it)."""

    name: Text | None = None
    url: Text | None = None
    content_type: Text | None = None
    size: int | None = None


class Participant(_Frozen):
    """Someone who took part: ``id`` is the provider's id for them."""

    id: Text
    role: Role
    name: Text | None = None
    email: Text | None = None


class Message(_Frozen):
    """One message. ``content`` is plain text; ``content_html`` keeps the provider's HTML when there was any."""

    id: Text
    author_participant_id: Text | None
    sent_at: UtcDatetime
    content: Text
    content_html: Text | None = None
    visibility: Visibility = "public"
    attachments: tuple[Attachment, ...] = ()
    redacted: bool = False
    provider_type: Text | None = None
    updated_at: UtcDatetime | None = Field(
        default=None, description="When the provider last changed the message (an edit or a redaction)"
    )


class Event(_Frozen):
    """A change of state that is not a message: an assignment, a close, a snooze, ..."""

    id: Text
    type: EventType
    provider_type: Text | None = None
    actor_participant_id: Text | None = None
    occurred_at: UtcDatetime


class Completeness(_Frozen):
    """How much of the conversation kbms holds, against what the provider says it has."""

    provider_count: int | None = Field(
        description="How many items the provider says the conversation has (Intercom: the opening message and every "
        "part; Zendesk: its comments); null when no payload said"
    )
    stored_count: int = Field(description="How many of those items kbms holds")
    truncated: bool = Field(
        description="A payload held fewer items than the provider counted (Intercom returns at most the 500 newest "
        "parts of a conversation): kbms cannot get the rest from the provider"
    )


class Conversation(_Frozen):
    """The conversation detail served by ``GET /internal/conversations/{id}``."""

    id: str
    provider: str
    external_id: Text
    workspace: Text
    created_at: UtcDatetime
    updated_at: UtcDatetime
    participants: tuple[Participant, ...]
    messages: tuple[Message, ...]
    subject: Text | None = None
    state: State | None = None
    tags: tuple[Text, ...] = ()
    assignee_participant_id: Text | None = None
    channel: Text | None = None
    events: tuple[Event, ...] = ()
    revision: int = Field(ge=1)
    completeness: Completeness


class ConversationSummary(_Frozen):
    """One item of ``GET /internal/conversations``."""

    id: str
    provider: str
    external_id: Text
    workspace: Text
    created_at: UtcDatetime
    updated_at: UtcDatetime
    participant_count: int
    message_count: int
    last_message_at: UtcDatetime | None = None
    last_message_preview: Text | None = None
    subject: Text | None = None
    state: State | None = None


class ParticipantObservation(_Frozen):
    """What one payload says about one participant; ``None`` means the payload did not say."""

    id: Text
    role: Role | None = None
    name: Text | None = None
    email: Text | None = None
    seen_at: UtcDatetime


class ConversationHeader(_Frozen):
    """Conversation-level fields of one payload.

    Only the fields a payload actually carried are in ``model_fields_set``: a webhook that omits ``tags`` says
    nothing about tags, while one that sends an empty tag list says there are none.
    """

    subject: Text | None = None
    state: State | None = None
    tags: tuple[Text, ...] = ()
    assignee_participant_id: Text | None = None
    channel: Text | None = None
    opening_message_id: Text | None = None
    # Completeness, as one payload states it: the provider's count of the conversation's items, whether this
    # payload held fewer than that, and which stored items the count is of: "messages" (a Zendesk comment is one
    # message), or "items" (an Intercom part is a message, an event or both, under the part's id).
    provider_count: int | None = None
    truncated: bool = False
    counted: Literal["messages", "items"] = "messages"


class ConversationSnapshot(_Frozen):
    """Everything one provider payload says about one conversation, ready to be merged into storage."""

    provider: str
    workspace: Text
    external_id: Text
    created_at: UtcDatetime
    version: UtcDatetime = Field(description="The provider's updated_at: newer payloads win field conflicts")
    header: ConversationHeader
    participants: tuple[ParticipantObservation, ...] = ()
    messages: tuple[Message, ...] = ()
    events: tuple[Event, ...] = ()
    partial_messages: bool = Field(
        default=False,
        description="The messages are partial copies (a webhook's plain text): any complete copy replaces them",
    )


class ConversationDeletion(_Frozen):
    """A payload saying the provider deleted a conversation: kbms keeps only a tombstone."""

    provider: str
    workspace: Text
    external_id: Text


Change = ConversationSnapshot | ConversationDeletion


class WebhookEvent(_Frozen):
    """One verified webhook delivery, as its provider reads it."""

    delivery_id: Text | None = Field(description="The provider's id of this notification; None when it has none")
    topic: Text | None
    workspace: Text
    change: Change | None = Field(description="None: nothing to store (a ping, or an item that is no conversation)")


# The provider's rewrite of one of its raw payloads: (body, conversation external id, redacted messages by id)
# -> the body with those messages' text replaced, or None if the body is not that conversation's or has no such part.
# Providers implement it (``Provider.redactor``) and the write path runs it, so it is named where both may look.
Redactor = Callable[[bytes, str, Mapping[str, Message]], "bytes | None"]


def utc_from_timestamp(seconds: float) -> datetime:
    """A UTC datetime from unix seconds."""
    return datetime.fromtimestamp(seconds, tz=UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_ORDINAL = EPOCH.toordinal()


def micros(value: datetime) -> int:
    """Microseconds since the epoch: the exact integer form timestamps are stored and compared in (UTC values)."""
    # Integer arithmetic on the fields: exact, and several times cheaper than timedelta division on a hot path.
    seconds = (value.toordinal() - EPOCH_ORDINAL) * 86_400 + value.hour * 3_600 + value.minute * 60 + value.second
    return seconds * 1_000_000 + value.microsecond


def from_micros(value: int) -> datetime:
    """The UTC datetime of a stored timestamp: the inverse of ``micros``."""
    return EPOCH + timedelta(microseconds=value)
