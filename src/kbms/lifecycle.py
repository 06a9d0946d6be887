"""A conversation's lifecycle: what one delivery does to the conversation it names.

Pure rules, no database: ``apply`` decides whether a delivery is ignored, a repeat, or creates, updates or leaves
unchanged its conversation; it merges (``kbms.merge``), renders (``kbms.render``), lays tombstones and redacts.
Everything it reads or writes goes through a ``Transaction``: one write transaction as the lifecycle sees it,
implemented by storage (``kbms.storage.writes``), which runs ``apply`` inside the transaction it owns.

For one delivery:

1. *claim* the delivery in the ledger: a repeat whose conversation is stored is answered from it (a repeat whose
   conversation is not is applied, and its ledger row left as it was);
2. *create* the conversation if it does not exist: a new conversation is written as prepared before the write;
3. otherwise *lock and merge*: load the stored state, merge the snapshot (or delete, for a deletion) and write
   only what changed;
4. settle the delivery's outcome in the ledger.

Two deliveries racing to create one conversation meet at its unique key in step 2: the loser's create does
nothing (on PostgreSQL it waits for the winner to commit) and it merges instead.

``rebuild`` is the other way a conversation changes (``kbms reprocess``): it is folded again from all of its
deliveries, read with today's mappers, through a ``Rebuilding`` (storage's ``kbms.storage.rebuild``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from kbms.deliveries import Applied, ConversationKey, Delivery, LedgerEntry, Reader, Rebuilt
from kbms.merge import ConversationState, delete, merge, new_state, replay, tombstone
from kbms.model import (
    Change,
    Conversation,
    ConversationDeletion,
    ConversationSnapshot,
    Message,
    Redactor,
    conversation_id,
    micros,
)
from kbms.render import render


class Transaction(Protocol):
    """What the lifecycle needs of storage, within one write transaction. ``pk``: a conversation's storage key."""

    def claim(self, delivery: Delivery) -> int | None:
        """Record the delivery as pending (or take over its rejected row); its ledger key, None for a repeat."""
        ...

    def settle(self, claim: int, outcome: str, conversation_pk: int | None) -> None:
        """Record what became of a claimed delivery."""
        ...

    def stored_id(self, change: Change) -> str | None:
        """The id of the conversation ``change`` names, if it is stored."""
        ...

    def create(self, snapshot: ConversationSnapshot) -> tuple[int, ConversationState] | None:
        """Store the snapshot as a new conversation (rows, children, tags, search document); None if it exists."""
        ...

    def create_tombstone(self, grave: ConversationState) -> int | None:
        """Store a tombstone for a conversation never seen; None if it exists."""
        ...

    def lock(self, change: Change) -> tuple[int, ConversationState]:
        """The stored state of the conversation ``change`` names (it exists), locked until the commit."""
        ...

    def update(
        self,
        pk: int,
        state: ConversationState,
        detail: Conversation,
        *,
        participants: Iterable[str],
        messages: Iterable[str],
        events: Iterable[str],
    ) -> None:
        """Write a merged state: the children named, then the conversation row with its rendered detail."""
        ...

    def bury(self, pk: int, state: ConversationState) -> None:
        """Write a deleted state: the conversation's children go, its row becomes the tombstone."""
        ...

    def index(self, pk: int, detail: Conversation | None, *, fresh: bool) -> None:
        """Replace a conversation's tags and search document by those of ``detail`` (None: remove them)."""
        ...

    def record_change(self, state: ConversationState, action: str) -> None:
        """Add a row to the change feed, in this transaction."""
        ...

    def record_redaction(self, snapshot: ConversationSnapshot, message: Message) -> bool:
        """Remember a redacted message by its conversation's provider key; False if it was known."""
        ...

    def redactions(self, change: Change) -> dict[str, Message]:
        """Every redacted message recorded for the conversation ``change`` names, by message id."""
        ...

    def redactable_bodies(self, pk: int, change: Change) -> Iterator[tuple[int, bytes]]:
        """The payloads stored for a conversation, and the rejected ones of its workspace, by ledger key."""
        ...

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        """Replace a stored payload (by a redacted copy)."""
        ...


def created(snapshot: ConversationSnapshot) -> tuple[ConversationState, Conversation]:
    """The state and the rendered detail of the snapshot's conversation, if it is new."""
    state = new_state(conversation_id(snapshot.provider, snapshot.workspace, snapshot.external_id), snapshot)
    return state, render(state)


