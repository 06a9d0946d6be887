"""Zendesk: tickets pushed directly (Support REST API shapes), signed event webhooks, and pulled (``kbms sync``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from kbms.model import WORKSPACE, ConversationSnapshot, WebhookEvent
from kbms.providers.base import validate_json
from kbms.providers.zendesk import signature
from kbms.providers.zendesk.client import ZendeskPuller
from kbms.providers.zendesk.mapper import PROVIDER, to_snapshot
from kbms.providers.zendesk.schema import ZendeskPush
from kbms.providers.zendesk.webhook import delivery_schema, parse_webhook

ZENDESK_HOST = re.compile(r"(?P<subdomain>[a-z0-9][a-z0-9-]*)\.zendesk\.com", re.IGNORECASE)


class ZendeskWebhooks:
    secret_variable = "KBMS_ZENDESK_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not a secret)
    needs_workspace = True  # events carry only a numeric account_id, never the subdomain

    def verify(self, body: bytes, headers: Mapping[str, str], secret: str, *, now: datetime) -> bool:
        return signature.verify(body, headers, secret, now=now)

    def parse(self, body: bytes, *, workspace: str | None) -> WebhookEvent:
        return parse_webhook(body, workspace=workspace.lower() if workspace else None)

    def delivery_schema(self) -> dict[str, Any]:
        return delivery_schema()


class ZendeskProvider:
    name = PROVIDER
    push_schema = ZendeskPush
    puller = ZendeskPuller()
    webhooks = ZendeskWebhooks()
    # Zendesk's redactions are not mapped yet (no public example of a redacted comment or its event).
    redactor = None
    workspace_description = (
        "The Zendesk subdomain (acme for acme.zendesk.com); default: the subdomain in the ticket's url, "
        "else KBMS_DEFAULT_WORKSPACE"
    )

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        push = validate_json(ZendeskPush, body)
        # Subdomains are case-insensitive: "Acme" and "acme" are one account, and one workspace.
        named = workspace.lower() if workspace else subdomain(push.ticket.url) or default_workspace
        return to_snapshot(push, workspace=named)


def subdomain(url: str | None) -> str | None:
    """``acme`` for ``https://acme.zendesk.com/api/v2/tickets/1.json``; None for any other host."""
    if not url:
        return None
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return None
    match = ZENDESK_HOST.fullmatch(host)
    if match is None or not re.fullmatch(WORKSPACE, match["subdomain"]):
        return None
    return match["subdomain"].lower()


__all__ = ["ZendeskProvider"]
