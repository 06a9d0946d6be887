"""Intercom's samples for the generic tests (``tests.providers.SAMPLES``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from kbms.providers.intercom import signature
from tests.support.helpers import INTERCOM, dumps, intercom_payload
from tests.support.samples import Samples


def sign(body: bytes, secret: str, now: datetime) -> Mapping[str, str]:
    return {signature.HEADER: signature.sign(body, secret)}  # no timestamp: Intercom signs the body only


_CONVERSATION = {"type": "conversation", "id": "1"}  # no created_at: not a conversation kbms can read

SAMPLES = Samples(
    fixtures=INTERCOM,
    push=lambda conversation_id: dumps(intercom_payload(conversation_id)),
    webhook=(INTERCOM / "19_webhook_ping_zulip.json").read_bytes(),
    sign=sign,
    documented_deliveries=(
        ({"topic": "conversation.user.replied", "data": {"item": _CONVERSATION}}, False),
        ({"topic": "conversation.deleted", "data": {"item": _CONVERSATION}}, True),
        ({"topic": "contact.created", "data": {"item": {"type": "contact"}}}, True),
    ),
)
