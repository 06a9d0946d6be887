"""Merging what a payload says into what is stored: DESIGN.md's lifecycle rules as pure functions.

Every stored value is a *register* that remembers the version of the payload that set it, and merging keeps, for
each register, the greatest ``(version, value)``. That order is total and does not depend on arrival, so merging is
commutative, associative and idempotent: deliveries in any order, with any duplicates, end in the same state, and
re-applying a payload that was already applied changes nothing. Concretely:

- conversation fields (subject, state, tags, assignee, channel) follow the newest payload by the provider's
  ``updated_at``; an older payload can add parts but never rolls a field back; a payload that omits a field says
  nothing about it;
- messages and events are keyed by their provider id and never removed by a later payload; a message is replaced
  by a copy with a newer provider ``updated_at`` (an edit, a redaction), then by a redacted copy, then by the copy
  in the newer payload; so each stored message remembers the version of the payload its copy came from;
- participant role, name and email are registers of their own, so a payload that lacks an email never erases one;
- ties (same version, different value) go to the greater canonical JSON: arbitrary, but the same on every replica;
- a deletion is final: it empties the conversation, and no later delivery (a retry, or an older one arriving late)
  brings anything back. So deletions commute with everything else too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from kbms.model import (
    Change,
    ConversationDeletion,
    ConversationSnapshot,
    Event,
    Message,
    Participant,
    Role,
    micros,
)

HEADER_FIELDS = (
    "subject",
    "state",
    "tags",
    "assignee_participant_id",
    "channel",
    "opening_message_id",
    "provider_count",
    "truncated",
    "counted",
)


def _canonical(value: Any) -> tuple[int, str]:
    """A total order over register values: null < strings < anything else (by its canonical JSON)."""
    if value is None:
        return (0, "")
    if isinstance(value, str):
        return (1, value)
    return (2, json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


@dataclass(frozen=True, slots=True)
class Register:
    """A value and the version (payload ``updated_at``, in microseconds) of the payload that set it."""

    version: int
    value: Any


def pick(current: Register | None, incoming: Register | None) -> Register | None:
    """The winning register: the greater ``(version, canonical value)``; a missing one always loses."""
    if incoming is None:
        return current
    if current is None or incoming.version > current.version:
        return incoming
    if incoming.version < current.version or incoming.value == current.value:
        return current
    return incoming if _canonical(incoming.value) > _canonical(current.value) else current


@dataclass(frozen=True, slots=True)
class ParticipantState:
    id: str
    first_seen: int
    role: Register | None = None
    name: Register | None = None
    email: Register | None = None

    def participant(self) -> Participant:
        role: Role = self.role.value if self.role is not None else "system"
        return Participant(
            id=self.id,
            role=role,
            name=self.name.value if self.name is not None else None,
            email=self.email.value if self.email is not None else None,
        )


@dataclass(frozen=True, slots=True)
class ConversationState:
    """Everything stored about one conversation, with the versions merging needs."""

    id: str
    provider: str
    workspace: str
    external_id: str
    created_at: int
    updated_at: int
    revision: int
    header: dict[str, Register] = field(default_factory=dict)
    participants: dict[str, ParticipantState] = field(default_factory=dict)
    messages: dict[str, Message] = field(default_factory=dict)
    # The version of the payload each stored message copy came from, minus PARTIAL for a partial copy (message_key).
    message_versions: dict[str, int] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)
    # When the provider deleted it (server time, microseconds); a deleted conversation keeps no content.
    deleted_at: int | None = None

    def same_content(self, other: ConversationState) -> bool:
        """Equal in everything merging decides; ``revision`` only counts the changes that led here."""
        return replace(self, revision=0) == replace(other, revision=0)


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The merged state, which of its parts differ from the state merged into, and which rows to rewrite."""

    state: ConversationState
    header_changed: bool
    participants: frozenset[str]
    messages: frozenset[str]
    events: frozenset[str]
    # Messages whose stored copy changed, plus those whose content is the same but now comes from a newer payload.
    rewritten_messages: frozenset[str] = frozenset()

    @property
    def changed(self) -> bool:
        return self.header_changed or bool(self.participants or self.messages or self.events)


# A partial copy of a message (a webhook's plain text, without the HTML or attachments the provider's API returns)
# is stored with its payload's version minus this: every partial copy ranks below every complete one, whatever
# their times (versions are microseconds since 1970, far below 2**62).
PARTIAL = 2**62


def message_key(message: Message, version: int) -> tuple[bool, int, bool, int]:
    """A complete copy, then newer provider updated_at, then redacted, then the newer payload: the copy that wins."""
    return (version >= 0, micros(message.updated_at or message.sent_at), message.redacted, version)


def _merge_messages(
    state: ConversationState, incoming: Iterable[Message], version: int
) -> tuple[dict[str, Message], dict[str, int], set[str], set[str]]:
    messages, versions = dict(state.messages), dict(state.message_versions)
    changed: set[str] = set()
    rewritten: set[str] = set()
    for message in incoming:
        current = messages.get(message.id)
        if current is not None:
            ours, theirs = message_key(message, version), message_key(current, versions[message.id])
            if ours < theirs:
                continue
            # Same key, different copies (one payload version carrying two bodies): the greater JSON, arbitrary but
            # the same on every replica.
            if ours == theirs and (message == current or message.model_dump_json() < current.model_dump_json()):
                continue
        if message != current:
            changed.add(message.id)
        messages[message.id] = message
        versions[message.id] = version
        rewritten.add(message.id)
    return messages, versions, changed, rewritten


