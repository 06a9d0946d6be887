"""The sync state's SQL (see ``storage/syncstate.py``): jobs on an open connection, in a transaction the store owns.

Both engines take the same statements. The upserts use ``ON CONFLICT``, which both have; the one pending job per
conversation is a partial unique index, which ``ON CONFLICT (...) WHERE state = 'pending'`` targets on both. A claim
selects its jobs ``FOR UPDATE SKIP LOCKED`` (PostgreSQL: concurrent claimers pass over each other's rows instead
of waiting for them, then see them running; SQLite renders no locking clause, and has one writer at a time), then
marks them running, in one transaction. Nothing holds a row lock beyond that transaction: never across a fetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, delete, exists, func, or_, select, text, update

from kbms.storage.schema import sync_dead_letters, sync_jobs, sync_sources
from kbms.storage.statements import SqlFlavor
from kbms.storage.syncstate import KEEP, JobReason, Keep, Queued, SyncJob

KEYS_PER_QUERY = 1000  # ids per IN (...) list: well under both engines' parameter limits
COUNTERS = ("listed", "fetched", "stored", "requests", "rate_limit_waits")
PENDING = text("state = 'pending'")
j, s, d = sync_jobs.c, sync_sources.c, sync_dead_letters.c
JOB = (j.pk, j.provider, j.workspace, j.external_id, j.reason, j.attempts, j.lease_owner, j.lease_until)
JOB_DATA = (j.listed_updated_at, j.prefetched, j.last_error)
KEPT = (j.provider, j.workspace, j.external_id, j.reason, j.listed_updated_at, j.prefetched, j.first_failed_at)


def _least(new: Any, old: Any) -> Any:
    """The smaller of two values, either of which may be null (LEAST is PostgreSQL's, MIN(a, b) SQLite's)."""
    return case((old.is_(None), new), (new < old, new), else_=old)


def _greatest(new: Any, old: Any) -> Any:
    return case((old.is_(None), new), (new > old, new), else_=old)


class SyncSql:
    """The sync statements, built once per engine (from its upsert)."""

    def __init__(self, flavor: SqlFlavor) -> None:
        queue = flavor.insert(sync_jobs)
        new = queue.excluded
        # The newer listing wins; an unknown version (a webhook's hint) is the newest of all, so that a job that
        # carries one is never skipped as "stored already".
        newer = or_(new.listed_updated_at.is_(None), new.listed_updated_at >= j.listed_updated_at)
        self.queue = queue.on_conflict_do_update(
            index_elements=[j.provider, j.workspace, j.external_id],
            index_where=PENDING,
            set_={
                "next_attempt_at": _least(new.next_attempt_at, j.next_attempt_at),
                "listed_updated_at": case((newer, new.listed_updated_at), else_=j.listed_updated_at),
                "prefetched": case((newer, new.prefetched), else_=j.prefetched),
                "attempts": case((new.attempts > j.attempts, new.attempts), else_=j.attempts),
                "last_error": func.coalesce(new.last_error, j.last_error),
                "first_failed_at": _least(new.first_failed_at, j.first_failed_at),
            },
        )
        # A conversation is fetched by one claimer at a time: its pending job waits while another job of it runs.
        other = sync_jobs.alias("other")
        running = exists().where(
            other.c.provider == j.provider,
            other.c.workspace == j.workspace,
            other.c.external_id == j.external_id,
            other.c.state == "running",
        )
        self.due = (
            select(j.pk)
            .where(
                j.provider == bindparam("b_provider"),
                j.workspace == bindparam("b_workspace"),
                or_(
                    and_(j.state == "pending", j.next_attempt_at <= bindparam("b_now"), ~running),
                    and_(j.state == "running", j.lease_until < bindparam("b_now")),
                ),
            )
            .order_by(j.next_attempt_at, j.pk)
            .limit(bindparam("b_limit"))
            .with_for_update(skip_locked=True)
        )
        self.take = (
            update(sync_jobs)
            .where(j.pk.in_(bindparam("b_pks", expanding=True)))
            .values(
                state="running",
                lease_owner=bindparam("b_owner"),
                lease_until=bindparam("b_until"),
                attempts=j.attempts + 1,
            )
            .returning(*JOB, *JOB_DATA)
        )
        # Only the claim the caller holds: a lost lease (another claimer took the job since) removes nothing.
        self.drop = (
            delete(sync_jobs)
            .where(
                j.pk == bindparam("b_pk"),
                j.state == "running",
                j.lease_owner == bindparam("b_owner"),
                j.attempts == bindparam("b_attempts"),
            )
            .returning(*KEPT)
        )
        bury = flavor.insert(sync_dead_letters)
        self.bury = bury.on_conflict_do_update(
            index_elements=[d.provider, d.workspace, d.external_id],
            set_={
                "reason": bury.excluded.reason,
                "attempts": bury.excluded.attempts,
                "last_error": bury.excluded.last_error,
                "dead_at": bury.excluded.dead_at,
                "first_failed_at": _least(bury.excluded.first_failed_at, d.first_failed_at),
            },
        )
        source = flavor.insert(sync_sources)
        given = source.excluded
        advance = {"checkpoint": _greatest(given.checkpoint, s.checkpoint)}  # forward only
        totals = {name: s[name] + given[name] for name in COUNTERS}
        passed = {name: given[name] for name in ("pass_started_at", "pass_finished_at", "pass_outcome", "last_error")}
        cursor = {"cursor": given.cursor}
        keys = [s.provider, s.workspace]
        # Each with and without the cursor (set, or kept).
        self.advance = {
            keep: source.on_conflict_do_update(index_elements=keys, set_=advance if keep else {**advance, **cursor})
            for keep in (True, False)
        }
        self.record = {
            keep: source.on_conflict_do_update(
                index_elements=keys, set_={**passed, **totals} if keep else {**passed, **totals, **cursor}
            )
            for keep in (True, False)
        }
        self.count = source.on_conflict_do_update(index_elements=keys, set_=totals)
        self.lease = source.on_conflict_do_update(
            index_elements=keys,
            set_={"lease_owner": given.lease_owner, "lease_until": given.lease_until},
            where=or_(s.lease_until.is_(None), s.lease_until <= bindparam("b_now"), s.lease_owner == given.lease_owner),
        ).returning(s.provider)
        self.release = (
            update(sync_sources)
            .where(s.provider == bindparam("b_provider"), s.workspace == bindparam("b_workspace"))
            .where(s.lease_owner == bindparam("b_owner"))
            .values(lease_owner=None, lease_until=None)
        )


def enqueue(
    sql: SyncSql,
    conn: Connection,
    provider: str,
    workspace: str,
    items: Sequence[Queued],
    reason: JobReason,
    *,
    due: int,
    now: int,
    position: str | Keep | None,
    checkpoint: int | None,
) -> None:
    # One row per conversation, chosen as the upsert would: an upsert many rows at once may not touch one row twice.
    newest: dict[str, Queued] = {}
    for item in items:
        kept = newest.get(item.external_id)
        if (
            kept is None
            or item.updated_at is None
            or (kept.updated_at is not None and item.updated_at >= kept.updated_at)
        ):
            newest[item.external_id] = item
    if newest:
        # In key order: two writers queueing the same conversations take their index entries in one order.
        rows = [
            pending_row(
                provider, workspace, i.external_id, reason, due, now, listed=i.updated_at, prefetched=i.prefetched
            )
            for _id, i in sorted(newest.items())
        ]
        conn.execute(sql.queue, rows)
    advance(sql, conn, provider, workspace, position=position, checkpoint=checkpoint)


def advance(
    sql: SyncSql,
    conn: Connection,
    provider: str,
    workspace: str,
    *,
    position: str | Keep | None,
    checkpoint: int | None,
) -> None:
    """Move the source's checkpoint forward and set its cursor (after its jobs are queued, in their transaction)."""
    values = {"provider": provider, "workspace": workspace, "checkpoint": checkpoint}
    conn.execute(sql.advance[position is KEEP], values if position is KEEP else {**values, "cursor": position})


