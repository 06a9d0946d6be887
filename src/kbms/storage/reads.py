"""Reads on an open connection: ledger lookups, a conversation's detail, list and search pages, the change feed,
counts and export chunks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, func, select

from kbms import search
from kbms.deliveries import KnownDelivery
from kbms.model import Conversation, ConversationSummary, from_micros
from kbms.storage.base import ChangeRecord, Cursor, Filters, Hit, Page
from kbms.storage.filters import filter_conditions, filter_params
from kbms.storage.schema import conversations, ledger
from kbms.storage.statements import Sql

# Keys per IN (...) list: well under SQLite's 32,766 variables and PostgreSQL's 65,535 parameters.
SECOND = 1_000_000  # microseconds
KEYS_PER_QUERY = 1000


def find_delivery(sql: Sql, conn: Connection, provider: str, delivery_key: str) -> KnownDelivery | None:
    row = sql.run(conn, sql.find_delivery, {"b_provider": provider, "b_key": delivery_key}).fetchone()
    if row is None:
        return None
    return KnownDelivery(outcome=row[0], conversation_id=row[1], external_id=row[2], workspace=row[3])


def find_deliveries(sql: Sql, conn: Connection, provider: str, keys: Sequence[str]) -> dict[str, KnownDelivery]:
    found: dict[str, KnownDelivery] = {}
    for start in range(0, len(keys), KEYS_PER_QUERY):
        params = {"b_provider": provider, "b_keys": list(keys[start : start + KEYS_PER_QUERY])}
        for key, outcome, conversation, external_id, workspace in conn.execute(sql.find_deliveries, params):
            found[key] = KnownDelivery(outcome, conversation, external_id, workspace)
    return found


def get_detail_json(
    sql: Sql, conn: Connection, conversation_id: str, within: frozenset[str] | None = None
) -> str | None:
    row = sql.run(conn, sql.detail, {"b_id": conversation_id}).fetchone()
    if row is None or (within is not None and row[1] not in within):
        return None
    return str(row[0])


def get_detail(sql: Sql, conn: Connection, conversation_id: str) -> Conversation | None:
    text = get_detail_json(sql, conn, conversation_id)
    return None if text is None else Conversation.model_validate_json(text)


def list_page(sql: Sql, conn: Connection, *, limit: int, cursor: Cursor | None, filters: Filters) -> Page:
    params: dict[str, Any] = {"b_limit": limit + 1, **filter_params(filters)}
    if cursor is not None:
        params.update(b_updated_at=cursor.updated_at, b_id=cursor.conversation_id)
    rows = conn.execute(sql.page(cursor is not None, filters), params).mappings().all()
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


def search_page(
    sql: Sql, conn: Connection, *, terms: Sequence[str], filters: Filters, limit: int, offset: int
) -> list[Hit]:
    params = {"b_query": sql.search_query(terms), "b_limit": limit, "b_offset": offset, "b_window": search.WINDOW}
    params.update(filter_params(filters))
    hits = []
    for row in conn.execute(sql.search(filters), params).mappings():
        detail = json.loads(row["detail"])
        found = search.snippet(
            detail.get("subject"), ((m["id"], m["content"]) for m in detail.get("messages", ())), terms
        )
        hits.append(
            Hit(
                summary=_summary(row),
                score=float(row["score"]),
                snippet=found.text if found is not None else None,
                message_id=found.message_id if found is not None else None,
            )
        )
    return hits


def changes_after(
    sql: Sql, conn: Connection, *, after: int, limit: int, within: frozenset[str] | None = None
) -> list[ChangeRecord]:
    if within is None:
        rows = conn.execute(sql.feed, {"b_after": after, "b_limit": limit}).mappings()
    else:
        params = {"b_after": after, "b_limit": limit, "b_within": sorted(within)}
        rows = conn.execute(sql.feed_within, params).mappings()
    return [ChangeRecord(**row) for row in rows]


def count(sql: Sql, conn: Connection, *, filters: Filters) -> int:
    c = conversations.c
    statement = select(func.count()).where(c.deleted_at.is_(None), *filter_conditions(filters))
    return int(conn.execute(statement, filter_params(filters)).scalar_one())


def export_chunk(
    sql: Sql, conn: Connection, *, filters: Filters, cursor: Cursor | None, size: int
) -> tuple[list[bytes], Cursor | None]:
    """Up to ``size`` details after ``cursor`` (in the list's order), and the cursor after them (None at the end)."""
    params: dict[str, Any] = {"b_limit": size, **filter_params(filters)}
    if cursor is not None:
        params.update(b_updated_at=cursor.updated_at, b_id=cursor.conversation_id)
    rows = conn.execute(sql.page(cursor is not None, filters, export=True), params).all()
    if not rows:
        return [], None
    last = rows[-1]
    following = Cursor(updated_at=last[1], conversation_id=last[2]) if len(rows) == size else None
    return [row[0].encode() for row in rows], following


def stored_versions(conn: Connection, provider: str, workspace: str, external_ids: Sequence[str]) -> dict[str, int]:
    """How far each of these conversations, stored and live, is known complete (see ``SyncStore.stored_versions``):
    its version (the greatest ``updated_at`` merged) when a whole copy of it (pulled or pushed, not a webhook's,
    which carries only the newest part) arrived after that second had ended; else just under it. Providers' versions
    are whole seconds: a copy fetched within the second of its version may miss an edit made later in that second,
    which the lookback lists again, and this sends to be fetched again."""
    c, ledger_c = conversations.c, ledger.c
    live = and_(c.provider == provider, c.workspace == workspace, c.deleted_at.is_(None))
    whole = and_(ledger_c.conversation_pk == c.pk, ledger_c.kind.in_(("pull", "push")))
    joined = conversations.outerjoin(ledger, whole)
    unique = list(dict.fromkeys(external_ids))
    found: dict[str, int] = {}
    for start in range(0, len(unique), KEYS_PER_QUERY):
        chunk = unique[start : start + KEYS_PER_QUERY]
        query = (
            select(c.external_id, c.updated_at, func.max(ledger_c.received_at))
            .select_from(joined)
            .where(live, c.external_id.in_(chunk))
            .group_by(c.pk, c.external_id, c.updated_at)
        )
        for external_id, version, received in conn.execute(query):
            complete = received is not None and received >= version + SECOND
            found[external_id] = version if complete else version - 1
    return found
