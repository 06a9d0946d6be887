"""The lifecycle's decisions, with no database: small in-memory ``Transaction`` and ``Rebuilding`` stand in for
storage.

The same rules run on both engines through ``kbms.storage.writes.WriteTransaction`` (the store contract suite);
here they are checked on their own, which is what keeping them free of storage is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import cast

from kbms import lifecycle
from kbms.deliveries import ConversationKey, Delivery, LedgerEntry, Outcome, Reading
from kbms.merge import ConversationState
from kbms.model import (
    Change,
    Conversation,
    ConversationDeletion,
    ConversationHeader,
    ConversationSnapshot,
    Message,
    ParticipantObservation,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass
class Row:
    """A ledger row, as much of it as the lifecycle touches."""

    key: str
    outcome: str
    conversation_pk: int | None
    body: bytes


class Memory:
    """Everything storage keeps, in dictionaries; one instance plays every transaction in turn."""

    def __init__(self) -> None:
        self.ledger: dict[int, Row] = {}
        self.conversations: dict[tuple[str, str, str], tuple[int, ConversationState]] = {}
        self.index_of: dict[int, Conversation] = {}
        self.feed: list[tuple[str, str, int]] = []  # (conversation id, action, revision)
        self.redacted: dict[tuple[str, str, str], dict[str, Message]] = {}

    def claim(self, delivery: Delivery) -> int | None:
        if any(row.key == delivery.delivery_key for row in self.ledger.values()):
            return None
        pk = len(self.ledger) + 1
        self.ledger[pk] = Row(delivery.delivery_key, "pending", None, delivery.body)
        return pk

    def settle(self, claim: int, outcome: str, conversation_pk: int | None) -> None:
        self.ledger[claim].outcome = outcome
        self.ledger[claim].conversation_pk = conversation_pk

    def stored_id(self, change: Change) -> str | None:
        found = self.conversations.get(_key(change))
        return None if found is None else found[1].id

    def create(self, snapshot: ConversationSnapshot) -> tuple[int, ConversationState] | None:
        if _key(snapshot) in self.conversations:
            return None
        state, detail = lifecycle.created(snapshot)
        pk = self._insert(state)
        self.index_of[pk] = detail
        return pk, state

    def create_tombstone(self, grave: ConversationState) -> int | None:
        return None if _key(grave) in self.conversations else self._insert(grave)

    def _insert(self, state: ConversationState) -> int:
        pk = len(self.conversations) + 1
        self.conversations[_key(state)] = (pk, state)
        return pk

    def lock(self, change: Change) -> tuple[int, ConversationState]:
        return self.conversations[_key(change)]

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
        self.conversations[_key(state)] = (pk, state)

    def bury(self, pk: int, state: ConversationState) -> None:
        self.conversations[_key(state)] = (pk, state)

    def index(self, pk: int, detail: Conversation | None, *, fresh: bool) -> None:
        assert fresh is (pk not in self.index_of)
        if detail is None:
            del self.index_of[pk]
        else:
            self.index_of[pk] = detail

    def record_change(self, state: ConversationState, action: str) -> None:
        self.feed.append((state.id, action, state.revision))

    def record_redaction(self, snapshot: ConversationSnapshot, message: Message) -> bool:
        known = self.redacted.setdefault(_key(snapshot), {})
        return known.setdefault(message.id, message) is message

    def redactions(self, change: Change) -> dict[str, Message]:
        return dict(self.redacted.get(_key(change), {}))

    def redactable_bodies(self, pk: int, change: Change) -> Iterator[tuple[int, bytes]]:
        return iter([(key, row.body) for key, row in self.ledger.items() if row.conversation_pk == pk])

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        self.ledger[ledger_pk].body = body


def _key(change: Change | ConversationState) -> tuple[str, str, str]:
    return (change.provider, change.workspace, change.external_id)


def delivery(key: str, body: bytes = b"{}", *, seconds: int = 0) -> Delivery:
    received = T0 + timedelta(seconds=seconds)
    return Delivery("intercom", "w", "push", None, key, key, body, received)


def snapshot(
    *contents: str, version: int = 0, redacted: frozenset[str] = frozenset(), external_id: str = "c1"
) -> ConversationSnapshot:
    return ConversationSnapshot(
        provider="intercom",
        workspace="w",
        external_id=external_id,
        created_at=T0,
        version=T0 + timedelta(seconds=version),
        header=ConversationHeader(subject="Billing"),
        participants=(ParticipantObservation(id="u1", role="customer", seen_at=T0),),
        messages=tuple(
            Message(
                id=str(i),
                author_participant_id="u1",
                sent_at=T0 + timedelta(seconds=i),
                content="[redacted]" if str(i) in redacted else content,
                redacted=str(i) in redacted,
                updated_at=T0 + timedelta(seconds=version),
            )
            for i, content in enumerate(contents)
        ),
    )


def test_a_conversation_is_created_then_updated_and_repeats_change_nothing() -> None:
    memory = Memory()
    first = lifecycle.apply(memory, delivery("d1"), snapshot("hello"))
    assert (first.result, first.duplicate_delivery) == ("created", False)
    again = lifecycle.apply(memory, delivery("d1"), snapshot("hello"))
    assert (again.result, again.conversation_id, again.duplicate_delivery) == ("unchanged", first.conversation_id, True)
    more = lifecycle.apply(memory, delivery("d2", seconds=1), snapshot("hello", "thanks", version=1))
    same = lifecycle.apply(memory, delivery("d3", seconds=2), snapshot("hello", "thanks", version=1))
    assert (more.result, same.result) == ("updated", "unchanged")
    assert [(action, revision) for _id, action, revision in memory.feed] == [("created", 1), ("updated", 2)]
    assert [row.outcome for row in memory.ledger.values()] == ["created", "updated", "unchanged"]
    (detail,) = memory.index_of.values()
    assert [m.content for m in detail.messages] == ["hello", "thanks"]


def test_a_delivery_without_a_change_is_recorded_as_ignored() -> None:
    memory = Memory()
    applied = lifecycle.apply(memory, delivery("d1"), None)
    assert (applied.result, applied.conversation_id) == ("ignored", None)
    assert (memory.ledger[1].outcome, memory.ledger[1].conversation_pk) == ("ignored", None)
    assert lifecycle.apply(memory, delivery("d1"), None).duplicate_delivery


def test_a_deletion_buries_the_conversation_and_a_later_snapshot_does_not_revive_it() -> None:
    memory = Memory()
    lifecycle.apply(memory, delivery("d1"), snapshot("hello"))
    deletion = ConversationDeletion(provider="intercom", workspace="w", external_id="c1")
    gone = lifecycle.apply(memory, delivery("d2", seconds=5), deletion)
    late = lifecycle.apply(memory, delivery("d3", seconds=6), snapshot("hello", "late", version=9))
    twice = lifecycle.apply(memory, delivery("d4", seconds=7), deletion)
    assert (gone.result, late.result, twice.result) == ("updated", "unchanged", "unchanged")
    assert [action for _id, action, _revision in memory.feed] == ["created", "deleted"]
    assert memory.index_of == {}


def test_a_deletion_of_a_conversation_never_seen_is_a_tombstone_from_the_start() -> None:
    memory = Memory()
    deletion = ConversationDeletion(provider="intercom", workspace="w", external_id="c1")
    assert lifecycle.apply(memory, delivery("d1"), deletion).result == "created"
    assert lifecycle.apply(memory, delivery("d2", seconds=1), snapshot("hello")).result == "unchanged"
    assert memory.feed == []
    assert memory.index_of == {}


def redact(body: bytes, external_id: str, redacted: Mapping[str, Message]) -> bytes | None:
    """A provider's redactor, reduced to its contract: the text of each redacted message leaves the body."""
    assert external_id == "c1"
    return body.replace(b"secret", b"[redacted]") if b"secret" in body else None


