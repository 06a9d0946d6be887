"""The overview's two aggregates, kept per process so that a page view costs little at a million conversations.

- **Deliveries per minute over 24 hours.** A minute that ended more than ``SETTLE`` ago is final: a delivery is
  stamped when it is received and committed within seconds of it, so nothing more lands in that minute. Those
  minutes are counted once and kept; each view counts only the minutes since (an index range of a few minutes).
  Counting the whole day (0.2-0.6 s at a million deliveries in it) happens on a process's first view and every
  ``RECOUNT`` seconds, which also takes in what changes an old minute: ``kbms reprocess`` reclassifying a refused
  delivery.
- **Conversations per provider and workspace** (an index scan of the live ones, 0.1-0.2 s at a million): when
  counting took longer than ``SLOW``, the counts are kept, and once they are ``COUNTS_TTL`` seconds old a view
  shows them while they are counted again in the background (one count at a time): a view never waits for a
  count but a process's first. A small database is read fresh.

Both are kept by the set of workspaces a viewer may see (an API key's), so no viewer sees another's counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kbms.storage.base import Activity, Store, WorkspaceCount

log = logging.getLogger(__name__)

MINUTE = 60_000_000  # microseconds
DAY = 24 * 60 * MINUTE
SETTLE = 2 * MINUTE
RECOUNT = 600.0  # seconds between counts of the whole day
COUNTS_TTL = 15.0  # seconds
SLOW = 0.02  # seconds: a count this slow is kept (80 ms at a million on SQLite; about 1 ms at ten thousand)
KEPT = 1000  # sets of workspaces kept at most (one per distinct key scope): bounded all the same

Within = frozenset[str] | None


@dataclass(slots=True)
class _Minutes:
    settled: int  # minutes before this (microseconds) are final and kept in ``final``
    final: dict[int, Activity]
    recount_at: float  # monotonic seconds


@dataclass(frozen=True, slots=True)
class Overview:
    counts: list[WorkspaceCount]
    minutes: list[Activity]
    since: int  # the chart's window, microseconds: [since, until)
    until: int


@dataclass(slots=True)
class Tally:
    counts: dict[Within, tuple[float, list[WorkspaceCount]]] = field(default_factory=dict)
    counting: dict[Within, asyncio.Task[list[WorkspaceCount]]] = field(default_factory=dict)  # in the background
    minutes: dict[Within, _Minutes] = field(default_factory=dict)

    async def overview(self, store: Store, within: Within, *, now: int) -> Overview:
        """The aggregates at ``now`` (microseconds, UTC) for a viewer who may see ``within``."""
        until = (now // MINUTE + 1) * MINUTE
        since = until - DAY
        return Overview(
            await self._counts(store, within), await self._minutes(store, within, since, until), since, until
        )

    async def _counts(self, store: Store, within: Within) -> list[WorkspaceCount]:
        kept = self.counts.get(within)
        if kept is None:
            return await self._count(store, within)
        if kept[0] <= time.monotonic() and within not in self.counting:
            task = asyncio.create_task(self._count(store, within), name="console: count conversations")
            self.counting[within] = task
            task.add_done_callback(lambda done: self._counted(within, done))
        return kept[1]

    async def _count(self, store: Store, within: Within) -> list[WorkspaceCount]:
        started = time.monotonic()
        counts = await store.workspace_counts(within=within)
        finished = time.monotonic()
        if finished - started > SLOW:
            _bound(self.counts)
            self.counts[within] = (finished + COUNTS_TTL, counts)
        else:
            self.counts.pop(within, None)  # cheap again (or never slow): read fresh
        return counts

    def _counted(self, within: Within, done: asyncio.Task[list[WorkspaceCount]]) -> None:
        self.counting.pop(within, None)
        if not done.cancelled() and done.exception() is not None:
            # The kept counts stay; the next view past their age tries again. Named by type: no payload in it.
            log.warning("console: counting conversations failed: %s", type(done.exception()).__name__)

    async def _minutes(self, store: Store, within: Within, since: int, until: int) -> list[Activity]:
        clock = time.monotonic()
        kept = self.minutes.get(within)
        if kept is None or kept.recount_at <= clock:
            counted = await store.activity(since=since, until=until, within=within)
            kept = _Minutes(since, {}, clock + RECOUNT)
        else:
            start = max(kept.settled, since)
            counted = [m for m in kept.final.values() if since <= m.minute < start]
            counted += await store.activity(since=start, until=until, within=within)
        settled = max(since, until - MINUTE - SETTLE)  # the current minute is still open
        _bound(self.minutes)
        self.minutes[within] = _Minutes(settled, {m.minute: m for m in counted if m.minute < settled}, kept.recount_at)
        return sorted(counted, key=lambda m: m.minute)


def _bound(kept: dict[Within, Any]) -> None:
    if len(kept) >= KEPT:
        kept.clear()
