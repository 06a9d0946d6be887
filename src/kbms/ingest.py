"""Use cases: ingest a pushed payload, or a batch of them. The HTTP API and the CLI both come through here.

Order of work for a push, cheapest first:
1. hash the raw bytes; a body already stored for this provider and workspace is answered from the ledger
   without being parsed again (redeliveries and retries are the common case at the edge);
2. refuse what is not strict JSON (``NaN``, ``Infinity``: only here, where payloads arrive), then validate and
   map (pure, in the provider); a payload that fails validation is kept in the ledger as rejected,
   so a later mapper can re-derive it, and the caller gets the validation error;
3. store: one transaction records the delivery and merges the snapshot.

The refusal of a payload (``Refused``) and the size rule for parsing off the event loop (``parse_by_size``) are
shared with the webhook use case (``kbms.webhooks``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar, cast

import anyio.to_thread

from kbms.deliveries import Applied, Delivery, Pending
from kbms.errors import (
    FieldIssue,
    Forbidden,
    InputError,
    InvalidJson,
    LimitExceeded,
    ValidationFailed,
)
from kbms.limits import DEFAULT_LIMITS, PayloadLimits, enforce
from kbms.model import DEFAULT_WORKSPACE, ConversationSnapshot, IngestResult
from kbms.providers import Provider
from kbms.providers.base import refuse_non_finite
from kbms.storage.base import Store

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


def push_delivery_key(workspace: str | None, body_hash: str) -> str:
    """``push:<workspace the caller named>:<sha256>``, or ``push::<sha256>`` when the caller named none: the
    named workspace is not in the body, so the same body pushed to two workspaces is two deliveries."""
    return f"push:{workspace or ''}:{body_hash}"


@dataclass(frozen=True, slots=True)
class Refused:
    """A payload kbms refused: the error its caller answers with, and whether the payload was kept in the ledger as
    rejected (what ``kbms reprocess`` may re-derive after a mapper fix; a payload over a size limit, or not JSON, is
    not kept). Metrics count the two apart."""

    error: InputError
    kept: bool = False


def accept(
    provider: Provider, body: bytes, *, workspace: str | None, default_workspace: str, limits: PayloadLimits
) -> ConversationSnapshot | InputError:
    """The one acceptance step of a pushed payload (a push, a batch line, a line of ``kbms ingest``): strict JSON,
    the provider's validation and mapping, the size caps. Pure; the refusal is returned, not raised."""
    try:
        refuse_non_finite(body)
        snapshot = provider.parse_push(body, workspace=workspace, default_workspace=default_workspace)
        enforce(snapshot, limits)
    except (InvalidJson, ValidationFailed) as exc:
        return exc
    return snapshot


def keeps(error: InputError) -> bool:
    """Whether a refused push is kept in the ledger as rejected: a payload that is JSON but does not validate (a
    later mapper may read it); not one that is not JSON, nor one over a size limit, as for an oversized body."""
    return isinstance(error, ValidationFailed) and not isinstance(error, LimitExceeded)


def _push_delivery(
    provider: Provider,
    body: bytes,
    body_hash: str,
    key: str,
    *,
    workspace: str | None,
    filed_under: str,
    received_at: datetime,
) -> Delivery:
    """A pushed payload as the ledger keeps it, filed under ``filed_under``: its conversation's workspace (which the
    payload may name), or for a rejection the one the caller named, else the default."""
    return Delivery(
        provider=provider.name,
        workspace=filed_under,
        kind="push",
        topic=None,
        delivery_key=key,
        body_hash=body_hash,
        body=body,
        received_at=received_at,
        named_workspace=workspace,
    )


def _outcome(provider: Provider, applied: Applied) -> IngestOutcome:
    # A push always carries a snapshot, so it always lands in a conversation.
    assert applied.result != "ignored"
    assert applied.conversation_id is not None
    assert applied.external_id is not None
    return IngestOutcome(applied.conversation_id, provider.name, applied.external_id, applied.result)


