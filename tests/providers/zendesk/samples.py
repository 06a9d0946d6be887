"""Zendesk's samples for the generic tests (``tests.providers.SAMPLES``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from kbms.providers.zendesk import signature
from tests.support.helpers import ZENDESK, dumps, zendesk_pushes
from tests.support.samples import Samples


def push(conversation_id: str) -> bytes:
    _case, first = next(zendesk_pushes())
    return dumps({**first, "ticket": {**first["ticket"], "id": conversation_id}})


def sign(body: bytes, secret: str, now: datetime) -> Mapping[str, str]:
    timestamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {signature.TIMESTAMP: timestamp, signature.SIGNATURE: signature.sign(body, timestamp, secret)}


SAMPLES = Samples(
    fixtures=ZENDESK,
    push=push,
    webhook=(ZENDESK / "21_webhook_ticket_created_docs_copy.json").read_bytes(),
    sign=sign,
    documented_deliveries=(
        ({"type": "zen:event-type:ticket.comment_added", "detail": {"id": "1"}, "time": 0}, False),
        ({"type": "zen:event-type:ticket.permanently_deleted", "detail": {"id": "1"}}, True),
        ({"type": "zen:event-type:user.created", "detail": None}, True),
    ),
)