def pending_row(
    provider: str,
    workspace: str,
    external_id: str,
    reason: str,
    due: int,
    now: int,
    *,
    listed: int | None,
    prefetched: bytes | None,
    attempts: int = 0,
    error: str | None = None,
    first_failed_at: int | None = None,
) -> dict[str, Any]:
    return {
        "provider": provider,
        "workspace": workspace,
        "external_id": external_id,
        "reason": reason,
        "state": "pending",
        "attempts": attempts,
        "next_attempt_at": due,
        "lease_owner": None,
        "lease_until": None,
        "listed_updated_at": listed,
        "prefetched": prefetched,
        "last_error": error,
        "first_failed_at": first_failed_at,
        "created_at": now,
    }


def claim(
    sql: SyncSql, conn: Connection, provider: str, workspace: str, *, owner: str, limit: int, now: int, lease: int
) -> list[SyncJob]:
    params = {"b_provider": provider, "b_workspace": workspace, "b_now": now, "b_limit": limit}
    pks = list(conn.execute(sql.due, params).scalars())
    if not pks:
        return []
    rows = conn.execute(sql.take, {"b_pks": pks, "b_owner": owner, "b_until": now + lease}).all()
    order = {pk: index for index, pk in enumerate(pks)}
    return sorted((SyncJob(*row) for row in rows), key=lambda job: order[job.pk])