async def ingest_push(
    store: Store,
    provider: Provider,
    body: bytes,
    *,
    workspace: str | None,
    default_workspace: str = DEFAULT_WORKSPACE,
    limits: PayloadLimits = DEFAULT_LIMITS,
    allowed: frozenset[str] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> IngestOutcome | Refused:
    """Validate, map and store one pushed conversation; a refused payload (``InvalidJson``, ``ValidationFailed``,
    ``LimitExceeded``, or ``Forbidden`` for a conversation of a workspace not ``allowed``) is returned as
    ``Refused``. Raises ``Forbidden`` when ``workspace`` itself is not ``allowed``.

    ``workspace``: the one the caller named; None lets the provider read it from the payload, if it can, or
    take ``default_workspace``. ``allowed``: the workspaces the caller may write (None: any); a conversation of
    another one is refused before anything of it is stored.
    """
    _check_allowed(workspace, allowed)
    body_hash = hashlib.sha256(body).hexdigest()
    key = push_delivery_key(workspace, body_hash)
    known = await store.find_delivery(provider.name, key)
    if known is not None and known.conversation_id is not None and known.external_id is not None:
        refusal = _refusal(known.workspace, allowed)
        if refusal is not None:
            return Refused(refusal)
        return IngestOutcome(known.conversation_id, provider.name, known.external_id, "unchanged")
    received_at = clock()

    def parse() -> ConversationSnapshot | InputError:
        return accept(provider, body, workspace=workspace, default_workspace=default_workspace, limits=limits)

    accepted = await parse_by_size(parse, len(body))
    if isinstance(accepted, InputError):
        if not keeps(accepted):
            return Refused(accepted)
        filed_under = workspace or default_workspace
        delivery = _push_delivery(
            provider, body, body_hash, key, workspace=workspace, filed_under=filed_under, received_at=received_at
        )
        await store.reject(delivery, cast(ValidationFailed, accepted).issues)
        return Refused(accepted, kept=True)
    refusal = _refusal(accepted.workspace, allowed)
    if refusal is not None:
        return Refused(refusal)
    delivery = _push_delivery(
        provider, body, body_hash, key, workspace=workspace, filed_under=accepted.workspace, received_at=received_at
    )
    return _outcome(provider, await store.ingest(delivery, accepted, redact=provider.redactor))


def _refusal(workspace: str | None, allowed: frozenset[str] | None) -> Forbidden | None:
    """The refusal of a write to ``workspace`` by a caller limited to ``allowed``; None when it may write."""
    if allowed is not None and workspace is not None and workspace not in allowed:
        return Forbidden(f"This API key cannot write to workspace {workspace!r}")
    return None


def _check_allowed(workspace: str | None, allowed: frozenset[str] | None) -> None:
    refusal = _refusal(workspace, allowed)
    if refusal is not None:
        raise refusal


LineOutcome = IngestOutcome | Refused


async def ingest_batch(
    store: Store,
    provider: Provider,
    bodies: Sequence[bytes],
    *,
    workspace: str | None,
    default_workspace: str = DEFAULT_WORKSPACE,
    limits: PayloadLimits = DEFAULT_LIMITS,
    allowed: frozenset[str] | None = None,
    parse_inline: bool | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[LineOutcome]:
    """``ingest_push`` for many payloads at once: one ledger lookup, one write, one commit.

    Each payload succeeds or fails alone: the result list holds, in order, an ``IngestOutcome`` or the ``Refused``
    that payload would have had on its own. ``parse_inline``: validate on the calling thread
    (True), in a worker thread (False), or by size (None: a worker thread for more than ``INLINE_PARSE_BYTES``).
    Raises ``StorageUnavailable`` if the write fails (nothing of the batch is then committed), ``Forbidden`` if
    ``workspace`` is not ``allowed``; a line of a workspace not ``allowed`` is refused alone.
    """
    _check_allowed(workspace, allowed)
    received_at = clock()
    hashes = [hashlib.sha256(body).hexdigest() for body in bodies]
    keys = [push_delivery_key(workspace, h) for h in hashes]
    known = await store.find_deliveries(provider.name, keys)
    results: list[LineOutcome | None] = [None] * len(bodies)
    fresh: list[int] = []
    for index, key in enumerate(keys):
        entry = known.get(key)
        if entry is not None and entry.conversation_id is not None and entry.external_id is not None:
            refusal = _refusal(entry.workspace, allowed)
            results[index] = (
                Refused(refusal)
                if refusal is not None
                else IngestOutcome(entry.conversation_id, provider.name, entry.external_id, "unchanged")
            )
        else:
            fresh.append(index)

    def parse_all() -> list[ConversationSnapshot | InputError]:
        return [
            accept(provider, bodies[index], workspace=workspace, default_workspace=default_workspace, limits=limits)
            for index in fresh
        ]

    size = sum(len(bodies[index]) for index in fresh)
    inline = size <= INLINE_PARSE_BYTES if parse_inline is None else parse_inline
    parsed = parse_all() if inline else await anyio.to_thread.run_sync(parse_all)

    pending: list[Pending] = []
    positions: list[int] = []  # the payload index of each pending item
    for index, accepted in zip(fresh, parsed, strict=True):
        if isinstance(accepted, InputError):
            results[index] = Refused(accepted)  # kept=True once the ledger's rejection is committed, below
            if not keeps(accepted):
                continue
            filed_under = workspace or default_workspace
            issues: list[FieldIssue] | None = cast(ValidationFailed, accepted).issues
            change = None
        else:
            refusal = _refusal(accepted.workspace, allowed)
            if refusal is not None:
                results[index] = Refused(refusal)
                continue
            filed_under, issues, change = accepted.workspace, None, accepted
        delivery = _push_delivery(
            provider,
            bodies[index],
            hashes[index],
            keys[index],
            workspace=workspace,
            filed_under=filed_under,
            received_at=received_at,
        )
        pending.append(Pending(delivery, change=change, issues=issues))
        positions.append(index)
    applied = await store.ingest_many(pending, redact=provider.redactor) if pending else []
    for index, result in zip(positions, applied, strict=True):
        if isinstance(result, ValidationFailed):
            results[index] = Refused(result)  # refused by the database: nothing of it kept
        elif result is None:
            results[index] = Refused(cast(Refused, results[index]).error, kept=True)  # the rejection is committed
        else:
            results[index] = _outcome(provider, result)
    assert all(result is not None for result in results)
    return cast(list[LineOutcome], results)


async def parse_by_size(parse: Callable[[], T], size: int) -> T:
    """``parse()`` of a body of ``size`` bytes: inline, or in a worker thread past ``INLINE_PARSE_BYTES``."""
    if size > INLINE_PARSE_BYTES:
        # A big body takes long to validate and convert; off the event loop, other requests keep flowing.
        return await anyio.to_thread.run_sync(parse)
    return parse()
