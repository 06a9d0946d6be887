"""Reads for the operator console (``kbms.api.console``): conversations per workspace, deliveries per minute, a
conversation's deliveries, the rejected ones, one ledger row. Not hot paths (an operator's page views), so
statements are built per call; each is an indexed query with a limit or a bounded time window.

What keeps them cheap at a million conversations (measured on SQLite on a busy 2-core machine, with 1,000,000
conversations in 20 workspaces and 1,000,000 deliveries, all in the last 24 hours, 0.5 % of them rejected):
- counts per workspace scan ``ix_conversations_live_provider_workspace``, a covering index of live rows only
  (0.1-0.2 s for all workspaces, 13 ms for two of them): the console keeps the result a while when it is slow;
- deliveries per minute scan ``ix_ledger_received`` (received_at, pk) within 24 hours, index only: their cost
  follows the day's traffic, not the table's size (0.4-0.6 s for a million in a day; kept a while, likewise);
- rejections scan ``ix_ledger_rejected``, a partial index of rejected rows only (under 1 ms a page);
- a conversation's deliveries are found by ``ix_ledger_conversation`` (under 1 ms).
  Both engines use a partial index only when the query repeats its condition as written, so ``REJECTED`` is
  literal SQL, never a bound parameter.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, text

from kbms.deliveries import LedgerEntry
from kbms.storage.base import Activity, DeliveryRecord, WorkspaceCount
from kbms.storage.rebuild import LEDGER_ENTRY_COLUMNS
from kbms.storage.schema import conversations, ledger

MINUTE = 60_000_000  # microseconds
REJECTED = text("ledger.outcome = 'rejected'")
LIVE = text("conversations.deleted_at IS NULL")
RECORD_COLUMNS = (
    ledger.c.pk,
    ledger.c.provider,
    ledger.c.workspace,
    ledger.c.kind,
    ledger.c.topic,
    ledger.c.received_at,
    ledger.c.outcome,
    ledger.c.error,
    ledger.c.body,
)


def _record(row: Any) -> DeliveryRecord:
    pk, provider, workspace, kind, topic, received_at, outcome, error, body = row
    return DeliveryRecord(pk, provider, workspace, kind, topic, received_at, outcome, error, bytes(body))


def workspace_counts(conn: Connection, *, within: frozenset[str] | None) -> list[WorkspaceCount]:
    c = conversations.c
    query = select(c.provider, c.workspace, func.count()).where(LIVE).group_by(c.provider, c.workspace)
    if within is not None:
        query = query.where(c.workspace.in_(sorted(within)))
    rows = conn.execute(query.order_by(c.provider, c.workspace)).all()
    return [WorkspaceCount(provider, workspace, int(n)) for provider, workspace, n in rows]


def activity(conn: Connection, *, since: int, until: int, within: frozenset[str] | None) -> list[Activity]:
    received_at = ledger.c.received_at
    # Integer division on both engines: the column is an integer, and so is the literal.
    minute = (received_at // MINUTE).label("minute")
    window = [received_at >= since, received_at < until]
    if within is not None:
        window.append(ledger.c.workspace.in_(sorted(within)))
    received = select(minute, func.count()).where(*window).group_by(minute)
    rejected = select(minute, func.count()).where(REJECTED, *window).group_by(minute)
    counts: dict[int, list[int]] = {}
    for bucket, n in conn.execute(received):
        counts.setdefault(int(bucket), [0, 0])[0] = int(n)
    for bucket, n in conn.execute(rejected):
        counts.setdefault(int(bucket), [0, 0])[1] = int(n)
    return [Activity(bucket * MINUTE, got, refused) for bucket, (got, refused) in sorted(counts.items())]


def conversation_deliveries(conn: Connection, *, conversation_id: str, limit: int) -> list[DeliveryRecord]:
    pk = select(conversations.c.pk).where(conversations.c.id == conversation_id).scalar_subquery()
    query = (
        select(*RECORD_COLUMNS)
        .where(ledger.c.conversation_pk == pk)
        .order_by(ledger.c.received_at.desc(), ledger.c.pk.desc())
        .limit(limit)
    )
    return [_record(row) for row in reversed(conn.execute(query).all())]


def rejected_deliveries(
    conn: Connection,
    *,
    provider: str | None,
    workspace: str | None,
    within: frozenset[str] | None,
    since: int | None,
    before: tuple[int, int] | None,
    limit: int,
) -> list[DeliveryRecord]:
    query = select(*RECORD_COLUMNS).where(REJECTED)
    if provider is not None:
        query = query.where(ledger.c.provider == provider)
    if workspace is not None:
        query = query.where(ledger.c.workspace == workspace)
    if within is not None:
        query = query.where(ledger.c.workspace.in_(sorted(within)))
    if since is not None:
        query = query.where(ledger.c.received_at >= since)
    if before is not None:
        at, pk = before
        query = query.where(or_(ledger.c.received_at < at, and_(ledger.c.received_at == at, ledger.c.pk < pk)))
    query = query.order_by(ledger.c.received_at.desc(), ledger.c.pk.desc()).limit(limit)
    return [_record(row) for row in conn.execute(query)]


def ledger_entry(conn: Connection, *, pk: int) -> LedgerEntry | None:
    row = conn.execute(select(*LEDGER_ENTRY_COLUMNS).where(ledger.c.pk == pk)).one_or_none()
    return None if row is None else LedgerEntry(*row)