def _merge_events(stored: dict[str, Event], incoming: Iterable[Event]) -> tuple[dict[str, Event], set[str]]:
    def key(event: Event) -> tuple[int, str]:
        return (micros(event.occurred_at), event.model_dump_json())

    events = dict(stored)
    changed: set[str] = set()
    for event in incoming:
        current = events.get(event.id)
        # A strictly greater key is always a different value, so every replacement is a change.
        if current is None or key(event) > key(current):
            changed.add(event.id)
            events[event.id] = event
    return events, changed


def _merge_participant(
    current: ParticipantState | None,
    obs_id: str,
    role: Register | None,
    name: Register | None,
    email: Register | None,
    seen: int,
) -> ParticipantState:
    if current is None:
        return ParticipantState(id=obs_id, first_seen=seen, role=role, name=name, email=email)
    return ParticipantState(
        id=obs_id,
        first_seen=min(current.first_seen, seen),
        role=pick(current.role, role),
        name=pick(current.name, name),
        email=pick(current.email, email),
    )


def merge(state: ConversationState, snapshot: ConversationSnapshot) -> MergeResult:
    """Merge one payload's snapshot into a stored conversation; pure, and safe to repeat."""
    if state.deleted_at is not None:
        return MergeResult(state, False, frozenset(), frozenset(), frozenset())
    version = micros(snapshot.version)

    header = dict(state.header)
    observed = snapshot.header.model_fields_set
    for name in HEADER_FIELDS:
        if name in observed:
            value = getattr(snapshot.header, name)
            winner = pick(header.get(name), Register(version, list(value) if name == "tags" else value))
            assert winner is not None
            header[name] = winner
    created_at = min(state.created_at, micros(snapshot.created_at))
    updated_at = max(state.updated_at, version)
    header_changed = header != state.header or created_at != state.created_at or updated_at != state.updated_at

    participants = dict(state.participants)
    changed_participants: set[str] = set()
    for obs in snapshot.participants:
        merged = _merge_participant(
            participants.get(obs.id),
            obs.id,
            role=Register(version, obs.role) if obs.role is not None else None,
            name=Register(version, obs.name) if obs.name is not None else None,
            email=Register(version, obs.email) if obs.email is not None else None,
            seen=micros(obs.seen_at),
        )
        if merged != participants.get(obs.id):
            changed_participants.add(obs.id)
            participants[obs.id] = merged

    message_version = version - PARTIAL if snapshot.partial_messages else version
    messages, message_versions, changed_messages, rewritten = _merge_messages(state, snapshot.messages, message_version)
    events, changed_events = _merge_events(state.events, snapshot.events)

    merged_state = replace(
        state,
        created_at=created_at,
        updated_at=updated_at,
        header=header,
        participants=participants,
        messages=messages,
        message_versions=message_versions,
        events=events,
    )
    result = MergeResult(
        state=merged_state,
        header_changed=header_changed,
        participants=frozenset(changed_participants),
        messages=frozenset(changed_messages),
        events=frozenset(changed_events),
        rewritten_messages=frozenset(rewritten),
    )
    if result.changed:
        result = replace(result, state=replace(merged_state, revision=state.revision + 1))
    return result


def new_state(conversation_id: str, snapshot: ConversationSnapshot) -> ConversationState:
    """The state of a conversation seen for the first time (revision 1)."""
    empty = ConversationState(
        id=conversation_id,
        provider=snapshot.provider,
        workspace=snapshot.workspace,
        external_id=snapshot.external_id,
        created_at=micros(snapshot.created_at),
        updated_at=micros(snapshot.version),
        revision=0,
    )
    return replace(merge(empty, snapshot).state, revision=1)


def delete(state: ConversationState, *, at: int) -> ConversationState:
    """The tombstone of a conversation: no content, and final (``merge`` leaves it as it is).

    Every tombstone of one conversation looks the same whatever came before it: only the earliest deletion time
    is kept, so deletions commute with each other and with everything else.
    """
    if state.deleted_at is not None and state.deleted_at <= at:
        return state
    grave = tombstone(state.id, state.provider, state.workspace, state.external_id, at=at)
    return replace(grave, revision=state.revision + 1)


def tombstone(conversation_id: str, provider: str, workspace: str, external_id: str, *, at: int) -> ConversationState:
    """A conversation deleted at ``at`` (server time, microseconds): a key, a time, nothing else."""
    return ConversationState(
        id=conversation_id,
        provider=provider,
        workspace=workspace,
        external_id=external_id,
        created_at=at,
        updated_at=at,
        revision=1,
        deleted_at=at,
    )


def replay(conversation_id: str, changes: Iterable[tuple[Change, int]]) -> tuple[ConversationState | None, list[str]]:
    """Apply ``(change, received_at)`` pairs in order, exactly as live ingestion does; also each one's outcome
    (created, updated or unchanged). Re-deriving a conversation from its stored deliveries is this fold."""
    state: ConversationState | None = None
    outcomes: list[str] = []
    for change, received_at in changes:
        if isinstance(change, ConversationDeletion):
            if state is None:
                at = received_at
                state = tombstone(conversation_id, change.provider, change.workspace, change.external_id, at=at)
                outcomes.append("created")
            else:
                deleted = delete(state, at=received_at)
                outcomes.append("unchanged" if deleted is state else "updated")
                state = deleted
        elif state is None:
            state = new_state(conversation_id, change)
            outcomes.append("created")
        else:
            merged = merge(state, change)
            state = merged.state
            outcomes.append("updated" if merged.changed else "unchanged")
    return state, outcomes