def test_a_redaction_rewrites_the_payloads_kept_before_and_after_it() -> None:
    memory = Memory()
    lifecycle.apply(memory, delivery("d1", b'{"text": "secret"}'), snapshot("secret"), redact=redact)
    lifecycle.apply(
        memory, delivery("d2", seconds=1), snapshot("secret", version=1, redacted=frozenset("0")), redact=redact
    )
    late_copy = lifecycle.apply(
        memory, delivery("d3", b'{"text": "secret"}', seconds=2), snapshot("secret"), redact=redact
    )
    assert late_copy.result == "unchanged"
    assert [row.body for row in memory.ledger.values()] == [b'{"text": "[redacted]"}', b"{}", b'{"text": "[redacted]"}']
    (detail,) = memory.index_of.values()
    assert [(m.content, m.redacted) for m in detail.messages] == [("[redacted]", True)]


class Refold:
    """A ledger (every delivery rejected by an older mapper) and at most one stored conversation, in memory."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.entries = {
            pk: LedgerEntry(pk, "intercom", "push", "w", None, body, pk, "rejected", "an old mapper", None, None)
            for pk, body in enumerate(bodies, start=1)
        }
        self.stored: tuple[int, ConversationState] | None = None
        self.feed: list[str] = []

    def lock(self, key: ConversationKey) -> tuple[int, ConversationState] | None:
        return self.stored

    def deliveries(self, pk: int | None, extra: list[int]) -> list[LedgerEntry]:
        linked = [e for e in self.entries.values() if pk is not None and e.conversation_pk == pk]
        return sorted({e.pk: e for e in linked + [self.entries[i] for i in extra]}.values(), key=lambda e: e.pk)

    def store(self, pk: int | None, state: ConversationState, detail: Conversation, *, was_live: bool) -> int:
        self.stored = (pk or 7, state)
        return self.stored[0]

    def record_change(self, state: ConversationState, action: str) -> None:
        self.feed.append(action)

    def reclassify(self, ledger_pk: int, outcome: str, error: str | None, conversation_pk: int | None) -> None:
        entry = self.entries[ledger_pk]
        standing = cast("Outcome", outcome)
        self.entries[ledger_pk] = replace(entry, outcome=standing, error=error, conversation_pk=conversation_pk)

    def redactions(self, key: ConversationKey) -> dict[str, Message]:
        return {}

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        raise AssertionError("no redaction here")


def reader(today: dict[bytes, Change | str | None]) -> Callable[[LedgerEntry], Reading]:
    """Today's mappers, as a table: a body reads as a change, nothing, or an error message."""

    def read(entry: LedgerEntry) -> Reading:
        found = today[entry.body]
        return Reading(None, found) if isinstance(found, str) else Reading(found)

    return read


