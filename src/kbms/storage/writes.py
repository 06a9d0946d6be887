"""The write path's storage side: the lifecycle's ``Transaction`` over SQL, and the ledger rows of deliveries.

``kbms.lifecycle`` decides what one delivery does to its conversation; ``WriteTransaction`` carries out its steps
on an open connection inside a transaction the backend owns: claim the ledger row ``(provider, delivery_key)`` (an
insert that does nothing on conflict, unless the earlier attempt was rejected, in which case it is claimed again),
insert a new conversation with ``ON CONFLICT DO NOTHING`` (one insert per table), or lock the stored one
(``SELECT ... FOR UPDATE`` where the engine has it; SQLite has one writer at a time) and write what changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection

from kbms import lifecycle
from kbms.deliveries import Applied, Delivery
from kbms.errors import FieldIssue, describe
from kbms.merge import ConversationState
from kbms.model import Change, Conversation, ConversationSnapshot, Message, Redactor, micros
from kbms.storage.feed import record_change, settle_later, settled_ledger, together, write, write_index
from kbms.storage.rows import conversation_values
from kbms.storage.state import Creation, Index, load_state, prepare, write_children
from kbms.storage.statements import CHILD_TABLES, Sql, key_params


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
    return lifecycle.apply(WriteTransaction(sql, conn, now=now, creation=creation), delivery, change, redact=redact)


def record_rejection(sql: Sql, conn: Connection, delivery: Delivery, issues: list[FieldIssue]) -> None:
    _record(sql, conn, delivery, outcome="rejected", error=describe(issues))


class WriteTransaction:
    """``kbms.lifecycle.Transaction`` on an open connection, for one delivery; ``now``: its changes' time."""

    __slots__ = ("_conn", "_creation", "_now", "_sql")

    def __init__(self, sql: Sql, conn: Connection, *, now: int, creation: Creation | None) -> None:
        self._sql = sql
        self._conn = conn
        self._now = now
        self._creation = creation

    def claim(self, delivery: Delivery) -> int | None:
        return _record(self._sql, self._conn, delivery, outcome="pending", error=None)

    def settle(self, claim: int, outcome: str, conversation_pk: int | None) -> None:
        settle_later(self._conn, claim, outcome, conversation_pk)

    def stored_id(self, change: Change) -> str | None:
        existing = self._sql.run(self._conn, self._sql.conversation_id, key_params(change)).fetchone()
        return None if existing is None else str(existing[0])

    def create(self, snapshot: ConversationSnapshot) -> tuple[int, ConversationState] | None:
        sql, conn = self._sql, self._conn
        new = self._creation or prepare(snapshot)
        row = sql.run(conn, sql.create, {**new.row, "changed_at": self._now}).fetchone()
        if row is None:
            return None
        pk = int(row[0])
        with together(sql, conn):  # nothing here is read back: one round trip
            for (table, _keys), rows in zip(CHILD_TABLES, new.children, strict=True):
                if rows:
                    for child in rows:
                        child["conversation_pk"] = pk  # the rows are this write's own (a retry sets them again)
                    # A fresh conversation has no children yet: a plain insert is enough (and cheaper).
                    write(sql, conn, sql.children[table][1], rows)
            write_index(sql, conn, pk, new.index, fresh=True)
        return pk, new.state

    def create_tombstone(self, grave: ConversationState) -> int | None:
        row = self._conn.execute(self._sql.create, conversation_values(grave, changed_at=self._now)).first()
        return None if row is None else int(row[0])

    def lock(self, change: Change) -> tuple[int, ConversationState]:
        return load_state(self._sql, self._conn, key_params(change))

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
        sql, conn = self._sql, self._conn
        write_children(sql, conn, pk, state, participants, messages, events, fresh=False)
        write(sql, conn, sql.save, {**conversation_values(state, changed_at=self._now, detail=detail), "b_pk": pk})

    def bury(self, pk: int, state: ConversationState) -> None:
        sql, conn = self._sql, self._conn
        for load, _insert, _upsert in sql.children.values():
            conn.execute(sql.purge[load], {"b_pk": pk})
        conn.execute(sql.save, {**conversation_values(state, changed_at=self._now), "b_pk": pk})

    def index(self, pk: int, detail: Conversation | None, *, fresh: bool) -> None:
        write_index(self._sql, self._conn, pk, None if detail is None else Index.of(detail), fresh=fresh)

    def record_change(self, state: ConversationState, action: str) -> None:
        record_change(self._conn, state, action, self._now)

    def record_redaction(self, snapshot: ConversationSnapshot, message: Message) -> bool:
        row = {
            "provider": snapshot.provider,
            "workspace": snapshot.workspace,
            "external_id": snapshot.external_id,
            "message_id": message.id,
            "message": message.model_dump_json(),
        }
        return bool(self._sql.run(self._conn, self._sql.record_redaction, row).rowcount)

    def redactions(self, change: Change) -> dict[str, Message]:
        rows = self._sql.run(self._conn, self._sql.redactions_of, key_params(change)).fetchall()
        return {message_id: Message.model_validate_json(text) for message_id, text in rows}

    def redactable_bodies(self, pk: int, change: Change) -> Iterator[tuple[int, bytes]]:
        params = {"b_pk": pk, "b_provider": change.provider, "b_workspace": change.workspace}
        settled_ledger(self._sql, self._conn)  # this batch's earlier deliveries of the conversation are found by it
        return _stream(self._sql.run(self._conn, self._sql.redactable_bodies, params))

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        self._sql.run(self._conn, self._sql.rewrite_body, {"body": body, "b_pk": ledger_pk})


def _stream(cursor: Any, size: int = 50) -> Iterator[tuple[int, bytes]]:
    """Rows a few at a time: a conversation's payloads can add up to far more than memory should hold."""
    while rows := cursor.fetchmany(size):
        for pk, body in rows:
            yield pk, bytes(body)
