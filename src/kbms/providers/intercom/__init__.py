"""Intercom: conversations pushed directly (REST shape, API 1.x and 2.x) and signed webhooks."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from kbms.model import ConversationSnapshot, Message, WebhookEvent
from kbms.providers.base import validate_json
from kbms.providers.intercom import signature
from kbms.providers.intercom.mapper import PROVIDER, to_snapshot
from kbms.providers.intercom.redact import redact
from kbms.providers.intercom.schema import IntercomConversation
from kbms.providers.intercom.webhook import parse_webhook


class IntercomWebhooks:
    secret_variable = "KBMS_INTERCOM_CLIENT_SECRET"  # noqa: S105 (the variable's name, not a secret)

    def verify(self, body: bytes, headers: Mapping[str, str], secret: str, *, now: datetime) -> bool:
        return signature.verify(body, headers, secret)

    def parse(self, body: bytes) -> WebhookEvent:
        return parse_webhook(body)


class IntercomProvider:
    name = PROVIDER
    push_schema = IntercomConversation
    webhooks = IntercomWebhooks()

    def parse_push(self, body: bytes, *, workspace: str) -> ConversationSnapshot:
        return to_snapshot(validate_json(IntercomConversation, body), workspace=workspace)

    def redact(self, body: bytes, external_id: str, redacted: Mapping[str, Message]) -> bytes | None:
        return redact(body, external_id, redacted)


__all__ = ["IntercomProvider"]
