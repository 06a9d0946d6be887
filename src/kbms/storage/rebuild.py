"""Re-deriving conversations from the ledger (``kbms reprocess``), storage's side: the deliveries to read again,
and ``kbms.lifecycle.Rebuilding`` over SQL, which runs the rebuild of one conversation that the lifecycle decides.
Not a hot path: statements are built per call."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from kbms import lifecycle
from kbms.deliveries import ConcurrentCreation, ConversationKey, LedgerEntry, Reader, Rebuilt
from kbms.merge import ConversationState
from kbms.model import Conversation, Message, Redactor
from kbms.storage.feed import record_change, write_index
from kbms.storage.rows import conversation_values
from kbms.storage.schema import conversations, ledger
from kbms.storage.state import Index, load_state, write_children
from kbms.storage.statements import Sql, key_params

LEDGER_ENTRY_COLUMNS = (
    ledger.c.pk,
    ledger.c.provider,
    ledger.c.kind,
    ledger.c.workspace,
    ledger.c.topic,
    ledger.c.body,
    ledger.c.received_at,
    ledger.c.outcome,
    ledger.c.error,
    ledger.c.conversation_pk,
    ledger.c.named_workspace,
)


def _entry(row: Any) -> LedgerEntry:
    return LedgerEntry(*row)


def unlinked_deliveries(
    conn: Connection, *, provider: str | None, since: int | None, after: tuple[int, int] | None, limit: int
) -> list[LedgerEntry]:
    query = select(*LEDGER_ENTRY_COLUMNS).where(ledger.c.conversation_pk.is_(None))
    if provider is not None:
        query = query.where(ledger.c.provider == provider)
    if since is not None:
        query = query.where(ledger.c.received_at >= since)
    if after is not None:
        query = query.where(
            or_(ledger.c.received_at > after[0], and_(ledger.c.received_at == after[0], ledger.c.pk > after[1]))
        )
    rows = conn.execute(query.order_by(ledger.c.received_at, ledger.c.pk).limit(limit)).all()
    return [_entry(row) for row in rows]


def conversations_in_scope(
    conn: Connection, *, provider: str | None, since: int | None, conversation_id: str | None
) -> list[ConversationKey]:
    c = conversations.c
    query = (
        select(c.provider, c.workspace, c.external_id)
        .select_from(conversations.join(ledger, ledger.c.conversation_pk == c.pk))
        .group_by(c.provider, c.workspace, c.external_id)
        .order_by(func.min(ledger.c.received_at), c.provider, c.workspace, c.external_id)
    )
    if provider is not None:
        query = query.where(ledger.c.provider == provider)
    if since is not None:
        query = query.where(ledger.c.received_at >= since)
    if conversation_id is not None:
        query = query.where(c.id == conversation_id)
    return [ConversationKey(*row) for row in conn.execute(query).all()]


def reclassify(conn: Connection, ledger_pk: int, outcome: str, error: str | None) -> None:
    conn.execute(update(ledger).where(ledger.c.pk == ledger_pk).values(outcome=outcome, error=error))


def rebuild(
    sql: Sql,
    conn: Connection,
    key: ConversationKey,
    extra: list[int],
    read: Reader,
    redact: Redactor | None,
    *,
    now: int,
) -> Rebuilt:
    """``kbms.lifecycle.rebuild`` of one conversation, in this transaction."""
    return lifecycle.rebuild(RebuildTransaction(sql, conn, now=now), key, extra, read, redact, now=now)


class RebuildTransaction:
    """``kbms.lifecycle.Rebuilding`` on an open connection; ``now``: the time of its changes."""

    def __init__(self, sql: Sql, conn: Connection, *, now: int) -> None:
        self._sql = sql
        self._conn = conn
        self._now = now

    def lock(self, key: ConversationKey) -> tuple[int, ConversationState] | None:
        params = key_params(key)
        exists = self._conn.execute(self._sql.lock, params).first() is not None
        return load_state(self._sql, self._conn, params) if exists else None

    def deliveries(self, pk: int | None, extra: list[int]) -> list[LedgerEntry]:
        filters = [ledger.c.conversation_pk == pk] if pk is not None else []
        filters += [ledger.c.pk.in_(extra)] if extra else []
        query = select(*LEDGER_ENTRY_COLUMNS).where(or_(*filters)).order_by(ledger.c.received_at, ledger.c.pk)
        return [_entry(row) for row in self._conn.execute(query)] if filters else []

    def store(self, pk: int | None, state: ConversationState, detail: Conversation, *, was_live: bool) -> int:
        sql, conn = self._sql, self._conn
        values = conversation_values(state, changed_at=self._now, detail=detail)
        if pk is None:
            created = conn.execute(sql.create, values).first()
            if created is None:
                raise ConcurrentCreation(ConversationKey.of(state))
            pk = int(created[0])
        else:
            for load, _insert, _upsert in sql.children.values():
                conn.execute(sql.purge[load], {"b_pk": pk})
            conn.execute(sql.save, {**values, "b_pk": pk})
        write_children(sql, conn, pk, state, state.participants, state.messages, state.events, fresh=True)
        live = state.deleted_at is None
        write_index(sql, conn, pk, Index.of(detail) if live else None, fresh=not was_live)
        return pk

    def record_change(self, state: ConversationState, action: str) -> None:
        record_change(self._conn, state, action, self._now)

    def reclassify(self, ledger_pk: int, outcome: str, error: str | None, conversation_pk: int | None) -> None:
        values = {"outcome": outcome, "error": error, "conversation_pk": conversation_pk}
        self._conn.execute(update(ledger).where(ledger.c.pk == ledger_pk).values(**values))

    def redactions(self, key: ConversationKey) -> dict[str, Message]:
        rows = self._sql.run(self._conn, self._sql.redactions_of, key_params(key)).fetchall()
        return {message_id: Message.model_validate_json(text) for message_id, text in rows}

    def rewrite_body(self, ledger_pk: int, body: bytes) -> None:
        self._sql.run(self._conn, self._sql.rewrite_body, {"body": body, "b_pk": ledger_pk})
