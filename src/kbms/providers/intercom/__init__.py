"""Intercom: conversations pushed directly (REST shape, API 1.x and 2.x), signed webhooks, and pulled from its
REST API (``client.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kbms.model import ConversationSnapshot, Redactor, WebhookEvent
from kbms.providers.base import validate_json
from kbms.providers.intercom import signature
from kbms.providers.intercom.client import IntercomPuller
from kbms.providers.intercom.mapper import PROVIDER, to_snapshot
from kbms.providers.intercom.redact import redact
from kbms.providers.intercom.schema import IntercomConversation
from kbms.providers.intercom.webhook import delivery_schema, parse_webhook


class IntercomWebhooks:
    secret_variable = "KBMS_INTERCOM_CLIENT_SECRET"  # noqa: S105 (the variable's name, not a secret)
    needs_workspace = False  # the envelope's app_id names it

    def verify(self, body: bytes, headers: Mapping[str, str], secret: str, *, now: datetime) -> bool:
        return signature.verify(body, headers, secret)

    def parse(self, body: bytes, *, workspace: str | None) -> WebhookEvent:
        return parse_webhook(body, workspace=workspace)

    def delivery_schema(self) -> dict[str, Any]:
        return delivery_schema()


class IntercomProvider:
    name = PROVIDER
    push_schema = IntercomConversation
    puller = IntercomPuller()
    webhooks = IntercomWebhooks()
    workspace_description = (
        "The Intercom app_id (a conversation object does not carry it); default: KBMS_DEFAULT_WORKSPACE"
    )

    @property
    def redactor(self) -> Redactor:
        return redact

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        conversation = validate_json(IntercomConversation, body)
        return to_snapshot(conversation, workspace=workspace or default_workspace, retrieved=True)


__all__ = ["IntercomProvider"]
