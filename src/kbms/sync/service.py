"""Syncing inside ``kbms serve``: a sweep of each source every ``KBMS_SYNC_INTERVAL`` seconds, the fetch queue worked
in between, and webhooks turned into hints (``hint``): a verified webhook about a conversation of a configured
source queues a fetch of it, due a few seconds later, so that several webhooks about one conversation make one
fetch and the stored copy converges to the provider's full state.

Every process of ``kbms serve --workers N`` runs one. On PostgreSQL the database shares the work out: sweeps take
the source's listing lease (``SyncStore.lease_source``), so one process lists a source at a time, and claims take
jobs under a lease with ``FOR UPDATE SKIP LOCKED``, so each job runs once. On SQLite one process does the work
(``exclusive``: it holds a lock on a file beside the database; the others take over when it ends): every write
goes through the one writer's lock, so a second syncing process would only wait for it. A pass asked for
(``sweep``) runs in the process asked, holder or not; the leases keep it exact.

A pass that fails (a provider that refuses the token, or cannot be reached) is recorded on its source (``GET
/internal/sources``) and logged without the token; the service tries again at the next sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kbms.providers import Provider
from kbms.providers.pull import Listed, ProviderRefused, ProviderUnreachable, PullClient, SourceConfig, Timing
from kbms.storage.base import Store
from kbms.sync.policy import DEFAULT_POLICY, SECOND, WALL_CLOCK, SyncPolicy, owner_name
from kbms.sync.runner import Pass

log = logging.getLogger(__name__)

HINT_DELAY = 2.0  # seconds a hinted fetch waits, so that a burst of webhooks about one conversation makes one fetch
POLL = 5.0  # seconds between looks at the queue when nothing wakes the service (hints taken by another process)


@dataclass(frozen=True, slots=True)
class Source:
    config: SourceConfig
    provider: Provider


class SyncService:
    def __init__(
        self,
        store: Store,
        sources: Sequence[SourceConfig],
        providers: Mapping[str, Provider],
        *,
        interval: float,
        policy: SyncPolicy = DEFAULT_POLICY,
        timing: Timing = WALL_CLOCK,
        exclusive: Path | None = None,
    ) -> None:
        """``exclusive``: a lock file; only the process holding it sweeps and works the queue (SQLite)."""
        self.store = store
        self.sources = {(s.provider, s.workspace): Source(s, providers[s.provider]) for s in sources}
        self.interval = interval
        self.policy = policy
        self.timing = timing
        self.owner = owner_name()
        self._wake = {key: asyncio.Event() for key in self.sources}
        self._sweep_now = {key: asyncio.Event() for key in self.sources}
        self._exclusive = exclusive
        self._lock: IO[bytes] | None = None

    def holds_the_work(self) -> bool:
        """Whether this process does the periodic work: always, unless another holds the ``exclusive`` lock."""
        if self._exclusive is None or self._lock is not None:
            return True
        try:
            lock = self._exclusive.open("ab")
        except OSError as exc:  # a directory kbms may not write to: no lock to share, so this process works
            log.warning("sync: cannot open %s (%s); this process syncs without it", self._exclusive, exc.strerror)
            self._exclusive = None
            return True
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the OS lets go of it when this process ends
        except OSError:
            lock.close()
            return False
        self._lock = lock
        log.info("sync: this process does the sync work for this SQLite database")
        return True

    def release_the_work(self) -> None:
        """Let another process take the periodic work up (the service stops)."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    async def hint(self, provider: str, workspace: str | None, external_id: str) -> bool:
        """A webhook said this conversation changed: queue a fetch of it, if it is a configured source's."""
        if workspace is None or (provider, workspace) not in self.sources:
            return False
        due = int((self.timing.now() + HINT_DELAY) * SECOND)
        hinted = Listed(external_id, None)  # its version unknown: its fetch is never skipped
        await self.store.enqueue(provider, workspace, [hinted], "webhook", not_before=due)
        self._wake[provider, workspace].set()
        return True

    def sweep(self, provider: str, workspace: str) -> bool:
        """Start a pass of this source now (``POST /internal/sources/{provider}/{workspace}/sync``)."""
        if (provider, workspace) not in self.sources:
            return False
        self._sweep_now[provider, workspace].set()
        self._wake[provider, workspace].set()
        return True

    def wake(self, provider: str, workspace: str) -> None:
        """Look at this source's queue now (dead letters were queued again)."""
        if (provider, workspace) in self._wake:
            self._wake[provider, workspace].set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The service, for as long as the block runs (``kbms serve``'s lifespan)."""
        tasks = [asyncio.create_task(self._source_loop(key), name=f"sync {key[0]}/{key[1]}") for key in self.sources]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.release_the_work()

    async def _source_loop(self, key: tuple[str, str]) -> None:
        source = self.sources[key]
        puller = source.provider.puller
        assert puller is not None  # sources are checked when configured
        client = puller.client(source.config, timing=self.timing)
        next_sweep = self.timing.now()
        try:
            while True:
                working = self.holds_the_work()
                asked = self._sweep_now[key].is_set()
                sweeping = asked or (working and self.timing.now() >= next_sweep)
                self._sweep_now[key].clear()
                self._wake[key].clear()
                if working or asked:
                    await self._pass(source, client, listing=sweeping)
                if sweeping:
                    next_sweep = self.timing.now() + self.interval
                wait = max(0.0, min(POLL, next_sweep - self.timing.now()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake[key].wait(), timeout=wait)
        finally:
            await client.aclose()

    async def _pass(self, source: Source, client: PullClient, *, listing: bool) -> None:
        name = f"{source.config.provider}/{source.config.workspace}"
        try:
            report = await Pass(
                self.store,
                source.provider,
                source.config,
                client,
                policy=self.policy,
                timing=self.timing,
                owner=self.owner,
                listing=listing,
            ).run()
        except (ProviderRefused, ProviderUnreachable) as exc:
            log.warning("sync of %s failed: %s", name, exc)  # messages name hosts and statuses, never tokens
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sync of %s failed", name)
        else:
            if report.listed or report.fetched:
                log.info(
                    "sync of %s: %d listed, %d fetched, %d stored, %d dead letters",
                    name,
                    report.listed,
                    report.fetched,
                    report.stored,
                    report.dead,
                )
