"""The sync state of each source (see ``storage/syncstate.py``): its passes, totals, listing lease and dead letters,
read and written on an open connection; the statements are ``sync.SyncSql``'s, the queue is ``sync``'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, delete, func, select, update

from kbms.storage.schema import sync_dead_letters, sync_jobs, sync_sources
from kbms.storage.sync import COUNTERS, SyncSql, chunks, pending_row
from kbms.storage.syncstate import KEEP, DeadLetter, Keep, SourceState, SyncCounts, SyncJob

j, d, s = sync_jobs.c, sync_dead_letters.c, sync_sources.c


def record_pass(
    sql: SyncSql,
    conn: Connection,
    provider: str,
    workspace: str,
    *,
    started_at: int,
    finished_at: int | None,
    outcome: str,
    error: str | None,
    counts: SyncCounts,
    position: str | Keep | None,
) -> None:
    values: dict[str, Any] = {
        "provider": provider,
        "workspace": workspace,
        "pass_started_at": started_at,
        "pass_finished_at": finished_at,
        "pass_outcome": outcome,
        "last_error": error,
        **_counts(counts),
    }
    if position is not KEEP:
        values["cursor"] = position
    conn.execute(sql.record[position is KEEP], values)


def add_counts(sql: SyncSql, conn: Connection, provider: str, workspace: str, counts: SyncCounts) -> None:
    conn.execute(sql.count, {"provider": provider, "workspace": workspace, **_counts(counts)})


def _counts(counts: SyncCounts) -> dict[str, int]:
    return {name: getattr(counts, name) for name in COUNTERS}


def sync_states(conn: Connection) -> list[SourceState]:
    queued: dict[tuple[str, str], dict[str, Any]] = {}
    by_state = select(j.provider, j.workspace, j.state, func.count(), func.min(j.listed_updated_at))
    for provider, workspace, state, count, oldest in conn.execute(by_state.group_by(j.provider, j.workspace, j.state)):
        entry = queued.setdefault((provider, workspace), {"pending": 0, "running": 0, "oldest": None})
        entry[state] = count
        if oldest is not None and (entry["oldest"] is None or oldest < entry["oldest"]):
            entry["oldest"] = oldest
    by_source = select(d.provider, d.workspace, func.count()).group_by(d.provider, d.workspace)
    dead = {(provider, workspace): count for provider, workspace, count in conn.execute(by_source)}
    states: list[SourceState] = []
    for row in conn.execute(select(sync_sources)).mappings():
        key = (row["provider"], row["workspace"])
        entry = queued.get(key, {"pending": 0, "running": 0, "oldest": None})
        states.append(
            SourceState(
                provider=row["provider"],
                workspace=row["workspace"],
                checkpoint=row["checkpoint"],
                cursor=row["cursor"],
                pass_started_at=row["pass_started_at"],
                pass_finished_at=row["pass_finished_at"],
                pass_outcome=row["pass_outcome"],
                last_error=row["last_error"],
                totals=SyncCounts(**{name: row[name] for name in COUNTERS}),
                lease_owner=row["lease_owner"],
                lease_until=row["lease_until"],
                pending=entry["pending"],
                running=entry["running"],
                dead_letters=dead.get(key, 0),
                oldest_queued=entry["oldest"],
            )
        )
    return sorted(states, key=lambda state: (state.provider, state.workspace))


def lease_source(
    sql: SyncSql, conn: Connection, provider: str, workspace: str, *, owner: str, now: int, until: int
) -> bool:
    values = {"provider": provider, "workspace": workspace, "lease_owner": owner, "lease_until": until, "b_now": now}
    return conn.execute(sql.lease, values).first() is not None


def release_source(sql: SyncSql, conn: Connection, provider: str, workspace: str, *, owner: str) -> None:
    conn.execute(sql.release, {"b_provider": provider, "b_workspace": workspace, "b_owner": owner})


def dead_letters(conn: Connection, provider: str, workspace: str, *, limit: int, after: str | None) -> list[DeadLetter]:
    query = select(sync_dead_letters).where(d.provider == provider, d.workspace == workspace)
    if after is not None:
        query = query.where(d.external_id > after)
    return [DeadLetter(*row) for row in conn.execute(query.order_by(d.external_id).limit(limit))]


def retry_dead_letters(
    sql: SyncSql, conn: Connection, provider: str, workspace: str, external_ids: Sequence[str] | None, *, now: int
) -> int:
    """Queue dead letters again, due now, and delete them (one transaction: each is in one place or the other)."""
    source = and_(d.provider == provider, d.workspace == workspace)
    if external_ids is None:
        external_ids = list(conn.execute(select(d.external_id).where(source)).scalars())
    moved = 0
    for chunk in chunks(external_ids):
        scope = and_(source, d.external_id.in_(chunk))
        dead = [DeadLetter(*row) for row in conn.execute(select(sync_dead_letters).where(scope))]
        if not dead:
            continue
        rows = [
            pending_row(
                provider, workspace, x.external_id, x.reason, now, now, listed=None, prefetched=None, error=x.last_error
            )
            for x in dead
        ]
        conn.execute(sql.queue, rows)
        conn.execute(delete(sync_dead_letters).where(source, d.external_id.in_([x.external_id for x in dead])))
        moved += len(dead)
    return moved


def lease_holders(conn: Connection, provider: str, workspace: str) -> set[str]:
    jobs = select(j.lease_owner).where(j.provider == provider, j.workspace == workspace, j.state == "running")
    lister = select(s.lease_owner).where(s.provider == provider, s.workspace == workspace)
    return {owner for owner in conn.execute(jobs.union(lister)).scalars() if owner is not None}


def expire_leases(conn: Connection, provider: str, workspace: str, owners: Sequence[str], *, now: int) -> None:
    if not owners:
        return
    mine = (j.provider == provider, j.workspace == workspace, j.state == "running", j.lease_owner.in_(owners))
    conn.execute(update(sync_jobs).where(*mine).values(lease_until=now - 1))  # claims take leases that ended before now
    source = (s.provider == provider, s.workspace == workspace, s.lease_owner.in_(owners))
    conn.execute(update(sync_sources).where(*source).values(lease_until=now))


def renew(conn: Connection, jobs: Sequence[SyncJob], *, until: int) -> int:
    """Extend the leases of these claims that still hold (each its own owner and attempt) to ``until``."""
    renewed = 0
    for job in jobs:
        held = (j.pk == job.pk, j.state == "running", j.lease_owner == job.owner, j.attempts == job.attempts)
        renewed += conn.execute(update(sync_jobs).where(*held).values(lease_until=until)).rowcount
    return renewed
