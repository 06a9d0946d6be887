"""Use case: receive a webhook. The HTTP API comes through here.

A webhook is verified first, on the raw bytes, before anything is parsed or stored; then it is deduplicated by
its delivery id (the notification id, or the body's hash when the provider sends none) and applied as a push is
(``kbms.ingest``), with the same refusals (``Refused``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from kbms.deliveries import Delivery
from kbms.errors import (
    FieldIssue,
    InvalidJson,
    InvalidSignature,
    InvalidWebhookItem,
    LimitExceeded,
    NonFiniteNumber,
    UnknownProvider,
    ValidationFailed,
)
from kbms.ingest import Refused, parse_by_size
from kbms.limits import DEFAULT_LIMITS, PayloadLimits, enforce
from kbms.model import DEFAULT_WORKSPACE, WebhookEvent
from kbms.providers import Provider
from kbms.providers.base import refuse_non_finite
from kbms.storage.base import Store


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """The answer to one webhook delivery."""

    provider: str
    delivery_id: str
    topic: str | None
    result: Literal["created", "updated", "unchanged", "ignored"]
    conversation_id: str | None
    external_id: str | None
    deduplicated: bool
    workspace: str | None = None  # the conversation's (kbms sync's hints need it)


async def receive_webhook(
    store: Store,
    provider: Provider,
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str,
    workspace: str | None = None,
    verify: bool = True,
    limits: PayloadLimits = DEFAULT_LIMITS,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> WebhookOutcome | Refused:
    """Verify, deduplicate and apply one webhook. Raises ``InvalidSignature`` before anything is parsed or kept; a
    delivery that is not JSON or does not validate is returned as ``Refused``: kept in the ledger as rejected (it
    passed the door), except one holding NaN or Infinity, or over a size limit.

    ``workspace``: the ``?workspace=`` of the webhook's URL (for providers whose payloads do not name theirs).
    """
    hooks = provider.webhooks
    if hooks is None:
        raise UnknownProvider(provider.name)
    now = clock()
    if verify and not hooks.verify(body, headers, secret, now=now):
        raise InvalidSignature()
    body_hash = hashlib.sha256(body).hexdigest()

    named = workspace

    def delivery(key: str | None, *, topic: str | None, workspace: str) -> Delivery:
        return Delivery(
            provider=provider.name,
            workspace=workspace,
            kind="webhook",
            topic=topic,
            delivery_key=key or f"sha256:{body_hash}",
            body_hash=body_hash,
            body=body,
            received_at=now,
            verified=verify,
            named_workspace=named,
        )

    def parse() -> WebhookEvent:
        refuse_non_finite(body)
        event = hooks.parse(body, workspace=workspace)
        enforce(event.change, limits)
        return event

    try:
        event = await parse_by_size(parse, len(body))
    except LimitExceeded as exc:
        return Refused(exc)  # a size limit, like the body's: nothing of it is kept
    except NonFiniteNumber as exc:
        return Refused(exc)  # not kept, unlike other signed garbage: see NonFiniteNumber
    except InvalidWebhookItem as exc:
        await store.reject(delivery(exc.delivery_id, topic=exc.topic, workspace=exc.workspace), exc.issues)
        return Refused(exc, kept=True)
    except ValidationFailed as exc:
        await store.reject(delivery(None, topic=None, workspace=workspace or DEFAULT_WORKSPACE), exc.issues)
        return Refused(exc, kept=True)
    except InvalidJson as exc:
        # Signed, so genuinely the provider's: kept, like every verified payload, even if nothing can read it.
        issue = FieldIssue("body", "invalid_json", exc.message)
        await store.reject(delivery(None, topic=None, workspace=workspace or DEFAULT_WORKSPACE), [issue])
        return Refused(exc, kept=True)
    received = delivery(event.delivery_id, topic=event.topic, workspace=event.workspace)
    known = await store.find_delivery(provider.name, received.delivery_key)
    if known is not None and known.outcome != "rejected":
        result: Literal["unchanged", "ignored"] = "ignored" if known.conversation_id is None else "unchanged"
        return WebhookOutcome(
            provider.name,
            received.delivery_key,
            event.topic,
            result,
            known.conversation_id,
            known.external_id,
            True,
            event.workspace,
        )
    applied = await store.ingest(received, event.change, redact=provider.redactor)
    return WebhookOutcome(
        provider=provider.name,
        delivery_id=received.delivery_key,
        topic=event.topic,
        result=applied.result,
        conversation_id=applied.conversation_id,
        external_id=applied.external_id,
        deduplicated=applied.duplicate_delivery,
        workspace=event.workspace,
    )
