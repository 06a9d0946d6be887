"""Re-deriving stored conversations from the ledger after a mapper fix: ``kbms reprocess``.

Every delivery is read again with today's mappers, and each affected conversation is rebuilt from all its
deliveries in received order (a fold, not a merge: equal versions would otherwise keep the old derivation).
A conversation is written only if the result differs, so a second run changes nothing. Deliveries rejected before
that validate now are picked up and counted; ones that fail now are marked rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

from kbms.deliveries import ConcurrentCreation, ConversationKey, LedgerEntry, Outcome, Reader, Reading, Rebuilt
from kbms.errors import FieldIssue, InvalidJson, ValidationFailed, describe
from kbms.lifecycle import ACCEPTED
from kbms.providers import REGISTRY, Provider
from kbms.providers.fields import reading_the_ledger
from kbms.storage.base import Store
from kbms.sync import pulled

BATCH = 500
ATTEMPTS = 3
MAX_VISITS = 3  # a conversation rebuilt again because deliveries moved into it; bounded, in case they cycle


@dataclass
class ReprocessReport:
    conversations: int = 0
    changed: int = 0
    deliveries_reclassified: int = 0


def reader(providers: Mapping[str, Provider]) -> Reader:
    """What today's providers make of a stored delivery."""

    def refused(field: str, issue: str, message: str) -> Reading:
        return Reading(None, describe([FieldIssue(field, issue, message)]))

    def read(entry: LedgerEntry) -> Reading:
        provider = providers.get(entry.provider)
        if provider is None:
            return refused("provider", "unknown_provider", f"No provider {entry.provider!r} is registered")
        # What the ledger holds as accepted is read as the kbms that accepted it read it (see
        # ``providers.fields.reading_the_ledger``); what it holds as rejected, as a new arrival would be.
        lenient = reading_the_ledger() if entry.outcome in ACCEPTED else nullcontext()
        try:
            with lenient:
                return _read(provider, entry)
        except ValidationFailed as exc:
            return Reading(None, describe(exc.issues))
        except InvalidJson as exc:
            return refused("body", "invalid_json", exc.message)

    def _read(provider: Provider, entry: LedgerEntry) -> Reading:
        if entry.kind == "pull" and entry.topic == pulled.DELETED:
            return Reading(pulled.read_deletion(entry.body))  # the provider said so when asked: kbms wrote the body
        if entry.kind in ("push", "pull"):
            # Decided as the push did: the workspace the caller named, else the payload's, else the one the
            # ledger filed it under (the default of the time). A pull's body is what parse_push reads, and names
            # its source's workspace.
            named = entry.named_workspace
            return Reading(provider.parse_push(entry.body, workspace=named, default_workspace=entry.workspace))
        if provider.webhooks is None:
            return refused("provider", "no_webhooks", f"{entry.provider} has no webhooks")
        return Reading(provider.webhooks.parse(entry.body, workspace=entry.named_workspace).change)

    return read


async def reprocess(
    store: Store,
    *,
    providers: Mapping[str, Provider] = REGISTRY,
    provider: str | None = None,
    since: int | None = None,
    conversation_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReprocessReport:
    """Re-derive the conversations in scope (all filters optional; ``since`` in microseconds)."""
    read = reader(providers)
    report = ReprocessReport()
    keys = await store.conversations_in_scope(provider=provider, since=since, conversation_id=conversation_id)
    wanted = set(keys) if conversation_id is not None else None
    extra: dict[ConversationKey, list[int]] = {}
    # Deliveries tied to no conversation (rejected, ignored) may belong to one now.
    after: tuple[int, int] | None = None
    while batch := await store.unlinked_deliveries(provider=provider, since=since, after=after, limit=BATCH):
        for entry in batch:
            reading = read(entry)
            if reading.change is not None:
                if wanted is None or ConversationKey.of(reading.change) in wanted:
                    extra.setdefault(ConversationKey.of(reading.change), []).append(entry.pk)
                continue
            outcome: Outcome = "rejected" if reading.error else "ignored"
            if wanted is None and (outcome, reading.error) != (entry.outcome, entry.error):
                await store.reclassify(entry.pk, outcome, reading.error)
                report.deliveries_reclassified += 1
        after = (batch[-1].received_at, batch[-1].pk)

    queue = list(dict.fromkeys([*keys, *extra]))
    visits: dict[ConversationKey, int] = {}
    while queue:
        key = queue.pop(0)
        visits[key] = visits.get(key, 0) + 1
        rebuilt = await _rebuild(store, key, extra.pop(key, []), read, providers)
        report.conversations += visits[key] == 1
        report.changed += rebuilt.changed
        report.deliveries_reclassified += rebuilt.deliveries_reclassified
        # Deliveries that now belong elsewhere join that conversation's fold, in this same run.
        for target, pks in rebuilt.moved.items():
            extra.setdefault(target, []).extend(pks)
            if target not in queue and visits.get(target, 0) < MAX_VISITS:
                queue.append(target)
        if progress is not None:
            progress(report.conversations, report.conversations + len(queue))
    return report


@dataclass(frozen=True)
class DeliveryReprocessed:
    """What reading one ledger delivery again did: its outcome now, and the reason when still rejected."""

    outcome: Outcome
    error: str | None
    conversation_changed: bool


async def reprocess_delivery(
    store: Store, pk: int, *, providers: Mapping[str, Provider] = REGISTRY
) -> DeliveryReprocessed | None:
    """Read one ledger delivery again with today's mappers (the console's "Reprocess" of one reject). A delivery
    that now reads as a change joins its conversation's rebuild from all its deliveries, exactly as in ``reprocess``;
    one that still fails is marked with today's reason. None: no such delivery."""
    entry = await store.ledger_entry(pk)
    if entry is None:
        return None
    read = reader(providers)
    reading = read(entry)
    if reading.change is None:
        outcome: Outcome = "rejected" if reading.error else "ignored"
        if entry.conversation_pk is None and (outcome, reading.error) != (entry.outcome, entry.error):
            await store.reclassify(entry.pk, outcome, reading.error)
        return DeliveryReprocessed(outcome, reading.error, conversation_changed=False)
    key = ConversationKey.of(reading.change)
    extra = [entry.pk] if entry.conversation_pk is None else []
    rebuilt = await _rebuild(store, key, extra, read, providers)
    after = await store.ledger_entry(pk)
    return DeliveryReprocessed(
        after.outcome if after is not None else entry.outcome,
        after.error if after is not None else None,
        conversation_changed=rebuilt.changed,
    )


async def _rebuild(
    store: Store, key: ConversationKey, extra: list[int], read: Reader, providers: Mapping[str, Provider]
) -> Rebuilt:
    source = providers.get(key.provider)
    redact = source.redactor if source is not None else None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await store.rebuild(key, extra, read, redact)
        except ConcurrentCreation:
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")
