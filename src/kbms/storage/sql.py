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

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, RowMapping, Select, Table, and_, bindparam, or_, select, update

from kbms.errors import FieldIssue
from kbms.merge import ConversationState, conversation_id, from_micros, merge, micros, new_state
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
# What a delivery that was rejected before takes over when it is claimed again.
LEDGER_RECLAIMED = ("workspace", "topic", "received_at", "outcome", "error", "body")
SUMMARY_COLUMNS = (
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


class Sql:
    """Every statement kbms runs, built once per dialect and executed with parameters.

    Why prebuilt: building a statement per call (``insert(...).values(**row)``, ``.excluded``) made SQLAlchemy
    rebuild and re-hash it every time: 4.2 ms per delivery before any I/O (measured with cProfile). A prebuilt
    statement executed with parameters hits the compiled cache.
    """

    def __init__(self, insert: InsertFactory) -> None:
        c = conversations.c
        by_key = and_(
            c.provider == bindparam("k_provider"),
            c.workspace == bindparam("k_workspace"),
            c.external_id == bindparam("k_external_id"),
        )
        claim = insert(ledger)
        self.claim = claim.on_conflict_do_update(
            index_elements=["provider", "delivery_key"],
            set_={name: claim.excluded[name] for name in LEDGER_RECLAIMED},
            where=ledger.c.outcome == "rejected",
        ).returning(ledger.c.pk)
        # Updates executed with a parameter dict SET exactly the columns named in it.
        self.settle = update(ledger).where(ledger.c.pk == bindparam("b_pk"))
        self.save = update(conversations).where(c.pk == bindparam("b_pk"))
        self.conversation_id = select(c.id).where(by_key)
        # No conflict target: the id is derived from (provider, workspace, external_id), so two creators of one
        # conversation collide on both unique indexes, and either collision means "it exists: merge instead".
        self.create = insert(conversations).on_conflict_do_nothing().returning(c.pk)
        self.lock = select(conversations).where(by_key).with_for_update()
        self.children: dict[Table, tuple[Select[Any], Any, Any]] = {}
        for table, keys in CHILD_TABLES:
            upsert = insert(table)
            upsert = upsert.on_conflict_do_update(
                index_elements=list(keys),
                set_={col.name: upsert.excluded[col.name] for col in table.columns if col.name not in keys},
            )
            load = select(table).where(table.c.conversation_pk == bindparam("b_pk"))
            self.children[table] = (load, insert(table), upsert)
        self.find_delivery = (
            select(ledger.c.outcome, c.id, c.external_id)
            .select_from(ledger.outerjoin(conversations, c.pk == ledger.c.conversation_pk))
            .where(ledger.c.provider == bindparam("b_provider"), ledger.c.delivery_key == bindparam("b_key"))
        )
        self.detail = select(c.detail).where(c.id == bindparam("b_id"), c.deleted_at.is_(None))
        live = select(*SUMMARY_COLUMNS).where(c.deleted_at.is_(None)).order_by(c.updated_at.desc(), c.id.desc())
        self.first_page = live.limit(bindparam("b_limit"))
        self.next_page = live.where(
            or_(
                c.updated_at < bindparam("b_updated_at"),
                and_(c.updated_at == bindparam("b_updated_at"), c.id < bindparam("b_id")),
            )
        ).limit(bindparam("b_limit"))


def _key_params(snapshot: ConversationSnapshot) -> dict[str, str]:
    return {
        "k_provider": snapshot.provider,
        "k_workspace": snapshot.workspace,
        "k_external_id": snapshot.external_id,
    }


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
    row = conn.execute(sql.claim, _ledger_values(delivery, outcome=outcome, error=error)).first()
    return None if row is None else int(row[0])


def apply_delivery(
    sql: Sql, conn: Connection, delivery: Delivery, snapshot: ConversationSnapshot, *, now: int
) -> Applied:
    claim = _record(sql, conn, delivery, outcome="pending", error=None)
    key = _key_params(snapshot)
    if claim is None:
        existing = conn.execute(sql.conversation_id, key).first()
        if existing is not None:
            return Applied("unchanged", str(existing[0]), snapshot.external_id, duplicate_delivery=True)
    applied, conversation_pk = _store_snapshot(sql, conn, snapshot, key, now=now)
    if claim is not None:
        conn.execute(sql.settle, {"b_pk": claim, "outcome": applied.result, "conversation_pk": conversation_pk})
    return applied


def record_rejection(sql: Sql, conn: Connection, delivery: Delivery, issues: list[FieldIssue]) -> None:
    error = dumps([{"field": i.field, "issue": i.issue, "message": i.message} for i in issues])
    _record(sql, conn, delivery, outcome="rejected", error=error)


def _store_snapshot(
    sql: Sql, conn: Connection, snapshot: ConversationSnapshot, key: dict[str, str], *, now: int
) -> tuple[Applied, int]:
    conversation = conversation_id(snapshot.provider, snapshot.workspace, snapshot.external_id)
    state = new_state(conversation, snapshot)
    row = conn.execute(sql.create, conversation_values(state, changed_at=now)).first()
    if row is not None:
        pk = int(row[0])
        _write_children(sql, conn, pk, state, state.participants, state.messages, state.events, fresh=True)
        return Applied("created", state.id, state.external_id), pk

    pk, stored = load_state(sql, conn, key)
    result = merge(stored, snapshot)
    if not result.changed:
        return Applied("unchanged", stored.id, stored.external_id), pk
    merged = result.state
    _write_children(sql, conn, pk, merged, result.participants, result.rewritten_messages, result.events, fresh=False)
    conn.execute(sql.save, {**conversation_values(merged, changed_at=now), "b_pk": pk})
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
        [message_values(pk, state.messages[i], state.message_versions[i]) for i in message_ids],
        [event_values(pk, state.events[i]) for i in event_ids],
    )
    for (table, _keys), values in zip(CHILD_TABLES, rows, strict=True):
        if values:
            _load, insert, upsert = sql.children[table]
            # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
            conn.execute(insert if fresh else upsert, values)


