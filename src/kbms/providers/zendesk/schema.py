"""Zendesk's tickets, comments, users and ticket events, read tolerantly: only what kbms maps is declared.

Two shapes of the same ticket arrive (see ``tests/providers/zendesk/fixtures/SOURCES.md``):

- the Support REST API (pushed): integer ids, lower-case enums (``"open"``), ``via.channel`` as a channel name
  (``"web"``, ``"email"``, ``"api"``), attachments with ``file_name``;
- event webhooks (``zen:event-type:ticket.*``): string ids, upper-case enums (``"OPEN"``), ``via.channel`` as a
  via type (``"web_service"``, ``"mail"``) or a via id (an integer), attachments with ``filename``, timestamps
  with nanoseconds.

Both are accepted everywhere; the mapper normalizes them to one vocabulary.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from kbms.providers.fields import Id, Integer, OptionalId, OptionalText, Timestamp, integral


class _Tolerant(BaseModel):
    # Unknown fields are accepted and not kept: the raw payload is in the ledger.
    model_config = ConfigDict(extra="ignore", frozen=True)


def _channel(value: Any) -> str | int | None:
    """A channel name, a via type or a via id; one validator, so an error names the field and nothing else."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.replace("\x00", "").strip() or None
    number = integral(value)
    if number is not None:
        return number
    raise PydanticCustomError("channel_type", "Input should be a string or an integer")


class ZendeskVia(_Tolerant):
    # A channel name ("web"), a via type ("web_service") or a via id (5): see mapper.VIA_TYPES and VIA_IDS.
    channel: Annotated[
        str | int | None,
        PlainValidator(_channel),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}),
    ] = None


class ZendeskAttachment(_Tolerant):
    id: OptionalId = None
    # REST says file_name; webhooks say filename.
    file_name: OptionalText = Field(default=None, validation_alias=AliasChoices("file_name", "filename"))
    content_url: OptionalText = None
    content_type: OptionalText = None
    size: Integer | None = None


class ZendeskUser(_Tolerant):
    """A side-loaded user (``?include=users``): the only place a REST payload names its people."""

    id: Id
    name: OptionalText = None
    email: OptionalText = None
    role: OptionalText = None  # end-user | agent | admin


class ZendeskComment(_Tolerant):
    """A ticket comment from ``GET /api/v2/tickets/{id}/comments``."""

    id: Id
    type: OptionalText = None  # Comment | VoiceComment
    author_id: OptionalId = None
    body: str | None = None
    html_body: str | None = None
    plain_body: str | None = None
    public: bool | None = None  # false: an internal note
    attachments: list[ZendeskAttachment] | None = None
    created_at: Timestamp | None = None


class _TicketFields(_Tolerant):
    id: Id
    subject: OptionalText = None
    raw_subject: OptionalText = None
    status: OptionalText = None
    tags: list[str] | None = None
    requester_id: OptionalId = None
    assignee_id: OptionalId = None
    via: ZendeskVia | None = None
    updated_at: Timestamp | None = None


class ZendeskTicket(_TicketFields):
    """A ticket from ``GET /api/v2/tickets/{id}``."""

    url: OptionalText = None
    created_at: Timestamp


class ZendeskTicketDetail(_TicketFields):
    """The ``detail`` of a ticket event: the ticket when the event happened (some events carry only its id)."""

    created_at: Timestamp | None = None
    actor_id: OptionalId = None  # who caused the event


class ZendeskPush(_Tolerant):
    """A ticket pushed to kbms: the REST API's ticket, its comments and (optionally) the side-loaded users."""

    ticket: ZendeskTicket
    comments: list[ZendeskComment] = Field(default_factory=list)
    users: list[ZendeskUser] = Field(default_factory=list)


class ZendeskEventAuthor(_Tolerant):
    id: OptionalId = None
    name: OptionalText = None
    is_staff: bool | None = None


class ZendeskEventComment(_Tolerant):
    """``event.comment`` of ``ticket.comment_added`` (plain ``body``) or of ``ticket.attachment_linked_to_comment``
    (only an ``attachment``)."""

    id: Id
    body: str | None = None
    html_body: str | None = None
    is_public: bool | None = None
    author: ZendeskEventAuthor | None = None
    attachment: ZendeskAttachment | None = None
    attachments: list[ZendeskAttachment] | None = None


class ZendeskMessagingActor(_Tolerant):
    id: OptionalId = None
    name: OptionalText = None
    type: OptionalText = None  # end_user | agent | trigger | system


class ZendeskMessagingMessage(_Tolerant):
    id: Id
    body: str | None = None


class ZendeskMessagingEvent(_Tolerant):
    """``event`` of ``messaging_ticket.message_added``."""

    message: ZendeskMessagingMessage
    actor: ZendeskMessagingActor | None = None


class ZendeskEvent(_Tolerant):
    """An event webhook: ``{type, account_id, id, time, subject, detail, event}``.

    ``detail`` and ``event`` are validated once the event's type says what they are (a ticket, a user, ...).
    """

    type: OptionalText = None
    account_id: OptionalId = None
    id: OptionalId = None
    time: Timestamp | None = None
    subject: OptionalText = None
    detail: dict[str, Any] | None = None
    event: dict[str, Any] | None = None
