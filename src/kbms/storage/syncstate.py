"""The sync state contract (issue 15): what the store keeps about pulling from providers, and its value types.

Per source (a provider and a workspace): a checkpoint and a cursor, which only move in the transaction that queues
what they pass (so a crash never leaves a gap), its last pass, running totals, and a lease held by its one lister.
A queue of fetch jobs, one pending job per conversation at most; a job is claimed under a lease (attempts are
counted when claimed, so a job that kills its process is bounded too), then finished, retried later, or buried
among the dead letters, which are kept apart until retried. All times are integer microseconds since the epoch.

Neutral ground, like ``storage.base``: the edges and the use cases may import it; it loads no database.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

JobReason = Literal["backfill", "sweep", "webhook", "completeness"]


class Keep(enum.Enum):
    """A source's cursor left as it is (where None would clear it)."""

    KEEP = "keep"


KEEP = Keep.KEEP


class Queued(Protocol):
    """A conversation to fetch, as a listing (or a webhook) names it: ``kbms.providers.pull.Listed`` is one."""

    @property
    def external_id(self) -> str: ...
    @property
    def updated_at(self) -> int | None: ...  # the version the listing saw; None: unknown (the fetch is never skipped)
    @property
    def prefetched(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class SyncJob:
    """A claimed fetch: running under ``owner``'s lease until ``lease_until``."""

    pk: int
    provider: str
    workspace: str
    external_id: str
    reason: JobReason
    attempts: int  # claims so far, this one included
    owner: str
    lease_until: int
    listed_updated_at: int | None
    prefetched: bytes | None = field(repr=False)
    last_error: str | None  # of the previous attempt


@dataclass(frozen=True, slots=True)
class SyncCounts:
    """Running totals of a source, or what to add to them."""

    listed: int = 0
    fetched: int = 0
    stored: int = 0
    requests: int = 0
    rate_limit_waits: int = 0


NO_COUNTS = SyncCounts()


@dataclass(frozen=True, slots=True)
class SourceState:
    """What the database knows about one source (``GET /internal/sources``)."""

    provider: str
    workspace: str
    checkpoint: int | None
    cursor: str | None
    pass_started_at: int | None
    pass_finished_at: int | None
    pass_outcome: str | None
    last_error: str | None
    totals: SyncCounts
    lease_owner: str | None  # the lister, while ``lease_until`` is ahead
    lease_until: int | None
    pending: int
    running: int
    dead_letters: int
    oldest_queued: int | None  # the least ``listed_updated_at`` of its queued jobs

    @property
    def stored_through(self) -> int | None:
        """Every conversation the source listed as updated up to here is stored (dead letters aside)."""
        if self.checkpoint is None:
            return None
        if self.oldest_queued is None:
            return self.checkpoint
        return min(self.checkpoint, self.oldest_queued - 1)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    provider: str
    workspace: str
    external_id: str
    reason: JobReason
    attempts: int
    last_error: str | None
    first_failed_at: int
    dead_at: int


class SyncStore(Protocol):
    """The sync state; each operation is one transaction. Errors and tokens are the caller's to keep apart: a
    ``last_error`` is stored as given, so it must hold no secret."""

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
        """Queue a fetch of each item, due at ``not_before`` (default: now), and in the same transaction move the
        source's cursor to ``position`` and its checkpoint forward to ``checkpoint`` (never back).

        A conversation already pending keeps one job: the earlier due time, and the newer listing (an unknown
        version counts as the newest: such a job is never skipped).
        """
        ...

    async def claim(
        self, provider: str, workspace: str, *, owner: str, limit: int, now: int, lease: int
    ) -> list[SyncJob]:
        """Up to ``limit`` of the source's jobs that are due (or whose lease expired), oldest due first, now
        running under ``owner``'s lease for ``lease`` microseconds. Concurrent claimers never get the same job."""
        ...

    async def renew(self, jobs: Sequence[SyncJob], *, until: int) -> int:
        """Extend these claims' leases to ``until`` (a fetcher whose batch waits on the provider's pace keeps
        them); how many still held. A claim lost meanwhile stays lost."""
        ...

    async def finish(self, job: SyncJob) -> bool:
        """Remove a done job (only that claim: a job queued meanwhile for the same conversation stays). False
        when the claim was lost (its lease expired and another claimer took the job)."""
        ...

    async def retry_later(self, job: SyncJob, error: str, *, next_attempt_at: int) -> bool:
        """Put a failed job back in the queue, due at ``next_attempt_at`` (joining a job queued meanwhile)."""
        ...

    async def bury(self, job: SyncJob, error: str) -> bool:
        """Move a job that failed for good to the dead letters."""
        ...

    async def dead_letters(
        self, provider: str, workspace: str, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetter]:
        """A source's dead letters by external id, after ``after``."""
        ...

    async def retry_dead_letters(self, provider: str, workspace: str, external_ids: Sequence[str] | None = None) -> int:
        """Queue the source's dead letters again (all, or these), due now and with no attempt counted; how many."""
        ...

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
        """Record a pass as it starts or ends (its times, outcome and error as given), add ``counts`` to the
        totals, and set the cursor to ``position``. ``outcome``: a word of at most 16 characters."""
        ...

    async def add_counts(self, provider: str, workspace: str, counts: SyncCounts) -> None:
        """Add to a source's totals (fetches between passes)."""
        ...

    async def sync_states(self) -> list[SourceState]:
        """Every source the database knows of, by provider and workspace."""
        ...

    async def lease_source(self, provider: str, workspace: str, *, owner: str, now: int, until: int) -> bool:
        """Take (or extend) the source's listing lease until ``until``: False while another owner holds it."""
        ...

    async def release_source(self, provider: str, workspace: str, *, owner: str) -> None:
        """Give the listing lease back, if ``owner`` holds it."""
        ...

    async def lease_holders(self, provider: str, workspace: str) -> set[str]:
        """Who holds a lease on the source now: the owners of its running jobs and of its listing lease."""
        ...

    async def expire_leases(self, provider: str, workspace: str, owners: Sequence[str], *, now: int) -> None:
        """End these owners' leases on the source at ``now`` (they are gone: a killed process), so that their jobs
        and the listing are taken up again at once rather than when the leases would have run out."""
        ...

    async def stored_versions(self, provider: str, workspace: str, external_ids: Sequence[str]) -> dict[str, int]:
        """How far each of these conversations that is stored and live is known complete: its version (the greatest
        ``updated_at`` merged) once a delivery of it arrived after that second had ended, else just under it (an edit
        later in the same second may be missing). A listed conversation complete at the listed version or later
        needs no fetch. (A tombstone has no version: its ``updated_at`` is the deletion's server time.)"""
        ...
