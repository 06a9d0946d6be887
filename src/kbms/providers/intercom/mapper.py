"""Intercom conversation -> ``ConversationSnapshot``. Pure: a typed payload in, a new model out.

The evidence for each rule is in ``fixtures/intercom/SOURCES.md``:

- the opening message is ``source`` (2.x) or ``conversation_message`` (1.x), never a part;
- any part with a body is a message, whatever its ``part_type``: customers and agents write inside ``open``,
  ``assignment``, ``close`` and ``note_and_reopen`` parts too; ``note*`` parts are internal;
- assignment and state-change parts are events as well (an ``assignment`` with a body is both), and a part
  without a body of any other type is kept as an ``other`` event: ``part_type`` is an open set;
- unassigned is ``0``, ``null`` or ``{"type": "nobody_admin", "id": null}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from kbms.model import (
    Attachment,
    ConversationHeader,
    ConversationSnapshot,
    Event,
    EventType,
    Message,
    ParticipantObservation,
    Role,
    State,
)
from kbms.providers.html import convert, has_image, html_to_text
from kbms.providers.intercom.schema import (
    IntercomAttachment,
    IntercomConversationItem,
    IntercomPart,
    IntercomPerson,
)

PROVIDER = "intercom"
OPENING_PROVIDER_TYPE = "conversation_message"

ROLES: dict[str, Role] = {
    "user": "customer",
    "lead": "customer",
    "contact": "customer",
    "admin": "agent",
    "team": "agent",
    "bot": "bot",
}
EVENT_TYPES: dict[str, EventType] = {
    "assignment": "assigned",
    "default_assignment": "assigned",
    "away_mode_assignment": "assigned",
    "assign_and_reopen": "assigned",
    "assign_and_unsnooze": "assigned",
    "open": "opened",
    "note_and_reopen": "opened",
    "close": "closed",
    "snoozed": "snoozed",
    "unsnoozed": "unsnoozed",
    "timer_unsnooze": "unsnoozed",
    "priority_changed": "priority_changed",
}
STATES: frozenset[State] = frozenset(("open", "closed", "snoozed"))
# ``source.type`` is the channel in 2.x ("conversation" is the Messenger); 1.x only says "conversation_message".
CHANNELS = {"conversation": "messenger", OPENING_PROVIDER_TYPE: None}
UNASSIGNED = frozenset(("0",))


def to_snapshot(
    conversation: IntercomConversationItem, *, workspace: str, retrieved: bool = False
) -> ConversationSnapshot:
    """Map one Intercom conversation object (pushed, or a webhook's item) to what it says about the conversation.

    ``retrieved``: the object is what ``GET /conversations/{id}`` returns (a push or a pull), whose
    ``conversation_parts`` are the newest parts and count them all; a webhook's count only the parts it carries.
    """
    created_at = conversation.created_at
    version = conversation.updated_at or created_at
    messages: list[Message] = []
    events: list[Event] = []
    opening = conversation.opening
    opening_id = (opening.id or conversation.id) if opening is not None else None
    content = _content(opening.body, opening.attachments) if opening is not None else None
    if opening is not None and opening_id is not None and content is not None:
        messages.append(
            Message(
                id=opening_id,
                author_participant_id=opening.author.id,
                sent_at=created_at,
                visibility="public",
                attachments=_attachments(opening.attachments),
                redacted=bool(opening.redacted),
                provider_type=OPENING_PROVIDER_TYPE,
                **content,
            )
        )
    for part in conversation.parts:
        message, event = _map_part(part, fallback_time=version)
        if message is not None:
            messages.append(message)
        if event is not None:
            events.append(event)
    return ConversationSnapshot(
        provider=PROVIDER,
        workspace=workspace,
        external_id=conversation.id,
        created_at=created_at,
        version=version,
        header=_header(conversation, opening_id, retrieved=retrieved),
        participants=tuple(_participants(conversation, version)),
        messages=tuple(messages),
        events=tuple(events),
    )


def _map_part(part: IntercomPart, *, fallback_time: datetime) -> tuple[Message | None, Event | None]:
    part_type = part.part_type
    sent_at = part.created_at or fallback_time
    author_id = part.author.id if part.author is not None else None
    message = None
    content = _content(part.body or "", part.attachments)
    if content is not None:
        message = Message(
            id=part.id,
            author_participant_id=author_id,
            sent_at=sent_at,
            visibility="internal" if part_type and part_type.startswith("note") else "public",
            attachments=_attachments(part.attachments),
            redacted=bool(part.redacted),
            provider_type=part_type,
            updated_at=part.updated_at,
            **content,
        )
    event_type = EVENT_TYPES.get(part_type or "")
    if event_type is None and message is None:
        event_type = "other"
    event = None
    if event_type is not None:
        event = Event(
            id=part.id,
            type=event_type,
            provider_type=part_type,
            actor_participant_id=author_id,
            occurred_at=sent_at,
        )
    return message, event


def _content(body: str, attachments: list[IntercomAttachment] | None) -> dict[str, Any] | None:
    """Text and HTML of a body; None when there is nothing to read or see (``<p></p>``, ``<br>``, ``&nbsp;``)."""
    text, html = convert(body)
    if not text and not attachments and not (html and has_image(body)):
        return None
    return {"content": text, "content_html": body if html else None}


def _attachments(items: list[IntercomAttachment] | None) -> tuple[Attachment, ...]:
    return tuple(Attachment(name=a.name, url=a.url, content_type=a.content_type, size=a.filesize) for a in items or ())


def _header(conversation: IntercomConversationItem, opening_id: str | None, *, retrieved: bool) -> ConversationHeader:
    given = conversation.model_fields_set
    opening = conversation.opening
    fields: dict[str, Any] = {} if opening_id is None else {"opening_message_id": opening_id}
    if (opening is not None and "subject" in opening.model_fields_set) or "title" in given:
        fields["subject"] = _subject(conversation)
    if "state" in given or "open" in given:
        fields["state"] = _state(conversation)
    if "tags" in given:
        names = (tag.name.strip() for tag in (conversation.tags.tags if conversation.tags else ()) if tag.name)
        fields["tags"] = tuple(dict.fromkeys(names))
    if given & {"admin_assignee_id", "team_assignee_id", "assignee"}:
        assignee = _assignee(conversation)
        fields["assignee_participant_id"] = assignee.id if assignee is not None else None
    channel = _channel(conversation)
    if channel is not None:
        fields["channel"] = channel
    fields.update(_completeness(conversation, retrieved=retrieved))
    return ConversationHeader(**fields)


def _completeness(conversation: IntercomConversationItem, *, retrieved: bool) -> dict[str, Any]:
    """The count of items (the opening message and every part) and, for a retrieve, whether it held them all."""
    parts = conversation.conversation_parts
    if retrieved and parts is not None and parts.total_count is not None:
        count = parts.total_count + (1 if conversation.opening is not None else 0)
        truncated = parts.total_count > len(parts.conversation_parts)
        return {"provider_count": count, "truncated": truncated, "counted": "items"}
    statistics = conversation.statistics
    if statistics is not None and statistics.count_conversation_parts is not None:
        return {"provider_count": statistics.count_conversation_parts, "counted": "items"}
    return {}


def _subject(conversation: IntercomConversationItem) -> str | None:
    opening = conversation.opening
    for candidate in (opening.subject if opening is not None else None, conversation.title):
        if candidate:
            text = " ".join(html_to_text(candidate).split())
            if text:
                return text
    return None


def _state(conversation: IntercomConversationItem) -> State | None:
    state = conversation.state
    if state in STATES:
        return state
    if conversation.open is not None:
        return "open" if conversation.open else "closed"
    return None


def _channel(conversation: IntercomConversationItem) -> str | None:
    if conversation.channel is not None and (conversation.channel.current or conversation.channel.initial):
        return conversation.channel.current or conversation.channel.initial
    source_type = conversation.opening.type if conversation.opening is not None else None
    if source_type is None:
        return None
    return CHANNELS.get(source_type, source_type)


def _assignee(conversation: IntercomConversationItem) -> IntercomPerson | None:
    if conversation.admin_assignee_id and conversation.admin_assignee_id not in UNASSIGNED:
        return IntercomPerson(id=conversation.admin_assignee_id, type="admin")
    legacy = conversation.assignee
    if legacy is not None and legacy.id and legacy.id not in UNASSIGNED and legacy.type != "nobody_admin":
        return legacy
    if conversation.team_assignee_id and conversation.team_assignee_id not in UNASSIGNED:
        return IntercomPerson(id=conversation.team_assignee_id, type="team")
    return None


def _participants(conversation: IntercomConversationItem, version: datetime) -> Iterator[ParticipantObservation]:
    created_at = conversation.created_at
    authors: set[str] = set()
    if conversation.opening is not None:
        author = conversation.opening.author
        authors.add(author.id)
        yield _observe(author.id, author.type, author.name, author.email, seen_at=created_at)
    for part in conversation.parts:
        a = part.author
        if a is not None and a.id is not None:
            authors.add(a.id)
            yield _observe(a.id, a.type, a.name, a.email, seen_at=part.created_at or version)
    # An assignee takes part once they write or act (the original design's example counts one participant for
    # a conversation assigned to an admin who never wrote); their assignee record still fills in name and email.
    assignee = _assignee(conversation)
    if assignee is not None and assignee.id in authors:
        yield _observe(assignee.id, assignee.type or "admin", assignee.name, assignee.email, seen_at=version)
    contacts: list[IntercomPerson] = list(conversation.contacts.contacts) if conversation.contacts else []
    contacts += conversation.customers or []
    if conversation.user is not None:
        contacts.append(conversation.user)
    for c in contacts:
        if c.id:
            yield _observe(c.id, c.type or "contact", c.name, c.email, seen_at=created_at)


def _observe(
    participant_id: str,
    kind: str | None,
    name: str | None,
    email: str | None,
    *,
    seen_at: datetime,
) -> ParticipantObservation:
    role = ROLES.get(kind, "system") if kind is not None else None
    return ParticipantObservation(id=participant_id, role=role, name=name, email=email, seen_at=seen_at)
