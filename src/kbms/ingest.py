"""Use cases: ingest a pushed payload, receive a webhook. The HTTP API and the CLI both come through here.

Order of work for a push, cheapest first:
1. hash the raw bytes; a body already stored for this provider and workspace is answered from the ledger
   without being parsed again (redeliveries and retries are the common case at the edge);
2. validate and map (pure, in the provider); a payload that fails validation is kept in the ledger as rejected,
   so a later mapper can re-derive it, and the caller gets the validation error;
3. store: one transaction records the delivery and merges the snapshot.

A webhook is verified first, on the raw bytes, before anything is parsed or stored; then it is deduplicated by
its delivery id (the notification id, or the body's hash when the provider sends none) and applied the same way.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

import anyio.to_thread

from kbms.errors import (
    FieldIssue,
    InvalidJson,
    InvalidSignature,
    InvalidWebhookItem,
    UnknownProvider,
    ValidationFailed,
)
from kbms.model import DEFAULT_WORKSPACE, IngestResult
from kbms.providers import Provider
from kbms.storage.base import Delivery, Store

T = TypeVar("T")

# Below this, parsing costs less than a hand-off to a thread (~120 us): do it inline.
INLINE_PARSE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """The answer to one ingested payload: the original contract's fields plus ``result``."""

    conversation_id: str
    provider: str
    external_id: str
    result: IngestResult

    @property
    def deduplicated(self) -> bool:
        """True whenever the conversation already existed (the original design's meaning)."""
        return self.result != "created"


def push_delivery_key(workspace: str, body_hash: str) -> str:
    # The workspace is not in a pushed body, so the same body pushed to two workspaces is two deliveries.
    return f"push:{workspace}:{body_hash}"


async def ingest_push(
    store: Store,
    provider: Provider,
    body: bytes,
    *,
    workspace: str,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> IngestOutcome:
    """Validate, map and store one pushed conversation. Raises ``InvalidJson`` or ``ValidationFailed``."""
    body_hash = hashlib.sha256(body).hexdigest()
    key = push_delivery_key(workspace, body_hash)
    known = await store.find_delivery(provider.name, key)
    if known is not None and known.conversation_id is not None and known.external_id is not None:
        return IngestOutcome(known.conversation_id, provider.name, known.external_id, "unchanged")

    delivery = Delivery(
        provider=provider.name,
        workspace=workspace,
        kind="push",
        topic=None,
        delivery_key=key,
        body_hash=body_hash,
        body=body,
        received_at=clock(),
    )
    try:
        snapshot = await _parse(functools.partial(provider.parse_push, body, workspace=workspace), len(body))
    except ValidationFailed as exc:
        await store.reject(delivery, exc.issues)
        raise
    applied = await store.ingest(delivery, snapshot, redact=provider.redact)
    # A push always carries a snapshot, so it always lands in a conversation.
    assert applied.result != "ignored"
    assert applied.conversation_id is not None
    assert applied.external_id is not None
    return IngestOutcome(applied.conversation_id, provider.name, applied.external_id, applied.result)


async def _parse(parse: Callable[[], T], size: int) -> T:
    if size > INLINE_PARSE_BYTES:
        # A big body takes long to validate and convert; off the event loop, other requests keep flowing.
        return await anyio.to_thread.run_sync(parse)
    return parse()


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


async def receive_webhook(
    store: Store,
    provider: Provider,
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str,
    verify: bool = True,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> WebhookOutcome:
    """Verify, deduplicate and apply one webhook. Raises ``InvalidSignature`` before anything is parsed or kept."""
    hooks = provider.webhooks
    if hooks is None:
        raise UnknownProvider(provider.name)
    now = clock()
    if verify and not hooks.verify(body, headers, secret, now=now):
        raise InvalidSignature()
    body_hash = hashlib.sha256(body).hexdigest()

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
        )

    try:
        event = await _parse(functools.partial(hooks.parse, body), len(body))
    except InvalidWebhookItem as exc:
        await store.reject(delivery(exc.delivery_id, topic=exc.topic, workspace=exc.workspace), exc.issues)
        raise
    except ValidationFailed as exc:
        await store.reject(delivery(None, topic=None, workspace=DEFAULT_WORKSPACE), exc.issues)
        raise
    except InvalidJson as exc:
        # Signed, so genuinely the provider's: kept, like every verified payload, even if nothing can read it.
        issue = FieldIssue("body", "invalid_json", exc.message)
        await store.reject(delivery(None, topic=None, workspace=DEFAULT_WORKSPACE), [issue])
        raise
    received = delivery(event.delivery_id, topic=event.topic, workspace=event.workspace)
    known = await store.find_delivery(provider.name, received.delivery_key)
    if known is not None and known.outcome != "rejected":
        result: Literal["unchanged", "ignored"] = "ignored" if known.conversation_id is None else "unchanged"
        return WebhookOutcome(
            provider.name, received.delivery_key, event.topic, result, known.conversation_id, known.external_id, True
        )
    applied = await store.ingest(received, event.change, redact=provider.redact)
    return WebhookOutcome(
        provider=provider.name,
        delivery_id=received.delivery_key,
        topic=event.topic,
        result=applied.result,
        conversation_id=applied.conversation_id,
        external_id=applied.external_id,
        deduplicated=applied.duplicate_delivery,
    )
