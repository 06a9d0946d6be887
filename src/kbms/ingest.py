"""Use cases: ingest a pushed payload. The HTTP API and the CLI both come through here.

Order of work for a push, cheapest first:
1. hash the raw bytes; a body already stored for this provider and workspace is answered from the ledger
   without being parsed again (redeliveries and retries are the common case at the edge);
2. validate and map (pure, in the provider); a payload that fails validation is kept in the ledger as rejected,
   so a later mapper can re-derive it, and the caller gets the validation error;
3. store: one transaction records the delivery and merges the snapshot.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio.to_thread

from kbms.errors import ValidationFailed
from kbms.model import IngestResult
from kbms.providers import Provider
from kbms.storage.base import Delivery, Store

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
        if len(body) > INLINE_PARSE_BYTES:
            # A big body takes long to validate and convert; off the event loop, other requests keep flowing.
            parse = functools.partial(provider.parse_push, body, workspace=workspace)
            snapshot = await anyio.to_thread.run_sync(parse)
        else:
            snapshot = provider.parse_push(body, workspace=workspace)
    except ValidationFailed as exc:
        await store.reject(delivery, exc.issues)
        raise
    applied = await store.ingest(delivery, snapshot)
    return IngestOutcome(applied.conversation_id, provider.name, applied.external_id, applied.result)
