"""Re-deriving conversations from the ledger (``kbms reprocess``): the deliveries to read again, and the rebuild
of one conversation from all of its deliveries. Not a hot path: statements are built per call."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from kbms.merge import conversation_id, delete, render, replay
from kbms.model import Change, Message
from kbms.storage.base import ConcurrentCreation, ConversationKey, LedgerEntry, Reader, Rebuilt, Redactor
from kbms.storage.feed import record_change, write_index
from kbms.storage.rows import conversation_values
from kbms.storage.schema import conversations, ledger
from kbms.storage.state import Index, load_state, write_children
from kbms.storage.statements import Sql

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


def _key_of(change: Change) -> ConversationKey:
    return ConversationKey(change.provider, change.workspace, change.external_id)


def reclassify(conn: Connection, ledger_pk: int, outcome: str, error: str | None) -> None:
    conn.execute(update(ledger).where(ledger.c.pk == ledger_pk).values(outcome=outcome, error=error))


ACCEPTED = frozenset(("created", "updated", "unchanged"))


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
    """Fold every delivery of one conversation, in received order, through today's mappers; store the result
    if it differs from what is stored, and correct each delivery's standing. Doing it twice changes nothing.

    Deliveries that now belong to another conversation are handed back (``Rebuilt.moved``); a conversation that no
    delivery produces any more becomes a tombstone.
    """
    params = {"k_provider": key.provider, "k_workspace": key.workspace, "k_external_id": key.external_id}
    exists = conn.execute(sql.lock, params).first() is not None
    stored_pk, stored = load_state(sql, conn, params) if exists else (None, None)
    filters = [ledger.c.conversation_pk == stored_pk] if stored_pk is not None else []
    filters += [ledger.c.pk.in_(extra)] if extra else []
    query = select(*LEDGER_ENTRY_COLUMNS).where(or_(*filters)).order_by(ledger.c.received_at, ledger.c.pk)
    entries = [_entry(row) for row in conn.execute(query)] if filters else []

    readings = [(entry, read(entry)) for entry in entries]
    mine = [(e, r.change) for e, r in readings if r.change is not None and _key_of(r.change) == key]
    moved: dict[ConversationKey, list[int]] = {}
    for entry, reading in readings:
        if reading.change is not None and _key_of(reading.change) != key:
            moved.setdefault(_key_of(reading.change), []).append(entry.pk)
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
        detail = render(revised)
        values = conversation_values(revised, changed_at=now, detail=detail)
        if stored_pk is None:
            created = conn.execute(sql.create, values).first()
            if created is None:
                raise ConcurrentCreation(key)
            stored_pk = int(created[0])
        else:
            for load, _insert, _upsert in sql.children.values():
                conn.execute(sql.purge[load], {"b_pk": stored_pk})
            conn.execute(sql.save, {**values, "b_pk": stored_pk})
        write_children(
            sql, conn, stored_pk, revised, revised.participants, revised.messages, revised.events, fresh=True
        )
        was_live = stored is not None and stored.deleted_at is None
        live = revised.deleted_at is None
        write_index(sql, conn, stored_pk, Index.of(detail) if live else None, fresh=not was_live)
        if live or was_live:
            action = ("updated" if was_live else "created") if live else "deleted"
            record_change(conn, revised, action, now)

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
        conn.execute(
            update(ledger).where(ledger.c.pk == entry.pk).values(outcome=outcome, error=error, conversation_pk=target)
        )
        reclassified += 1
        if target is not None and entry.conversation_pk != target:
            newly_linked.append(entry)
    if newly_linked and redact is not None:
        redacted = {m: Message.model_validate_json(t) for m, t in sql.run(conn, sql.redactions_of, params).fetchall()}
        for entry in newly_linked if redacted else ():
            if (clean := redact(entry.body, key.external_id, redacted)) is not None:
                sql.run(conn, sql.rewrite_body, {"body": clean, "b_pk": entry.pk})
    return Rebuilt(changed=changed, deliveries_reclassified=reclassified, moved=moved)