def _drop(sql: SyncSql, conn: Connection, job: SyncJob) -> Any:
    """Delete the job if the caller's claim still holds; its row (``KEPT``) then, else None."""
    params = {"b_pk": job.pk, "b_owner": job.owner, "b_attempts": job.attempts}
    return conn.execute(sql.drop, params).first()


def finish(sql: SyncSql, conn: Connection, job: SyncJob) -> bool:
    if _drop(sql, conn, job) is None:
        return False
    # Stored now: a dead letter left by an earlier failure of the same conversation is over.
    d = sync_dead_letters.c
    mine = (d.provider == job.provider, d.workspace == job.workspace, d.external_id == job.external_id)
    conn.execute(delete(sync_dead_letters).where(*mine))
    return True


def retry_later(sql: SyncSql, conn: Connection, job: SyncJob, error: str, *, due: int, now: int) -> bool:
    # Deleted and queued again, rather than updated in place: a job queued meanwhile for the same conversation
    # (a webhook's) holds the one pending place, and the upsert joins the two instead of breaking the unique index.
    row = _drop(sql, conn, job)
    if row is None:
        return False
    provider, workspace, external_id, reason, listed, prefetched, first_failed_at = row
    first = first_failed_at if first_failed_at is not None else now
    values = pending_row(
        provider,
        workspace,
        external_id,
        reason,
        due,
        now,
        listed=listed,
        prefetched=prefetched,
        attempts=job.attempts,
        error=error,
        first_failed_at=first,
    )
    conn.execute(sql.queue, values)
    return True


def bury(sql: SyncSql, conn: Connection, job: SyncJob, error: str, *, now: int) -> bool:
    row = _drop(sql, conn, job)
    if row is None:
        return False
    provider, workspace, external_id, reason, _listed, _prefetched, first_failed_at = row
    values = {
        "provider": provider,
        "workspace": workspace,
        "external_id": external_id,
        "reason": reason,
        "attempts": job.attempts,
        "last_error": error,
        "first_failed_at": first_failed_at if first_failed_at is not None else now,
        "dead_at": now,
    }
    conn.execute(sql.bury, values)
    return True


def chunks(ids: Sequence[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(ids))
    return [unique[start : start + KEYS_PER_QUERY] for start in range(0, len(unique), KEYS_PER_QUERY)]
