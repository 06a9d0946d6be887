"""The sync state over SQL (``storage.syncstate.SyncStore``): each operation one transaction of ``storage.sync`` or
``storage.sync_sources``, on the runners of ``store.SqlStore``, which this is a part of."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import TypeVar

from sqlalchemy import Connection

from kbms.model import micros
from kbms.storage import reads, sync, sync_sources
from kbms.storage.sync import SyncSql
from kbms.storage.syncstate import (
    KEEP,
    NO_COUNTS,
    DeadLetter,
    JobReason,
    Keep,
    Queued,
    SourceState,
    SyncCounts,
    SyncJob,
)

T = TypeVar("T")


class SyncStateStore(abc.ABC):
    """The sync state part of a SQL store: what it needs of the store, then the operations."""

    _sync: SyncSql
    _clock: Callable[[], datetime]

    @abc.abstractmethod
    async def _write(self, job: Callable[[Connection], T]) -> T: ...

    @abc.abstractmethod
    async def _read(self, job: Callable[[Connection], T]) -> T: ...

    @abc.abstractmethod
    async def _read_long(self, job: Callable[[Connection], T]) -> T: ...

    async def enqueue(
        self,
        provider: str,
        workspace: str,
        items: Sequence[Queued],
        reason: JobReason,
        *,
        not_before: int | None = None,
        position: str | Keep | None = KEEP,
        checkpoint: int | None = None,
    ) -> None:
        now = micros(self._clock())
        due = now if not_before is None else not_before
        # A copy: the write may run after the caller goes on (SQLite batches writes).
        job = partial(
            sync.enqueue, self._sync, provider=provider, workspace=workspace, items=tuple(items), reason=reason
        )
        await self._write(partial(job, due=due, now=now, position=position, checkpoint=checkpoint))

    async def claim(
        self, provider: str, workspace: str, *, owner: str, limit: int, now: int, lease: int
    ) -> list[SyncJob]:
        job = partial(sync.claim, self._sync, provider=provider, workspace=workspace, owner=owner, limit=limit)
        return await self._write(partial(job, now=now, lease=lease))

    async def renew(self, jobs: Sequence[SyncJob], *, until: int) -> int:
        return await self._write(partial(sync_sources.renew, jobs=list(jobs), until=until))

    async def finish(self, job: SyncJob) -> bool:
        return await self._write(partial(sync.finish, self._sync, job=job))

    async def retry_later(self, job: SyncJob, error: str, *, next_attempt_at: int) -> bool:
        now = micros(self._clock())
        return await self._write(
            partial(sync.retry_later, self._sync, job=job, error=error, due=next_attempt_at, now=now)
        )

    async def bury(self, job: SyncJob, error: str) -> bool:
        return await self._write(partial(sync.bury, self._sync, job=job, error=error, now=micros(self._clock())))

    async def dead_letters(
        self, provider: str, workspace: str, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetter]:
        job = partial(sync_sources.dead_letters, provider=provider, workspace=workspace, limit=limit, after=after)
        return await self._read(job)

    async def retry_dead_letters(self, provider: str, workspace: str, external_ids: Sequence[str] | None = None) -> int:
        ids = None if external_ids is None else tuple(external_ids)
        job = partial(sync_sources.retry_dead_letters, self._sync, provider=provider, workspace=workspace)
        return await self._write(partial(job, external_ids=ids, now=micros(self._clock())))

    async def record_pass(
        self,
        provider: str,
        workspace: str,
        *,
        started_at: int,
        finished_at: int | None = None,
        outcome: str,
        error: str | None = None,
        counts: SyncCounts = NO_COUNTS,
        position: str | Keep | None = KEEP,
    ) -> None:
        job = partial(sync_sources.record_pass, self._sync, provider=provider, workspace=workspace, counts=counts)
        await self._write(
            partial(
                job, started_at=started_at, finished_at=finished_at, outcome=outcome, error=error, position=position
            )
        )

    async def add_counts(self, provider: str, workspace: str, counts: SyncCounts) -> None:
        job = partial(sync_sources.add_counts, self._sync, provider=provider, workspace=workspace, counts=counts)
        await self._write(job)

    async def sync_states(self) -> list[SourceState]:
        return await self._read_long(sync_sources.sync_states)  # counts the whole queue

    async def lease_source(self, provider: str, workspace: str, *, owner: str, now: int, until: int) -> bool:
        job = partial(sync_sources.lease_source, self._sync, provider=provider, workspace=workspace, owner=owner)
        return await self._write(partial(job, now=now, until=until))

    async def release_source(self, provider: str, workspace: str, *, owner: str) -> None:
        job = partial(sync_sources.release_source, self._sync, provider=provider, workspace=workspace, owner=owner)
        await self._write(job)

    async def lease_holders(self, provider: str, workspace: str) -> set[str]:
        return await self._read(partial(sync_sources.lease_holders, provider=provider, workspace=workspace))

    async def expire_leases(self, provider: str, workspace: str, owners: Sequence[str], *, now: int) -> None:
        job = partial(sync_sources.expire_leases, provider=provider, workspace=workspace, owners=list(owners), now=now)
        await self._write(job)

    async def stored_versions(self, provider: str, workspace: str, external_ids: Sequence[str]) -> dict[str, int]:
        if not external_ids:
            return {}
        job = partial(reads.stored_versions, provider=provider, workspace=workspace, external_ids=external_ids)
        return await self._read(job)
