"""Intercom: conversations pushed directly (REST shape, API 1.x and 2.x)."""

from __future__ import annotations

from kbms.model import ConversationSnapshot
from kbms.providers.base import validate_json
from kbms.providers.intercom.mapper import PROVIDER, to_snapshot
from kbms.providers.intercom.schema import IntercomConversation


class IntercomProvider:
    name = PROVIDER
    push_schema = IntercomConversation

    def parse_push(self, body: bytes, *, workspace: str) -> ConversationSnapshot:
        return to_snapshot(validate_json(IntercomConversation, body), workspace=workspace)


__all__ = ["IntercomProvider"]
