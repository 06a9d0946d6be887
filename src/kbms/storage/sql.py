"""The SQL that every engine runs, on an open connection inside a transaction the backend owns.

The write path for one delivery, in one transaction:

1. *claim* the ledger row ``(provider, delivery_key)``: an insert that does nothing on conflict (a redelivery),
   unless the earlier attempt was rejected, in which case it is claimed again;
2. *insert* the conversation with ``ON CONFLICT DO NOTHING``: a new conversation costs one insert per table;
3. otherwise *lock and merge*: load the stored state (``SELECT ... FOR UPDATE`` where the engine has it; SQLite
   has one writer at a time), merge in Python (``kbms.merge``) and write only what changed;
4. record the outcome on the ledger row.

Two deliveries racing to create one conversation meet at the unique key in step 2: the loser's insert does
nothing (on PostgreSQL it waits for the winner to commit) and it merges instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, Table, and_, or_, select, update
from sqlalchemy.sql.dml import Insert

from kbms.errors import FieldIssue
from kbms.merge import ConversationState, from_micros, merge, micros, new_state
from kbms.model import Conversation, ConversationSnapshot, ConversationSummary
from kbms.storage.base import Applied, Cursor, Delivery, KnownDelivery, Page
from kbms.storage.rows import (
    conversation_values,
    decode_registers,
    dumps,
    event_from_row,
    event_values,
    message_from_row,
    message_values,
    participant_from_row,
    participant_values,
)
from kbms.storage.schema import conversations, events, ledger, messages, participants

# sqlalchemy.dialects.sqlite.insert or sqlalchemy.dialects.postgresql.insert: same upsert API, two dialects.
InsertFactory = Callable[[Table], Any]

CHILD_TABLES: tuple[tuple[Table, tuple[str, ...]], ...] = (
    (participants, ("conversation_pk", "participant_id")),
    (messages, ("conversation_pk", "message_id")),
    (events, ("conversation_pk", "event_id")),
)
SUMMARY_COLUMNS = (
    conversations.c.pk,
    conversations.c.id,
    conversations.c.provider,
    conversations.c.external_id,
    conversations.c.workspace,
    conversations.c.created_at,
    conversations.c.updated_at,
    conversations.c.participant_count,
    conversations.c.message_count,
    conversations.c.last_message_at,
    conversations.c.last_message_preview,
    conversations.c.subject,
    conversations.c.state,
)


@dataclass(frozen=True, slots=True)
class Sql:
    """The statements of one dialect."""

    insert: InsertFactory

    def upsert(self, table: Table, keys: tuple[str, ...]) -> Insert:
        stmt = self.insert(table)
        return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
            index_elements=list(keys),
            set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys},
        )


def _key(snapshot: ConversationSnapshot) -> Any:
    return and_(
        conversations.c.provider == snapshot.provider,
        conversations.c.workspace == snapshot.workspace,
        conversations.c.external_id == snapshot.external_id,
    )


def _ledger_values(delivery: Delivery, *, outcome: str, error: str | None) -> dict[str, Any]:
    return {
        "provider": delivery.provider,
        "workspace": delivery.workspace,
        "kind": delivery.kind,
        "topic": delivery.topic,
        "delivery_key": delivery.delivery_key,
        "body_hash": delivery.body_hash,
        "received_at": micros(delivery.received_at),
        "outcome": outcome,
        "error": error,
        "conversation_pk": None,
        "body": delivery.body,
    }


def _record(sql: Sql, conn: Connection, delivery: Delivery, *, outcome: str, error: str | None) -> int | None:
    """Insert the ledger row, or take over a previously rejected one; None when the delivery is a repeat."""
    values = _ledger_values(delivery, outcome=outcome, error=error)
    stmt = sql.insert(ledger).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["provider", "delivery_key"],
        set_={name: stmt.excluded[name] for name in ("workspace", "topic", "received_at", "outcome", "error", "body")},
        where=ledger.c.outcome == "rejected",
    ).returning(ledger.c.pk)
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


def apply_delivery(
    sql: Sql, conn: Connection, delivery: Delivery, snapshot: ConversationSnapshot, *, now: int
) -> Applied:
    claim = _record(sql, conn, delivery, outcome="pending", error=None)
    if claim is None:
        existing = conn.execute(select(conversations.c.id).where(_key(snapshot))).first()
        if existing is not None:
            return Applied("unchanged", str(existing[0]), snapshot.external_id, duplicate_delivery=True)
    applied, conversation_pk = _store_snapshot(sql, conn, snapshot, now=now)
    if claim is not None:
        conn.execute(
            update(ledger).where(ledger.c.pk == claim).values(outcome=applied.result, conversation_pk=conversation_pk)
        )
    return applied


def record_rejection(sql: Sql, conn: Connection, delivery: Delivery, issues: list[FieldIssue]) -> None:
    error = dumps([{"field": i.field, "issue": i.issue, "message": i.message} for i in issues])
    _record(sql, conn, delivery, outcome="rejected", error=error)


def _store_snapshot(sql: Sql, conn: Connection, snapshot: ConversationSnapshot, *, now: int) -> tuple[Applied, int]:
    state = new_state(str(uuid.uuid4()), snapshot)
    stmt = (
        sql.insert(conversations)
        .values(**conversation_values(state, changed_at=now))
        .on_conflict_do_nothing(index_elements=["provider", "workspace", "external_id"])
        .returning(conversations.c.pk)
    )
    row = conn.execute(stmt).first()
    if row is not None:
        pk = int(row[0])
        _write_children(sql, conn, pk, state, state.participants, state.messages, state.events, fresh=True)
        return Applied("created", state.id, state.external_id), pk

    pk, stored = load_state(conn, _key(snapshot), for_update=True)
    result = merge(stored, snapshot)
    if not result.changed:
        return Applied("unchanged", stored.id, stored.external_id), pk
    merged = result.state
    _write_children(sql, conn, pk, merged, result.participants, result.messages, result.events, fresh=False)
    conn.execute(
        update(conversations).where(conversations.c.pk == pk).values(**conversation_values(merged, changed_at=now))
    )
    return Applied("updated", merged.id, merged.external_id), pk


def _write_children(
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
        [message_values(pk, state.messages[i]) for i in message_ids],
        [event_values(pk, state.events[i]) for i in event_ids],
    )
    for (table, keys), values in zip(CHILD_TABLES, rows, strict=True):
        if values:
            # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
            conn.execute(sql.insert(table) if fresh else sql.upsert(table, keys), values)


def load_state(conn: Connection, where: Any, *, for_update: bool) -> tuple[int, ConversationState]:
    """The stored merge state of one conversation (which must exist), optionally row-locked."""
    query = select(conversations).where(where)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).mappings().one()
    pk = int(row["pk"])
    state = ConversationState(
        id=row["id"],
        provider=row["provider"],
        workspace=row["workspace"],
        external_id=row["external_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
        header=decode_registers(row["header"]),
        participants={p.id: p for p in map(participant_from_row, _children(conn, participants, pk))},
        messages={m.id: m for m in map(message_from_row, _children(conn, messages, pk))},
        events={e.id: e for e in map(event_from_row, _children(conn, events, pk))},
    )
    return pk, state


def _children(conn: Connection, table: Table, pk: int) -> Iterable[RowMapping]:
    return conn.execute(select(table).where(table.c.conversation_pk == pk)).mappings()


def find_delivery(conn: Connection, provider: str, delivery_key: str) -> KnownDelivery | None:
    row = conn.execute(
        select(ledger.c.outcome, conversations.c.id, conversations.c.external_id)
        .select_from(ledger.outerjoin(conversations, conversations.c.pk == ledger.c.conversation_pk))
        .where(ledger.c.provider == provider, ledger.c.delivery_key == delivery_key)
    ).first()
    if row is None:
        return None
    return KnownDelivery(outcome=row[0], conversation_id=row[1], external_id=row[2])


def get_detail_json(conn: Connection, conversation_id: str) -> str | None:
    row = conn.execute(
        select(conversations.c.detail).where(
            conversations.c.id == conversation_id, conversations.c.deleted_at.is_(None)
        )
    ).first()
    return None if row is None else str(row[0])


def get_detail(conn: Connection, conversation_id: str) -> Conversation | None:
    text = get_detail_json(conn, conversation_id)
    return None if text is None else Conversation.model_validate_json(text)


def list_page(conn: Connection, *, limit: int, cursor: Cursor | None) -> Page:
    c = conversations.c
    query = select(*SUMMARY_COLUMNS).where(c.deleted_at.is_(None))
    if cursor is not None:
        query = query.where(
            or_(c.updated_at < cursor.updated_at, and_(c.updated_at == cursor.updated_at, c.pk < cursor.pk))
        )
    rows = conn.execute(query.order_by(c.updated_at.desc(), c.pk.desc()).limit(limit + 1)).mappings().all()
    items = [_summary(row) for row in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = Cursor(updated_at=last["updated_at"], pk=last["pk"]) if last is not None else None
    return Page(items=items, next_cursor=next_cursor)


def _summary(row: RowMapping) -> ConversationSummary:
    last_at = row["last_message_at"]
    return ConversationSummary(
        id=row["id"],
        provider=row["provider"],
        external_id=row["external_id"],
        workspace=row["workspace"],
        created_at=from_micros(row["created_at"]),
        updated_at=from_micros(row["updated_at"]),
        participant_count=row["participant_count"],
        message_count=row["message_count"],
        last_message_at=from_micros(last_at) if last_at is not None else None,
        last_message_preview=row["last_message_preview"],
        subject=row["subject"],
        state=row["state"],
    )