def load_state(sql: Sql, conn: Connection, key: dict[str, str]) -> tuple[int, ConversationState]:
    """The stored merge state of one conversation (which must exist), row-locked where the engine can."""
    row = conn.execute(sql.lock, key).mappings().one()
    pk = int(row["pk"])
    message_rows = list(_children(sql, conn, messages, pk))
    state = ConversationState(
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


def find_delivery(sql: Sql, conn: Connection, provider: str, delivery_key: str) -> KnownDelivery | None:
    row = conn.execute(sql.find_delivery, {"b_provider": provider, "b_key": delivery_key}).first()
    if row is None:
        return None
    return KnownDelivery(outcome=row[0], conversation_id=row[1], external_id=row[2])


def get_detail_json(sql: Sql, conn: Connection, conversation_id: str) -> str | None:
    row = conn.execute(sql.detail, {"b_id": conversation_id}).first()
    return None if row is None else str(row[0])


def get_detail(sql: Sql, conn: Connection, conversation_id: str) -> Conversation | None:
    text = get_detail_json(sql, conn, conversation_id)
    return None if text is None else Conversation.model_validate_json(text)


def list_page(sql: Sql, conn: Connection, *, limit: int, cursor: Cursor | None) -> Page:
    if cursor is None:
        result = conn.execute(sql.first_page, {"b_limit": limit + 1})
    else:
        params = {"b_limit": limit + 1, "b_updated_at": cursor.updated_at, "b_id": cursor.conversation_id}
        result = conn.execute(sql.next_page, params)
    rows = result.mappings().all()
    items = [_summary(row) for row in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = Cursor(updated_at=last["updated_at"], conversation_id=last["id"]) if last is not None else None
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
