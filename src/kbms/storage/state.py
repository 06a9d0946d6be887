"""A conversation's merge state (``kbms.merge.ConversationState``) as stored.

Built from a snapshot before a write starts (``prepare``), loaded and row-locked inside one (``load_state``), and
its participant, message and event rows written (``write_children``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, Table

from kbms import lifecycle, search
from kbms.merge import ConversationState
from kbms.model import Conversation, ConversationSnapshot
from kbms.storage.feed import write
from kbms.storage.rows import (
    conversation_values,
    decode_registers,
    event_from_row,
    event_values,
    message_from_row,
    message_values,
    participant_from_row,
    participant_values,
)
from kbms.storage.schema import events, messages, participants
from kbms.storage.statements import CHILD_TABLES, Sql


@dataclass(frozen=True, slots=True)
class Creation:
    """A snapshot's conversation as it is stored if it is new, with every row already built.

    Built before the write starts (``prepare``): rendering the detail and building rows is most of a write's CPU
    time, and on SQLite everything inside a write holds the one write lock that every process waits for.
    """

    state: ConversationState
    row: dict[str, Any]  # the conversations row, but changed_at
    children: tuple[list[dict[str, Any]], ...]  # participants, messages, events rows, but conversation_pk
    index: Index


@dataclass(frozen=True, slots=True)
class Index:
    """What a live conversation adds to the list's tag filter and to full-text search."""

    tags: list[str]
    document: str

    @classmethod
    def of(cls, detail: Conversation) -> Index:
        return cls(list(dict.fromkeys(detail.tags)), search.document(detail))


def prepare(snapshot: ConversationSnapshot) -> Creation:
    state, detail = lifecycle.created(snapshot)
    row = conversation_values(state, changed_at=0, detail=detail)
    children = (
        [participant_values(0, p) for p in state.participants.values()],
        [message_values(0, m, state.message_versions[i]) for i, m in state.messages.items()],
        [event_values(0, e) for e in state.events.values()],
    )
    return Creation(state, row, children, Index.of(detail))


def write_children(
    sql: Sql,
    conn: Connection,
    pk: int,
    state: ConversationState,
    participant_ids: Iterable[str],
    message_ids: Iterable[str],
    event_ids: Iterable[str],
    *,
    fresh: bool,
) -> None:
    rows = (
        [participant_values(pk, state.participants[i]) for i in participant_ids],
        [message_values(pk, state.messages[i], state.message_versions[i]) for i in message_ids],
        [event_values(pk, state.events[i]) for i in event_ids],
    )
    for (table, _keys), values in zip(CHILD_TABLES, rows, strict=True):
        if values:
            _load, insert, upsert = sql.children[table]
            # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
            write(sql, conn, insert if fresh else upsert, values)


def load_state(sql: Sql, conn: Connection, key: dict[str, str]) -> tuple[int, ConversationState]:
    """The stored merge state of one conversation (which must exist), row-locked where the engine can."""
    row = conn.execute(sql.lock, key).mappings().one()
    pk = int(row["pk"])
    message_rows = list(_children(sql, conn, messages, pk))
    state = ConversationState(
        deleted_at=row["deleted_at"],
        id=row["id"],
        provider=row["provider"],
        workspace=row["workspace"],
        external_id=row["external_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
        header=decode_registers(row["header"]),
        participants={p.id: p for p in map(participant_from_row, _children(sql, conn, participants, pk))},
        messages={m.id: m for m in map(message_from_row, message_rows)},
        message_versions={row["message_id"]: row["version"] for row in message_rows},
        events={e.id: e for e in map(event_from_row, _children(sql, conn, events, pk))},
    )
    return pk, state


def _children(sql: Sql, conn: Connection, table: Table, pk: int) -> Iterable[RowMapping]:
    return conn.execute(sql.children[table][0], {"b_pk": pk}).mappings()
