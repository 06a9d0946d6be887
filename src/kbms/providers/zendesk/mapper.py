"""Zendesk ticket -> ``ConversationSnapshot``. Pure: a typed payload in, a new model out.

The evidence for each rule is in ``tests/providers/zendesk/fixtures/SOURCES.md``:

- a ticket is a conversation; each comment with text or attachments is a message (``public: false`` is an
  internal note); the text is ``plain_body``, else ``body``, else the text of ``html_body`` (``""`` counts as
  missing: recorded data has ``html_body: ""`` next to a real ``body``), and ``html_body`` is kept as
  ``content_html``;
- people are named only by side-loaded ``users``: ``end-user`` is a customer, ``agent`` and ``admin`` are agents;
  without a user record the requester is a customer and the assignee an agent (Zendesk's own definitions), and
  anyone else's role is left unsaid (it shows as ``system`` until a payload says);
- ``status``: ``new`` and ``open`` are open, ``pending`` and ``hold`` (waiting on a third party) are pending,
  ``solved`` and ``closed`` are themselves; webhooks spell them in upper case;
- ``via.channel`` comes as a channel name (REST), a via type or a via id (webhooks): one vocabulary, REST's;
- a ticket event webhook says what the ticket looked like (``detail``) and what happened (``event``): a comment
  becomes a message, any other event an event of the conversation, keyed by the webhook's own event id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
from kbms.providers.html import convert, has_image, tidy
from kbms.providers.zendesk.schema import (
    ZendeskAttachment,
    ZendeskComment,
    ZendeskEventComment,
    ZendeskMessagingActor,
    ZendeskMessagingMessage,
    ZendeskPush,
    ZendeskTicket,
    ZendeskTicketDetail,
    ZendeskUser,
)

PROVIDER = "zendesk"
STATES: dict[str, State] = {
    "new": "open",
    "open": "open",
    "pending": "pending",
    "hold": "pending",
    "solved": "solved",
    "closed": "closed",
}
ROLES: dict[str, Role] = {"end-user": "customer", "agent": "agent", "admin": "agent"}
# Via types (webhooks) and via ids to REST's channel names, from Zendesk's "Via types reference"; other via types
# are kept as they are, unknown via ids are not guessed.
VIA_TYPES = {"web_form": "web", "mail": "email", "web_service": "api"}
VIA_IDS = {0: "web", 4: "email", 5: "api", 8: "rule"}
# Ticket events that are events of the conversation (anything else is "other"); comment_added is a message.
EVENT_TYPES: dict[str, EventType] = {
    "ticket.agent_assignment_changed": "assigned",
    "ticket.priority_changed": "priority_changed",
    "ticket.tags_changed": "tagged",
}
STATUS_EVENTS: dict[State, EventType] = {"open": "opened", "solved": "closed", "closed": "closed"}
# messaging_ticket events name the sender's kind: end_user, agent, trigger or system (the Answer Bot is one).
MESSAGING_ROLES: dict[str, Role] = {"end_user": "customer", "agent": "agent", "trigger": "system", "system": "system"}
SYSTEM_AUTHOR = "-1"  # Zendesk's author id for changes made by Zendesk itself


def to_snapshot(push: ZendeskPush, *, workspace: str) -> ConversationSnapshot:
    """Map a pushed ticket, its comments and side-loaded users."""
    ticket = push.ticket
    version = ticket.updated_at or ticket.created_at
    users = {user.id: user for user in push.users}
    comments = sorted(push.comments, key=lambda c: (c.created_at or version, _numeric(c.id)))
    messages = [m for m in (_comment_message(c, fallback_time=version) for c in comments) if m is not None]
    opening = messages[0].id if messages else None
    authors = [(c.author_id, c.created_at or version) for c in comments if _person(c.author_id)]
    return ConversationSnapshot(
        provider=PROVIDER,
        workspace=workspace,
        external_id=ticket.id,
        created_at=ticket.created_at,
        version=version,
        header=header(
            ticket,
            opening_message_id=opening,
            comments=len(push.comments) if "comments" in push.model_fields_set else None,
        ),
        participants=tuple(_participants(ticket, users, authors, ticket.created_at)),
        messages=tuple(messages),
    )


def event_snapshot(
    ticket: ZendeskTicketDetail,
    *,
    workspace: str,
    event_type: str,
    event_id: str,
    occurred_at: datetime,
    event: dict[str, Any],
    added: tuple[Message | None, ParticipantObservation | None] | None = None,
    partial: bool = False,
) -> ConversationSnapshot:
    """Map a ticket event webhook: the ticket as it was (``detail``) and what happened.

    ``added``: the message the event adds and its author (``comment_added``, ``messaging_ticket.message_added``);
    any other event becomes an event of the conversation. ``partial``: the message is a partial copy (a comment's
    plain text, without its HTML and attachments), which the complete copy of a push replaces whenever it comes.
    """
    created_at = ticket.created_at or occurred_at
    version = ticket.updated_at or occurred_at
    messages: list[Message] = []
    events: list[Event] = []
    observations: list[ParticipantObservation] = []
    if added is not None:
        message, author = added
        messages += [message] if message is not None else []
        observations += [author] if author is not None else []
    else:
        events.append(_event(ticket, event_type, event_id, occurred_at, event))
    observations += _participants(ticket, {}, [], created_at)
    return ConversationSnapshot(
        provider=PROVIDER,
        workspace=workspace,
        external_id=ticket.id,
        created_at=created_at,
        version=version,
        header=header(ticket, opening_message_id=None),
        participants=tuple(observations),
        messages=tuple(messages),
        events=tuple(events),
        partial_messages=partial,
    )


def comment_added(
    comment: ZendeskEventComment, *, occurred_at: datetime
) -> tuple[Message | None, ParticipantObservation | None]:
    """``ticket.comment_added``: the comment (its plain ``body``; no HTML, no time of its own) and its author."""
    author = comment.author
    observation = None
    if author is not None and author.id is not None and _person(author.id):
        role: Role | None = None if author.is_staff is None else ("agent" if author.is_staff else "customer")
        observation = _observe(author.id, role, author.name, None, seen_at=occurred_at)
    return _event_message(comment, sent_at=occurred_at), observation


def messaging_message(
    message: ZendeskMessagingMessage, actor: ZendeskMessagingActor | None, *, occurred_at: datetime
) -> tuple[Message | None, ParticipantObservation | None]:
    """``messaging_ticket.message_added``: a message of a messaging (chat) ticket, and who sent it."""
    observation = None
    author = actor.id if actor is not None else None
    if actor is not None and actor.id is not None:
        role = MESSAGING_ROLES.get(actor.type or "")
        observation = _observe(actor.id, role, actor.name, None, seen_at=occurred_at)
    text = tidy(message.body or "")
    if not text:
        return None, observation
    return (
        Message(
            id=message.id,
            author_participant_id=author,
            sent_at=occurred_at,
            content=text,
            visibility="public",
            provider_type="messaging",
        ),
        observation,
    )


def header(
    ticket: ZendeskTicket | ZendeskTicketDetail, *, opening_message_id: str | None, comments: int | None = None
) -> ConversationHeader:
    """Only what the payload carried: a field it omits (or sends as null, like a webhook's tags) says nothing.

    ``comments``: how many comments a push carried, which is all of them (a pull pages through every one; the
    comments endpoint has no cap), so it is the ticket's count and nothing is cut off.
    """
    given = ticket.model_fields_set
    fields: dict[str, Any] = {} if opening_message_id is None else {"opening_message_id": opening_message_id}
    if comments is not None:
        fields.update(provider_count=comments, truncated=False, counted="messages")
    subject = ticket.subject or ticket.raw_subject
    if subject is not None:
        fields["subject"] = " ".join(subject.split())
    state = STATES.get((ticket.status or "").lower())
    if state is not None:
        fields["state"] = state
    if ticket.tags is not None:
        fields["tags"] = tuple(dict.fromkeys(tag.strip() for tag in ticket.tags if tag.strip()))
    if "assignee_id" in given:
        fields["assignee_participant_id"] = ticket.assignee_id
    channel = _channel(ticket)
    if channel is not None:
        fields["channel"] = channel
    return ConversationHeader(**fields)


def _channel(ticket: ZendeskTicket | ZendeskTicketDetail) -> str | None:
    channel = ticket.via.channel if ticket.via is not None else None
    if isinstance(channel, int):
        return VIA_IDS.get(channel)
    if channel is None:
        return None
    return VIA_TYPES.get(channel, channel)


def _comment_message(comment: ZendeskComment, *, fallback_time: datetime) -> Message | None:
    html = comment.html_body or None
    text = tidy(comment.plain_body) if comment.plain_body else ""
    if not text and comment.body:
        text = tidy(comment.body)
    if not text and html:
        text = convert(html)[0]
    if not text and not comment.attachments and not (html and has_image(html)):
        return None
    return Message(
        id=comment.id,
        author_participant_id=comment.author_id if _person(comment.author_id) else None,
        sent_at=comment.created_at or fallback_time,
        content=text,
        content_html=html,
        visibility="public" if comment.public is not False else "internal",
        attachments=_attachments(comment.attachments),
        provider_type=comment.type,
    )


def _event_message(comment: ZendeskEventComment, *, sent_at: datetime) -> Message | None:
    """A webhook's comment: plain ``body`` (the HTML and the comment's own time are not in the event)."""
    html = comment.html_body or None
    text, _ = convert(html) if html else (tidy(comment.body or ""), False)
    attachments = [*(comment.attachments or ()), *((comment.attachment,) if comment.attachment else ())]
    if not text and not attachments:
        return None
    author = comment.author.id if comment.author is not None else None
    return Message(
        id=comment.id,
        author_participant_id=author if _person(author) else None,
        sent_at=sent_at,
        content=text,
        content_html=html,
        visibility="public" if comment.is_public is not False else "internal",
        attachments=_attachments(attachments),
        provider_type="Comment",
    )


def _event(ticket: ZendeskTicketDetail, event_type: str, event_id: str, at: datetime, event: dict[str, Any]) -> Event:
    kind = EVENT_TYPES.get(event_type)
    if event_type == "ticket.status_changed":
        current = event.get("current")
        state = STATES.get(current.lower()) if isinstance(current, str) else None
        kind = STATUS_EVENTS.get(state) if state is not None else None
    elif event_type == "ticket.created":
        kind = "opened"
    actor = ticket.actor_id if _person(ticket.actor_id) else None
    return Event(
        id=event_id, type=kind or "other", provider_type=event_type, actor_participant_id=actor, occurred_at=at
    )


def _attachments(items: Iterable[ZendeskAttachment] | None) -> tuple[Attachment, ...]:
    return tuple(
        Attachment(name=a.file_name, url=a.content_url, content_type=a.content_type, size=a.size) for a in items or ()
    )


def _participants(
    ticket: ZendeskTicket | ZendeskTicketDetail,
    users: dict[str, ZendeskUser],
    authors: list[tuple[str | None, datetime]],
    created_at: datetime,
) -> Iterator[ParticipantObservation]:
    requester, assignee = ticket.requester_id, ticket.assignee_id
    # The requester and whoever wrote take part; an assignee takes part once they write (as for Intercom: the
    # original design counts one participant for a conversation assigned to an admin who never wrote).
    seen: dict[str, datetime] = {}
    if _person(requester):
        assert requester is not None
        seen[requester] = created_at
    for author, at in authors:
        if author is not None and author not in seen:
            seen[author] = at
    for person, at in seen.items():
        user = users.get(person)
        role = ROLES.get((user.role or "").lower()) if user is not None and user.role else None
        if role is None:
            role = "customer" if person == requester else "agent" if person == assignee else None
        yield _observe(person, role, user.name if user else None, user.email if user else None, seen_at=at)


def _observe(
    participant_id: str, role: Role | None, name: str | None, email: str | None, *, seen_at: datetime
) -> ParticipantObservation:
    return ParticipantObservation(id=participant_id, role=role, name=name, email=email, seen_at=seen_at)


def _person(participant_id: str | None) -> bool:
    return participant_id is not None and participant_id != SYSTEM_AUTHOR


def _numeric(identifier: str) -> tuple[int, int | str]:
    # isascii: "²".isdigit() is true, and int() refuses it.
    return (0, int(identifier)) if identifier.isascii() and identifier.isdigit() else (1, identifier)