def apply(tx: Transaction, delivery: Delivery, change: Change | None, *, redact: Redactor | None = None) -> Applied:
    """Record one delivery and apply its change (``None``: the delivery is recorded as ignored)."""
    claim = tx.claim(delivery)
    if change is None:
        if claim is not None:
            tx.settle(claim, "ignored", None)
        return Applied("ignored", None, None, duplicate_delivery=claim is None)
    if claim is None:
        existing = tx.stored_id(change)
        if existing is not None:
            return Applied("unchanged", existing, change.external_id, duplicate_delivery=True)
    if isinstance(change, ConversationDeletion):
        applied, conversation_pk = _delete(tx, change, at=micros(delivery.received_at))
    else:
        applied, conversation_pk = _merge(tx, change)
        if redact is not None:
            new = applied.result == "created"
            _redact(tx, change, conversation_pk, new, claim, delivery.body, redact)
    if claim is not None:
        tx.settle(claim, applied.result, conversation_pk)
    return Applied(applied.result, applied.conversation_id, applied.external_id)


def _merge(tx: Transaction, snapshot: ConversationSnapshot) -> tuple[Applied, int]:
    new = tx.create(snapshot)
    if new is not None:
        pk, state = new
        tx.record_change(state, "created")
        return Applied("created", state.id, state.external_id), pk

    pk, stored = tx.lock(snapshot)
    result = merge(stored, snapshot)
    if not result.changed:
        return Applied("unchanged", stored.id, stored.external_id), pk
    merged = result.state
    detail = render(merged)
    tx.update(
        pk, merged, detail, participants=result.participants, messages=result.rewritten_messages, events=result.events
    )
    if stored.deleted_at is None:  # a tombstone stays out of the index (its merge changes nothing anyway)
        tx.index(pk, detail, fresh=False)
        tx.record_change(merged, "updated")
    return Applied("updated", merged.id, merged.external_id), pk


def _delete(tx: Transaction, deletion: ConversationDeletion, *, at: int) -> tuple[Applied, int]:
    conversation = conversation_id(deletion.provider, deletion.workspace, deletion.external_id)
    grave = tombstone(conversation, deletion.provider, deletion.workspace, deletion.external_id, at=at)
    created_pk = tx.create_tombstone(grave)
    if created_pk is not None:  # deleted before anything else arrived: the tombstone keeps it from ever appearing
        return Applied("created", conversation, deletion.external_id), created_pk
    pk, stored = tx.lock(deletion)
    deleted = delete(stored, at=at)
    if deleted is stored:
        return Applied("unchanged", stored.id, stored.external_id), pk
    tx.bury(pk, deleted)
    tx.index(pk, None, fresh=False)
    tx.record_change(deleted, "deleted")
    return Applied("updated", stored.id, stored.external_id), pk


def _redact(
    tx: Transaction,
    snapshot: ConversationSnapshot,
    conversation_pk: int,
    new: bool,
    claim: int | None,
    body: bytes,
    redact: Redactor,
) -> None:
    """Keep no raw copy of redacted text, whatever the order deliveries come in.

    Redacted messages are recorded by the conversation's provider key (a deletion does not purge them). A new one
    rewrites every payload stored for the conversation, and rejected payloads of its workspace; a delivery for a
    conversation that has redactions is rewritten before it is kept (it may be an older copy).
    """
    recorded = 0
    for message in snapshot.messages:
        if message.redacted:
            recorded += tx.record_redaction(snapshot, message)
    if new and not recorded:
        return  # a new conversation: no redaction can be waiting for it
    redacted = tx.redactions(snapshot)
    if not redacted:
        return
    external_id = snapshot.external_id
    if claim is not None and (clean := redact(body, external_id, redacted)) is not None:
        tx.rewrite_body(claim, clean)
    if recorded:
        for pk, stored in tx.redactable_bodies(conversation_pk, snapshot):
            if pk != claim and (clean := redact(stored, external_id, redacted)) is not None:
                tx.rewrite_body(pk, clean)


