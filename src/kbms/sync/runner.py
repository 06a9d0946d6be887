"""One sync pass over one source: list what changed, queue it, fetch and store each queued conversation.

Listing and fetching run side by side: one lister walks the provider's listing page by page and queues each page's
conversations in the same transaction that moves the source's cursor (``SyncStore.enqueue``), so a crash anywhere
resumes from the last queued page and never leaves a gap; fetchers claim queued jobs under a lease, fetch, store
(``sync.pulled``) and finish them. A listed conversation already stored at the listed version is not fetched:
that, and the provider's own pagination, is what makes a second pass fetch only what changed despite the lookback.

The checkpoint moves once a listing completes, to the time the pass started (everything updated before it has
been listed by then); the next pass lists from ``lookback`` before it, so updates made within the same second as
the checkpoint are listed again rather than lost.

Failures: a provider that refuses the credentials ends the pass (``ProviderRefused``); one that cannot be reached
ends it when listing (``ProviderUnreachable``), and puts a fetch back in the queue with backoff, until
``max_attempts`` claims have failed and the job becomes a dead letter. A payload the mapper refuses is kept in the
ledger as rejected (``kbms reprocess`` can recover it after a mapper fix) and its job is a dead letter at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from kbms.errors import StorageUnavailable
from kbms.ingest import IngestOutcome, Refused
from kbms.providers import Provider
from kbms.providers.pull import Listed, ProviderRefused, ProviderUnreachable, PullClient, SourceConfig, Timing
from kbms.storage.base import Store
from kbms.storage.syncstate import KEEP, JobReason, SourceState, SyncCounts, SyncJob
from kbms.sync.policy import DEFAULT_POLICY, SECOND, WALL_CLOCK, PassReport, SyncPolicy, is_gone, owner_name
from kbms.sync.pulled import Tombstoned, store_pulled

log = logging.getLogger(__name__)


class Pass:
    """One pass; ``run()`` once."""

    def __init__(
        self,
        store: Store,
        provider: Provider,
        source: SourceConfig,
        client: PullClient,
        *,
        full: bool = False,
        listing: bool = True,
        policy: SyncPolicy = DEFAULT_POLICY,
        timing: Timing = WALL_CLOCK,
        owner: str | None = None,
        progress: Callable[[PassReport], None] | None = None,
    ) -> None:
        self.store, self.provider, self.source, self.client = store, provider, source, client
        self.full, self.listing, self.policy, self.timing = full, listing, policy, timing
        self.owner = owner or owner_name()
        self.report = PassReport(source.provider, source.workspace)
        self._progress = progress or (lambda _report: None)
        self._listing = asyncio.Event()  # set when the listing is over (or is another process's)
        self._queued = asyncio.Event()  # set when a page was queued: idle fetchers look again
        self._retry_due = 0  # when the last fetch this pass put back in the queue falls due (microseconds)
        self._drain_until: int | None = None  # with ``drain``: how long to wait for the source's other fetches

    def _now(self) -> int:
        return int(self.timing.now() * SECOND)

    async def run(self) -> PassReport:
        """The pass: with ``listing``, a sweep (checked credentials, the listing, the queue, recorded on the
        source); without, the queue's due jobs only (the service's work between sweeps)."""
        await self._reclaim()
        if not self.listing:
            self._listing.set()
            before = self.client.stats.requests, self.client.stats.rate_limit_waits
            try:
                await self._fetch_all()
            finally:
                await asyncio.shield(self._release())
                await asyncio.shield(self.store.add_counts(*self._key, self._counts(before)))
            return self.report
        # Resuming a listing an earlier pass did not finish, this pass continues it: it keeps that pass's start,
        # to which the checkpoint moves when the listing completes (what changed since then is listed by now).
        state = await self._source_state()
        unfinished = state is not None and state.pass_outcome not in (None, "ok", "dead_letters")
        resuming = not self.full and unfinished and state is not None and state.cursor is not None
        started = state.pass_started_at if resuming and state is not None and state.pass_started_at else self._now()
        await self.store.record_pass(*self._key, started_at=started, outcome="running")
        before = self.client.stats.requests, self.client.stats.rate_limit_waits
        outcome, error = "failed", None
        try:
            await self.client.check()  # inside the recorded pass: a refused token shows on the source
            async with asyncio.TaskGroup() as group:
                group.create_task(self._list(started))
                group.create_task(self._fetch_all())
            outcome = "dead_letters" if self.report.dead else "ok"
        except* ProviderUnreachable as failures:
            outcome, error = "unreachable", str(failures.exceptions[0])
            raise failures.exceptions[0] from None
        except* ProviderRefused as failures:
            outcome, error = "refused", str(failures.exceptions[0])
            raise failures.exceptions[0] from None
        except* Exception as failures:
            first = failures.exceptions[0]
            outcome, error = "failed", type(first).__name__
            raise first from None
        finally:
            await asyncio.shield(self._release())
            finished = self._now()
            record = self.store.record_pass(
                *self._key,
                started_at=started,
                finished_at=finished,
                outcome=outcome,
                error=error,
                counts=self._counts(before),
            )
            await asyncio.shield(record)
        return self.report

    async def _others_queued(self) -> bool:
        """With ``drain``, whether the source still has fetches queued (and the wait has not run out); the count is
        left in the report."""
        if not self.policy.drain or not self.report.listing_done:
            return False
        state = await self._source_state()
        self.report.left_queued = 0 if state is None else state.pending + state.running
        if self._drain_until is None:
            self._drain_until = self._now() + int(self.policy.lease * SECOND)
        return self.report.left_queued > 0 and self._now() < self._drain_until

    async def _release(self) -> None:
        """Give back what this pass claimed and did not finish (it ends by an error, or is cancelled): claimable at
        once, by the next pass of this process or by another, rather than when the leases run out."""
        await self.store.expire_leases(*self._key, [self.owner], now=self._now())

    async def _reclaim(self) -> None:
        """Take up at once what a killed process of this host left leased: its fetches and the listing."""
        holders = await self.store.lease_holders(*self._key)
        gone = [owner for owner in holders if owner != self.owner and is_gone(owner)]
        if gone:
            await self.store.expire_leases(*self._key, gone, now=self._now())

    @property
    def _key(self) -> tuple[str, str]:
        return self.source.provider, self.source.workspace

    def _counts(self, before: tuple[int, int]) -> SyncCounts:
        return SyncCounts(
            listed=self.report.listed,
            fetched=self.report.fetched,
            stored=self.report.stored,
            requests=self.client.stats.requests - before[0],
            rate_limit_waits=self.client.stats.rate_limit_waits - before[1],
        )

    async def _fetch_all(self) -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(self.policy.concurrency):
                group.create_task(self._fetch_queued())

    async def _source_state(self) -> SourceState | None:
        key = (self.source.provider, self.source.workspace)
        return next((s for s in await self.store.sync_states() if (s.provider, s.workspace) == key), None)

    async def _list(self, started: int) -> None:
        """List what changed and queue it. A cursor left by an interrupted pass is resumed (the queries are the same:
        the checkpoint has not moved since); a full pass keeps its cursor to itself, so that a later sweep never
        resumes a listing of another query. A cursor the provider no longer takes is dropped once, and the listing
        starts again from the checkpoint's lookback."""
        key = (self.source.provider, self.source.workspace)
        lease = int(self.policy.lease * SECOND)
        try:
            waited = False
            while not await self.store.lease_source(*key, owner=self.owner, now=self._now(), until=self._now() + lease):
                if not self.full:
                    return  # another process lists this source: this one only fetches what is queued
                # A full pass was asked for: its listing starts once the other one ends (or its lease runs out).
                if not waited:
                    log.info("sync of %s/%s: another process is listing; the full listing waits for it", *key)
                    waited = True
                await self.timing.sleep(1.0)
            state = await self._source_state()
            checkpoint = None if self.full or state is None else state.checkpoint
            position = None if self.full or state is None else state.cursor
            since = None if checkpoint is None else checkpoint - int(self.policy.lookback * SECOND)
            reason: JobReason = "backfill" if checkpoint is None else "sweep"
            resumed = position is not None
            while True:
                try:
                    page = await self.client.list_changed(since=since, position=position)
                except ProviderUnreachable:
                    if not resumed:
                        raise
                    log.warning("sync of %s/%s: the saved cursor was refused; listing again", *key)
                    resumed, position = False, None
                    await self.store.enqueue(*key, [], reason, position=None)
                    continue
                resumed = False
                todo = await self._not_stored(page.items)
                self.report.listed += len(page.items)
                self.report.skipped += len(page.items) - len(todo)
                # A full pass's positions are not saved until it completes: they belong to its own query.
                keep = KEEP if self.full and not page.done else page.position
                await self.store.enqueue(*key, todo, reason, not_before=self._now(), position=keep)
                self._queued.set()
                self._progress(self.report)
                if page.done:
                    break
                position = page.position
                await self.store.lease_source(*key, owner=self.owner, now=self._now(), until=self._now() + lease)
            await self.store.enqueue(*key, [], reason, checkpoint=started)
            self.report.listing_done = True
        finally:
            self._listing.set()
            self._queued.set()
            await asyncio.shield(self.store.release_source(*key, owner=self.owner))

    async def _not_stored(self, items: tuple[Listed, ...]) -> list[Listed]:
        """The listed conversations not already stored at the listed version (or later)."""
        known = [item.external_id for item in items if item.updated_at is not None]
        stored = await self.store.stored_versions(self.source.provider, self.source.workspace, known) if known else {}
        return [item for item in items if item.updated_at is None or stored.get(item.external_id, -1) < item.updated_at]

    async def _fetch_queued(self) -> None:
        key = (self.source.provider, self.source.workspace)
        lease = int(self.policy.lease * SECOND)
        while True:
            self._queued.clear()
            jobs = await self.store.claim(
                *key, owner=self.owner, limit=self.policy.claim_batch, now=self._now(), lease=lease
            )
            if jobs:
                # Stored at the listed version since it was queued (by another process that listed it too, or by
                # a run killed before it finished the job): nothing to fetch. One read for the claimed batch.
                listed = tuple(Listed(job.external_id, job.listed_updated_at, job.prefetched) for job in jobs)
                wanted = {item.external_id for item in await self._not_stored(listed)}
                until = min(job.lease_until for job in jobs)
                for index, job in enumerate(jobs):
                    if self._now() > until - lease // 2:
                        # The batch waits on the provider's pace (a long Retry-After, a slow ceiling): keep the
                        # claims that are left, so that no other fetcher takes them up meanwhile.
                        until = self._now() + lease
                        await self.store.renew(jobs[index:], until=until)
                    if job.external_id in wanted:
                        await self._run(job)
                    else:
                        self.report.skipped += 1
                        await self.store.finish(job)
                continue
            if self._listing.is_set() and self._now() >= self._retry_due:
                if await self._others_queued():
                    await self.timing.sleep(1.0)  # due later, or another process's claim: look again
                    continue
                return
            if self._now() < self._retry_due and not self._queued.is_set():
                # A fetch put back in the queue falls due soon: look again then (or when a page is queued).
                await self.timing.sleep(min(self.policy.retry_after, (self._retry_due - self._now()) / SECOND))
                continue
            await self._queued.wait()

    async def _run(self, job: SyncJob) -> None:
        listed = Listed(job.external_id, job.listed_updated_at, job.prefetched)
        try:
            fetched = await self.client.fetch(listed)
        except ProviderUnreachable as exc:
            await self._failed(job, str(exc))
            return
        except (ProviderRefused, StorageUnavailable):
            raise  # the pass's, not this job's
        except Exception as exc:
            # This conversation's alone (an id the provider cannot take, a mapper's bug): it must not stop the
            # others, nor come back to stop the next pass. Named by type: a message may quote the payload.
            log.exception("sync of %s/%s: fetching one conversation failed", *self._key)
            await self._bury(job, f"failed: {type(exc).__name__}")
            return
        self.report.fetched += 1
        workspace = self.source.workspace
        try:
            outcome = await store_pulled(self.store, self.provider, fetched, workspace=workspace, clock=self._at)
        except StorageUnavailable:
            raise
        except Exception as exc:
            log.exception("sync of %s/%s: storing one conversation failed", *self._key)
            await self._bury(job, f"failed: {type(exc).__name__}")
            return
        if isinstance(outcome, Refused):
            self.report.rejected += 1
            await self._bury(job, f"refused: {outcome.error.message}"[:500])
        else:
            self._count(outcome)
            await self.store.finish(job)
        self._progress(self.report)

    async def _bury(self, job: SyncJob, error: str) -> None:
        self.report.dead += 1
        self.report.errors.append(error)
        await self.store.bury(job, error)
        self._progress(self.report)

    def _at(self) -> datetime:
        return datetime.fromtimestamp(self.timing.now(), UTC)

    def _count(self, outcome: IngestOutcome | Tombstoned) -> None:
        if isinstance(outcome, Tombstoned):
            if outcome.result == "deleted":
                self.report.deleted += 1
            else:
                self.report.unchanged += 1
            return
        if outcome.result == "created":
            self.report.created += 1
        elif outcome.result == "updated":
            self.report.updated += 1
        else:
            self.report.unchanged += 1

    async def _failed(self, job: SyncJob, error: str) -> None:
        if job.attempts >= self.policy.max_attempts:
            self.report.dead += 1
            self.report.errors.append(error)
            await self.store.bury(job, error[:500])
            return
        wait = min(self.policy.retry_max, self.policy.retry_after * 2 ** (job.attempts - 1))
        self.report.retried += 1
        due = self._now() + int(wait * SECOND)
        self._retry_due = max(self._retry_due, due)
        await self.store.retry_later(job, error[:500], next_attempt_at=due)
