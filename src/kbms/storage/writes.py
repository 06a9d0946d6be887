"""The write path: one delivery recorded in the ledger and applied to its conversation, on an open connection
inside a transaction the backend owns.

For one delivery, in one transaction:

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

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection

from kbms.errors import FieldIssue, describe
from kbms.merge import conversation_id, delete, merge, micros, render, tombstone
from kbms.model import Change, ConversationDeletion, ConversationSnapshot, Message
from kbms.storage.base import Applied, Delivery, Redactor
from kbms.storage.feed import record_change, write_index
from kbms.storage.rows import conversation_values
from kbms.storage.state import Creation, Index, load_state, prepare, write_children
from kbms.storage.statements import CHILD_TABLES, Sql


def _key_params(change: Change) -> dict[str, str]:
    return {
        "k_provider": change.provider,
        "k_workspace": change.workspace,
        "k_external_id": change.external_id,
    }


def _ledger_values(delivery: Delivery, *, outcome: str, error: str | None) -> dict[str, Any]:
    return {
        "provider": delivery.provider,
        "workspace": delivery.workspace,
        "named_workspace": delivery.named_workspace,
        "kind": delivery.kind,
        "verified": delivery.verified,
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
    row = sql.run(conn, sql.claim, _ledger_values(delivery, outcome=outcome, error=error)).fetchone()
    return None if row is None else int(row[0])


def apply_delivery(
    sql: Sql,
    conn: Connection,
    delivery: Delivery,
    change: Change | None,
    *,
    now: int,
    redact: Redactor | None = None,
    creation: Creation | None = None,
) -> Applied:
    """Record one delivery and apply its change. ``creation``: ``prepare(change)``, if the caller built it."""
    claim = _record(sql, conn, delivery, outcome="pending", error=None)
    if change is None:
        if claim is not None:
            sql.run(conn, sql.settle, {"outcome": "ignored", "conversation_pk": None, "b_pk": claim})
        return Applied("ignored", None, None, duplicate_delivery=claim is None)
    key = _key_params(change)
    if claim is None:
        existing = sql.run(conn, sql.conversation_id, key).fetchone()
        if existing is not None:
            return Applied("unchanged", str(existing[0]), change.external_id, duplicate_delivery=True)
    if isinstance(change, ConversationDeletion):
        applied, conversation_pk = _store_deletion(sql, conn, change, key, at=micros(delivery.received_at), now=now)
    else:
        applied, conversation_pk = _store_snapshot(sql, conn, change, key, now=now, creation=creation)
        if redact is not None:
            created = applied.result == "created"
            _apply_redactions(sql, conn, change, key, conversation_pk, created, claim, delivery.body, redact)
    if claim is not None:
        sql.run(conn, sql.settle, {"outcome": applied.result, "conversation_pk": conversation_pk, "b_pk": claim})
    return Applied(applied.result, applied.conversation_id, applied.external_id)


def record_rejection(sql: Sql, conn: Connection, delivery: Delivery, issues: list[FieldIssue]) -> None:
    _record(sql, conn, delivery, outcome="rejected", error=describe(issues))


def _store_snapshot(
    sql: Sql,
    conn: Connection,
    snapshot: ConversationSnapshot,
    key: dict[str, str],
    *,
    now: int,
    creation: Creation | None,
) -> tuple[Applied, int]:
    new = creation or prepare(snapshot)
    row = sql.run(conn, sql.create, {**new.row, "changed_at": now}).fetchone()
    if row is not None:
        pk = int(row[0])
        for (table, _keys), rows in zip(CHILD_TABLES, new.children, strict=True):
            if rows:
                for child in rows:
                    child["conversation_pk"] = pk  # the rows are this write's own (a retry sets them again)
                # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
                sql.run_many(conn, sql.children[table][1], rows)
        write_index(sql, conn, pk, new.index, fresh=True)
        record_change(conn, new.state, "created", now)
        return Applied("created", new.state.id, new.state.external_id), pk

    pk, stored = load_state(sql, conn, key)
    result = merge(stored, snapshot)
    if not result.changed:
        return Applied("unchanged", stored.id, stored.external_id), pk
    merged = result.state
    write_children(sql, conn, pk, merged, result.participants, result.rewritten_messages, result.events, fresh=False)
    detail = render(merged)
    sql.run(conn, sql.save, {**conversation_values(merged, changed_at=now, detail=detail), "b_pk": pk})
    if stored.deleted_at is None:  # a tombstone stays out of the index (its merge changes nothing anyway)
        write_index(sql, conn, pk, Index.of(detail), fresh=False)
        record_change(conn, merged, "updated", now)
    return Applied("updated", merged.id, merged.external_id), pk


def _store_deletion(
    sql: Sql, conn: Connection, deletion: ConversationDeletion, key: dict[str, str], *, at: int, now: int
) -> tuple[Applied, int]:
    conversation = conversation_id(deletion.provider, deletion.workspace, deletion.external_id)
    grave = tombstone(conversation, deletion.provider, deletion.workspace, deletion.external_id, at=at)
    row = conn.execute(sql.create, conversation_values(grave, changed_at=now)).first()
    if row is not None:  # deleted before anything else arrived: the tombstone keeps it from ever appearing
        return Applied("created", conversation, deletion.external_id), int(row[0])
    pk, stored = load_state(sql, conn, key)
    deleted = delete(stored, at=at)
    if deleted is stored:
        return Applied("unchanged", stored.id, stored.external_id), pk
    for load, _insert, _upsert in sql.children.values():
        conn.execute(sql.purge[load], {"b_pk": pk})
    conn.execute(sql.save, {**conversation_values(deleted, changed_at=now), "b_pk": pk})
    write_index(sql, conn, pk, None, fresh=False)
    record_change(conn, deleted, "deleted", now)
    return Applied("updated", stored.id, stored.external_id), pk


def _apply_redactions(
    sql: Sql,
    conn: Connection,
    snapshot: ConversationSnapshot,
    key: dict[str, str],
    conversation_pk: int,
    created: bool,
    claim: int | None,
    body: bytes,
    redact: Redactor,
) -> None:
    """Keep no raw copy of redacted text, whatever the order deliveries come in.

    Redacted messages are recorded by the conversation's provider key (a deletion does not purge them). A new one
    rewrites every payload stored for the conversation, and rejected payloads of its workspace; a delivery for a
    conversation that has redactions is rewritten before it is kept (it may be an older copy).
    """
    incoming = [m for m in snapshot.messages if m.redacted]
    recorded = 0
    for message in incoming:
        row = {
            "provider": snapshot.provider,
            "workspace": snapshot.workspace,
            "external_id": snapshot.external_id,
            "message_id": message.id,
            "message": message.model_dump_json(),
        }
        recorded += sql.run(conn, sql.record_redaction, row).rowcount
    if created and not recorded:
        return  # a new conversation: no redaction can be waiting for it
    redacted = {
        message_id: Message.model_validate_json(text)
        for message_id, text in sql.run(conn, sql.redactions_of, key).fetchall()
    }
    if not redacted:
        return
    external_id = snapshot.external_id
    if claim is not None and (clean := redact(body, external_id, redacted)) is not None:
        sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": claim})
    if recorded:
        params = {"b_pk": conversation_pk, "b_provider": snapshot.provider, "b_workspace": snapshot.workspace}
        for pk, stored in _stream(sql.run(conn, sql.redactable_bodies, params)):
            if pk != claim and (clean := redact(stored, external_id, redacted)) is not None:
                sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": pk})


def _stream(cursor: Any, size: int = 50) -> Iterator[tuple[int, bytes]]:
    """Rows a few at a time: a conversation's payloads can add up to far more than memory should hold."""
    while rows := cursor.fetchmany(size):
        for pk, body in rows:
            yield pk, bytes(body)
