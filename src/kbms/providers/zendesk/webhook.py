"""Zendesk event webhooks (``zen:event-type:*``), read into a provider-neutral ``WebhookEvent``.

- the delivery id is the event's ``id`` (a UUID or a ULID), so a redelivery is recognized;
- the workspace is the Zendesk subdomain, and an event does not carry it (only a numeric ``account_id``): it comes
  from the webhook's endpoint URL, ``/webhooks/zendesk?workspace=<subdomain>``, and a webhook without one is
  refused (422) rather than filed under a workspace its tickets' pushes would not share;
- ``ticket.*`` events merge into the ticket's conversation: ``detail`` is the ticket when the event happened;
  ``comment_added`` adds a message, ``permanently_deleted`` leaves a tombstone, any other becomes an event;
- ``messaging_ticket.message_added`` adds a message to a messaging ticket;
- anything else (user, organization, ... events) is recorded and otherwise ignored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from kbms.errors import FieldIssue, InvalidWebhookItem, ValidationFailed
from kbms.model import ConversationDeletion, Message, ParticipantObservation, WebhookEvent
from kbms.providers.base import translate_issues, validate_json
from kbms.providers.fields import Id, Timestamp
from kbms.providers.zendesk.mapper import PROVIDER, comment_added, event_snapshot, messaging_message
from kbms.providers.zendesk.schema import ZendeskEvent, ZendeskEventComment, ZendeskMessagingEvent, ZendeskTicketDetail

PREFIX = "zen:event-type:"
DELETED = "ticket.permanently_deleted"
COMMENT_ADDED = "ticket.comment_added"
MESSAGE_ADDED = "messaging_ticket.message_added"
READ = rf"^({PREFIX})?(ticket\.|{re.escape(MESSAGE_ADDED)}$)"  # the topics parse_webhook reads (JSON Schema regex)
NO_WORKSPACE = (
    "Zendesk events do not name their subdomain: add it to the webhook's endpoint URL, "
    "e.g. /webhooks/zendesk?workspace=acme for acme.zendesk.com"
)


def parse_webhook(body: bytes, *, workspace: str | None) -> WebhookEvent:
    envelope = validate_json(ZendeskEvent, body)
    if workspace is None:
        raise ValidationFailed([FieldIssue("workspace", "missing", NO_WORKSPACE)])
    delivery_id, topic = envelope.id, envelope.type
    name = topic.removeprefix(PREFIX) if topic else ""

    def event(change: ConversationDeletion | Any | None) -> WebhookEvent:
        return WebhookEvent(delivery_id=delivery_id, topic=topic, workspace=workspace, change=change)

    def read(schema: type[BaseModel], value: Any, *where: str) -> Any:
        try:
            return schema.model_validate(value)
        except ValidationError as exc:
            issues = translate_issues(exc, prefix=where)
            raise InvalidWebhookItem(issues, delivery_id=delivery_id, topic=topic, workspace=workspace) from None

    if not (name.startswith("ticket.") or name == MESSAGE_ADDED):
        return event(None)
    ticket: ZendeskTicketDetail = read(ZendeskTicketDetail, envelope.detail, "detail")
    if name == DELETED:
        return event(ConversationDeletion(provider=PROVIDER, workspace=workspace, external_id=ticket.id))
    occurred_at = envelope.time or ticket.updated_at
    if occurred_at is None:
        raise InvalidWebhookItem(
            [FieldIssue("time", "missing", "Field required")], delivery_id=delivery_id, topic=topic, workspace=workspace
        )
    details = envelope.event or {}
    added: tuple[Message | None, ParticipantObservation | None] | None = None
    if name == COMMENT_ADDED:
        comment: ZendeskEventComment = read(ZendeskEventComment, details.get("comment"), "event", "comment")
        added = comment_added(comment, occurred_at=occurred_at)
    elif name == MESSAGE_ADDED:
        messaging: ZendeskMessagingEvent = read(ZendeskMessagingEvent, details, "event")
        added = messaging_message(messaging.message, messaging.actor, occurred_at=occurred_at)
    if delivery_id is None and added is None:
        # An event of the conversation is keyed by the webhook's id; without one there is nothing to key it by.
        raise InvalidWebhookItem(
            [FieldIssue("id", "missing", "Field required")], delivery_id=None, topic=topic, workspace=workspace
        )
    snapshot = event_snapshot(
        ticket,
        workspace=workspace,
        event_type=name,
        event_id=delivery_id or "",
        occurred_at=occurred_at,
        event=details,
        added=added,
        partial=name == COMMENT_ADDED,
    )
    return event(snapshot)


def delivery_schema() -> dict[str, Any]:
    """What ``parse_webhook`` accepts, as JSON Schema: an event it only records, or a ticket event carrying what
    its type needs (the ticket in ``detail``; a time; the comment, the message, or else a delivery id)."""
    envelope = ZendeskEvent.model_json_schema()
    defs = envelope.pop("$defs", {})
    for model in (ZendeskTicketDetail, ZendeskEventComment, ZendeskMessagingEvent):
        schema = model.model_json_schema()
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{model.__name__}"}

    def named(name: str) -> dict[str, Any]:
        return {"enum": [PREFIX + name, name]}

    def ticket_event(topic: dict[str, Any], required: list[str], **properties: Any) -> dict[str, Any]:
        common = {"type": topic, "detail": ref(ZendeskTicketDetail), "time": TypeAdapter(Timestamp).json_schema()}
        return {"required": ["type", "detail", *required], "properties": {**common, **properties}}

    recorded = {"anyOf": [{"type": "null"}, {"type": "string", "not": {"pattern": READ}}]}
    comment = {"type": "object", "required": ["comment"], "properties": {"comment": ref(ZendeskEventComment)}}
    other = {"type": "string", "pattern": rf"^({PREFIX})?ticket\.", "not": named(COMMENT_ADDED)}
    envelope["anyOf"] = [
        {"properties": {"type": recorded}},
        {"required": ["type", "detail"], "properties": {"type": named(DELETED), "detail": ref(ZendeskTicketDetail)}},
        ticket_event(named(COMMENT_ADDED), ["time", "event"], event=comment),
        ticket_event(named(MESSAGE_ADDED), ["time", "event"], event=ref(ZendeskMessagingEvent)),
        ticket_event(other, ["time", "id"], id=TypeAdapter(Id).json_schema()),
    ]
    return {**envelope, "$defs": defs}
