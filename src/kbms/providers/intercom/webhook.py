"""Intercom webhooks: the ``notification_event`` envelope, read into a provider-neutral ``WebhookEvent``.

- ``app_id`` is the workspace; ``id`` is the delivery id (null on some topics, e.g. ``ping``);
- an item of ``type: conversation`` merges into the stored conversation (webhooks carry only the new parts);
- ``conversation.deleted`` carries only ``{type, conversation_id}``: it becomes a deletion;
- anything else (``ping``, ``contact.attached``'s internal shape, ...) is recorded and otherwise ignored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kbms.errors import FieldIssue, InvalidWebhookItem, ValidationFailed
from kbms.model import DEFAULT_WORKSPACE, WORKSPACE, WORKSPACE_PATTERN, Change, ConversationDeletion, WebhookEvent
from kbms.providers.base import translate_issues, validate_json
from kbms.providers.fields import Id
from kbms.providers.intercom.mapper import PROVIDER, to_snapshot
from kbms.providers.intercom.schema import IntercomConversationItem, IntercomNotification

DELETED = "conversation.deleted"
CONVERSATION_ID: TypeAdapter[str] = TypeAdapter(Id)
ITEM = ("data", "item")


def parse_webhook(body: bytes, *, workspace: str | None = None) -> WebhookEvent:
    """``workspace`` (the URL's) is used only when the envelope has no ``app_id``: the signed payload wins."""
    envelope = validate_json(IntercomNotification, body)
    workspace = envelope.app_id or workspace or DEFAULT_WORKSPACE
    if not re.fullmatch(WORKSPACE, workspace):
        raise ValidationFailed([FieldIssue("app_id", "string_pattern_mismatch", "Not a workspace id")])
    item = envelope.data.item if envelope.data is not None else None
    delivery_id, topic = envelope.id, envelope.topic

    def refused(issues: list[FieldIssue]) -> InvalidWebhookItem:
        return InvalidWebhookItem(issues, delivery_id=delivery_id, topic=topic, workspace=workspace)

    def event(change: Change | None) -> WebhookEvent:
        return WebhookEvent(delivery_id=delivery_id, topic=topic, workspace=workspace, change=change)

    if item is None:
        return event(None)
    if envelope.topic == DELETED:
        try:
            external_id = CONVERSATION_ID.validate_python(item.get("conversation_id", item.get("id")))
        except ValidationError as exc:
            raise refused(translate_issues(exc, prefix=(*ITEM, "conversation_id"))) from None
        return event(ConversationDeletion(provider=PROVIDER, workspace=workspace, external_id=external_id))
    if item.get("type") != "conversation":
        return event(None)
    try:
        conversation = IntercomConversationItem.model_validate(item)
    except ValidationError as exc:
        raise refused(translate_issues(exc, prefix=ITEM)) from None
    return event(to_snapshot(conversation, workspace=workspace))


def delivery_schema() -> dict[str, Any]:
    """What ``parse_webhook`` accepts, as JSON Schema: the envelope with no item, or an item its topic can read (a
    deletion names its conversation; an item of ``type: conversation`` is one; any other item is only recorded)."""
    envelope = IntercomNotification.model_json_schema()
    conversation = IntercomConversationItem.model_json_schema()
    defs = {**envelope.pop("$defs", {}), **conversation.pop("$defs", {}), "IntercomConversationItem": conversation}
    conversation_id = CONVERSATION_ID.json_schema()
    deleted, not_deleted = {"const": DELETED}, {"not": {"const": DELETED}}

    def carrying(topic: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        data = {"type": "object", "required": ["item"], "properties": {"item": item}}
        return {"required": ["data"], "properties": {"topic": topic, "data": data}}

    envelope["properties"]["app_id"] = {
        "anyOf": [{"type": "string", "pattern": WORKSPACE_PATTERN}, {"type": "null"}],
        "description": "The Intercom app: the workspace (else ?workspace=, else the default)",
    }
    envelope["anyOf"] = [
        {"properties": {"data": {"anyOf": [{"type": "null"}, {"properties": {"item": {"type": "null"}}}]}}},
        carrying(
            deleted,
            {
                "type": "object",
                "properties": {"conversation_id": conversation_id, "id": conversation_id},
                "anyOf": [{"required": ["conversation_id"]}, {"required": ["id"]}],
            },
        ),
        carrying(
            not_deleted,
            {
                "allOf": [{"$ref": "#/$defs/IntercomConversationItem"}],
                "required": ["type"],
                "properties": {"type": {"const": "conversation"}},
            },
        ),
        carrying(not_deleted, {"type": "object", "properties": {"type": {"not": {"const": "conversation"}}}}),
    ]
    return {**envelope, "$defs": defs}