class Rebuilding(Protocol):
    """What re-deriving one conversation needs of storage, within one write transaction."""

    def lock(self, key: ConversationKey) -> tuple[int, ConversationState] | None:
        """The stored state of the conversation, locked until the commit; None if it is not stored."""
        ...

    def deliveries(self, pk: int | None, extra: list[int]) -> list[LedgerEntry]:
        """The deliveries linked to the conversation ``pk`` (None: none) and the ``extra`` ones, in received order."""
        ...

    def store(self, pk: int | None, state: ConversationState, detail: Conversation, *, was_live: bool) -> int:
        """Write a re-derived state whole (row, children, tags and search document): a new conversation when ``pk``
        is None (``ConcurrentCreation`` if a delivery created it meanwhile), else over the stored one."""
        ...

    def record_change(self, state: ConversationState, action: str) -> None:
        """Add a row to the change feed, in this transaction."""
        ...

    def reclassify(self, ledger_pk: int, outcome: str, error: str | None, conversation_pk: int | None) -> None:
        """Record a delivery's new standing."""
        ...

    def redactions(self, key: ConversationKey) -> dict[str, Message]:
        """Every redacted message recorded for the conversation, by message id."""
        ...

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        """Replace a stored payload (by a redacted copy)."""
        ...


# The outcomes of a delivery kbms accepted (an unchanged redelivery too); reprocess reads those leniently.
ACCEPTED = frozenset(("created", "updated", "unchanged"))


def rebuild(
    tx: Rebuilding, key: ConversationKey, extra: list[int], read: Reader, redact: Redactor | None, *, now: int
) -> Rebuilt:
    """Fold every delivery of one conversation, in received order, through today's mappers; store the result
    if it differs from what is stored, and correct each delivery's standing. Doing it twice changes nothing.

    Deliveries that now belong to another conversation are handed back (``Rebuilt.moved``); a conversation that no
    delivery produces any more becomes a tombstone.
    """
    found = tx.lock(key)
    stored_pk, stored = (None, None) if found is None else found
    entries = tx.deliveries(stored_pk, extra)

    readings = [(entry, read(entry)) for entry in entries]
    mine = [(e, r.change) for e, r in readings if r.change is not None and ConversationKey.of(r.change) == key]
    moved: dict[ConversationKey, list[int]] = {}
    for entry, reading in readings:
        if reading.change is not None and ConversationKey.of(reading.change) != key:
            moved.setdefault(ConversationKey.of(reading.change), []).append(entry.pk)
    cid = conversation_id(key.provider, key.workspace, key.external_id)
    state, results = replay(cid, ((c, e.received_at) for e, c in mine))
    if state is None and stored is not None:
        state = delete(stored, at=now)  # nothing produces it any more
    outcomes: dict[int, tuple[str, str | None, bool]] = {
        entry.pk: ("rejected" if reading.error else "ignored", reading.error, False)
        for entry, reading in readings
        if entry.pk not in {pk for pks in moved.values() for pk in pks}
    }
    outcomes.update({entry.pk: (outcome, None, True) for (entry, _), outcome in zip(mine, results, strict=True)})

    changed = False
    if state is not None and (stored is None or not state.same_content(stored)):
        changed = True
        revised = replace(state, revision=stored.revision + 1 if stored is not None else 1)
        was_live = stored is not None and stored.deleted_at is None
        stored_pk = tx.store(stored_pk, revised, render(revised), was_live=was_live)
        live = revised.deleted_at is None
        if live or was_live:
            action = ("updated" if was_live else "created") if live else "deleted"
            tx.record_change(revised, action)

    reclassified = 0
    newly_linked: list[LedgerEntry] = []
    for entry in entries:
        if entry.pk not in outcomes:
            continue  # moved: its new conversation's rebuild decides
        outcome, error, linked_here = outcomes[entry.pk]
        target = stored_pk if linked_here else None
        # Created, updated and unchanged depend on the order deliveries came in; only a change of standing counts.
        if entry.outcome in ACCEPTED and outcome in ACCEPTED and entry.conversation_pk == target:
            continue
        if (entry.outcome, entry.error, entry.conversation_pk) == (outcome, error, target):
            continue
        tx.reclassify(entry.pk, outcome, error, target)
        reclassified += 1
        if target is not None and entry.conversation_pk != target:
            newly_linked.append(entry)
    if newly_linked and redact is not None:
        redacted = tx.redactions(key)
        for entry in newly_linked if redacted else ():
            if (clean := redact(entry.body, key.external_id, redacted)) is not None:
                tx.rewrite_body(entry.pk, clean)
    return Rebuilt(changed=changed, deliveries_reclassified=reclassified, moved=moved)
