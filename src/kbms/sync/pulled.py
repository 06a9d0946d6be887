"""A conversation fetched from a provider's API, stored as a push would be: the same acceptance step, ledger, merge,
search and feed (``kbms.ingest``), under the ledger kind ``pull``.

An unchanged re-fetch is answered from the ledger by its body's hash without being parsed (``unchanged``, nothing
added to the feed). A conversation the provider says is deleted (Intercom's 404 on a retrieve, a Zendesk ticket
with status ``deleted``) is tombstoned as a deletion webhook would: its ledger body is a small envelope kbms writes
(``deletion_body``), since a 404's body does not name the conversation, so that ``kbms reprocess`` reads it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

from kbms.deliveries import Delivery
from kbms.errors import InputError, ValidationFailed
from kbms.ingest import IngestOutcome, Refused, accept, keeps, parse_by_size
from kbms.limits import DEFAULT_LIMITS, PayloadLimits
from kbms.model import DEFAULT_WORKSPACE, ConversationDeletion, ConversationSnapshot
from kbms.providers import Provider
from kbms.providers.pull import Fetched
from kbms.storage.base import Store

RETRIEVED = "pull.retrieve"  # the topic of a fetched conversation's ledger row
DELETED = "pull.deleted"  # ... and of a deletion the provider reported when asked


@dataclass(frozen=True, slots=True)
class Tombstoned:
    """A fetched conversation the provider no longer has: stored as deleted."""

    provider: str
    external_id: str
    result: Literal["deleted", "unchanged"]


PullOutcome = IngestOutcome | Tombstoned | Refused


def deletion_body(provider: str, workspace: str, external_id: str) -> bytes:
    """The ledger body of a deletion found by pulling: what names the conversation, in kbms's words."""
    document = {"kbms": DELETED, "provider": provider, "workspace": workspace, "external_id": external_id}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def read_deletion(body: bytes) -> ConversationDeletion:
    """The deletion a ``deletion_body`` records (``kbms reprocess``)."""
    document = json.loads(body)
    return ConversationDeletion(
        provider=document["provider"], workspace=document["workspace"], external_id=document["external_id"]
    )


def pull_delivery_key(workspace: str, body_hash: str) -> str:
    """``pull:<workspace>:<sha256>``: the same answer fetched twice is one delivery."""
    return f"pull:{workspace}:{body_hash}"


async def store_pulled(
    store: Store,
    provider: Provider,
    fetched: Fetched,
    *,
    workspace: str,
    limits: PayloadLimits = DEFAULT_LIMITS,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> PullOutcome:
    """Store what a fetch returned for a source's ``workspace``. A payload the provider's mapper refuses is kept in
    the ledger as rejected (as a push's is) and returned as ``Refused``; the caller decides what becomes of its job."""
    body = deletion_body(provider.name, workspace, fetched.external_id) if fetched.deleted else fetched.body
    body_hash = hashlib.sha256(body).hexdigest()
    key = pull_delivery_key(workspace, body_hash)
    known = await store.find_delivery(provider.name, key)
    if known is not None and known.conversation_id is not None and known.external_id is not None:
        if fetched.deleted:
            return Tombstoned(provider.name, known.external_id, "unchanged")
        return IngestOutcome(known.conversation_id, provider.name, known.external_id, "unchanged")

    def delivery(topic: str) -> Delivery:
        return Delivery(
            provider=provider.name,
            workspace=workspace,
            kind="pull",
            topic=topic,
            delivery_key=key,
            body_hash=body_hash,
            body=body,
            received_at=clock(),
            named_workspace=workspace,
        )

    if fetched.deleted:
        deletion = ConversationDeletion(provider=provider.name, workspace=workspace, external_id=fetched.external_id)
        applied = await store.ingest(delivery(DELETED), deletion, redact=provider.redactor)
        return Tombstoned(
            provider.name, fetched.external_id, "unchanged" if applied.result == "unchanged" else "deleted"
        )

    def parse() -> ConversationSnapshot | InputError:
        return accept(provider, body, workspace=workspace, default_workspace=DEFAULT_WORKSPACE, limits=limits)

    accepted = await parse_by_size(parse, len(body))
    if isinstance(accepted, InputError):
        if keeps(accepted):
            await store.reject(delivery(RETRIEVED), cast(ValidationFailed, accepted).issues)
            return Refused(accepted, kept=True)
        return Refused(accepted)
    applied = await store.ingest(delivery(RETRIEVED), accepted, redact=provider.redactor)
    # A snapshot always lands in a conversation.
    assert applied.conversation_id is not None
    assert applied.external_id is not None
    assert applied.result != "ignored"
    return IngestOutcome(applied.conversation_id, provider.name, applied.external_id, applied.result)