def test_a_rebuild_folds_the_deliveries_once_and_a_second_run_changes_nothing() -> None:
    memory = Refold([b"first", b"second", b"noise"])
    read = reader({b"first": snapshot("hello"), b"second": snapshot("hello", "more", version=1), b"noise": None})
    key = ConversationKey("intercom", "w", "c1")
    first = lifecycle.rebuild(memory, key, [1, 2, 3], read, None, now=0)
    assert (first.changed, first.deliveries_reclassified, first.moved) == (True, 3, {})
    assert [(e.outcome, e.conversation_pk) for e in memory.entries.values()] == [
        ("created", 7),
        ("updated", 7),
        ("ignored", None),
    ]
    again = lifecycle.rebuild(memory, key, [], read, None, now=1)
    assert (again.changed, again.deliveries_reclassified) == (False, 0)
    assert memory.feed == ["created"]


def test_a_rebuild_hands_back_deliveries_that_moved_and_buries_what_nothing_produces() -> None:
    memory = Refold([b"first", b"second"])
    key = ConversationKey("intercom", "w", "c1")
    lifecycle.rebuild(memory, key, [1, 2], reader({b"first": snapshot("hi"), b"second": snapshot("hi")}), None, now=0)
    today = reader({b"first": "no longer valid", b"second": snapshot("hi", external_id="c2")})
    rebuilt = lifecycle.rebuild(memory, key, [], today, None, now=5)
    assert rebuilt.moved == {ConversationKey("intercom", "w", "c2"): [2]}
    assert (memory.entries[1].outcome, memory.entries[1].error) == ("rejected", "no longer valid")
    assert memory.entries[2].conversation_pk == 7  # still linked here: the rebuild of c2 takes it
    assert memory.stored is not None
    assert memory.stored[1].deleted_at == 5
    assert memory.feed == ["created", "deleted"]
