"""The overview's tally: a day of deliveries per minute counted once, then only the minutes since the last final
one, with the same result as counting the whole day again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kbms.api.console import tally as tally_module
from kbms.api.console.tally import DAY, MINUTE, Tally
from kbms.storage.base import Activity, WorkspaceCount

pytestmark = pytest.mark.anyio
NOW = 1_765_000_000 * 1_000_000  # microseconds, on a minute's boundary


class Ledger:
    """A Store's two overview reads over deliveries kept as (received_at, rejected), recording each call."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[int, bool]] = []
        self.calls: list[tuple[int, int]] = []

    async def workspace_counts(self, *, within: Any = None) -> list[WorkspaceCount]:
        return [WorkspaceCount("intercom", "w", 1)]

    async def activity(self, *, since: int, until: int, within: Any = None) -> list[Activity]:
        self.calls.append((since, until))
        minutes: dict[int, list[int]] = {}
        for at, rejected in self.deliveries:
            if since <= at < until:
                counts = minutes.setdefault(at // MINUTE * MINUTE, [0, 0])
                counts[0] += 1
                counts[1] += rejected
        return [Activity(m, got, refused) for m, (got, refused) in sorted(minutes.items())]


async def test_later_views_count_only_the_minutes_since_the_last_final_one_and_agree_with_a_full_count() -> None:
    ledger = Ledger()
    ledger.deliveries = [(NOW - k * 7 * MINUTE + 5, k % 3 == 0) for k in range(200)]
    tally = Tally()
    first = await tally.overview(ledger, None, now=NOW)  # type: ignore[arg-type]
    assert ledger.calls == [(first.since, first.until)]
    assert first.until - first.since == DAY

    # Ten minutes later, deliveries arrived in the last minutes (and in the open one); two landed in minutes the
    # first view had counted: the one then open, and one just before it (received then, committed a little later).
    later = NOW + 10 * MINUTE
    ledger.deliveries += [(later - 3 * MINUTE, False), (later - 90_000_000, True), (later + 1, False)]
    ledger.deliveries += [(NOW + 30_000_000, True), (NOW - 20_000_000, False)]
    ledger.calls.clear()
    seen = await tally.overview(ledger, None, now=later)  # type: ignore[arg-type]
    [(since, until)] = ledger.calls
    assert until == seen.until
    assert since > seen.since
    assert until - since <= 14 * MINUTE
    full = await Ledger.activity(ledger, since=seen.since, until=seen.until)
    assert seen.minutes == full  # the same as counting the whole day again
    assert seen.counts == [WorkspaceCount("intercom", "w", 1)]


async def test_viewers_who_may_see_different_workspaces_are_tallied_apart() -> None:
    ledger = Ledger()
    tally = Tally()
    await tally.overview(ledger, frozenset({"a"}), now=NOW)  # type: ignore[arg-type]
    await tally.overview(ledger, frozenset({"b"}), now=NOW)  # type: ignore[arg-type]
    assert set(tally.minutes) == {frozenset({"a"}), frozenset({"b"})}
    assert len(ledger.calls) == 2  # one whole day each: no viewer reads another's tally


async def test_slow_counts_are_shown_while_they_are_counted_again_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tally_module, "SLOW", -1.0)  # every count is slow: kept
    monkeypatch.setattr(tally_module, "COUNTS_TTL", 0.0)  # and at once old enough to count again
    ledger = Ledger()
    counted = [WorkspaceCount("intercom", "w", 1)]

    async def workspace_counts(*, within: Any = None) -> list[WorkspaceCount]:
        ledger.calls.append((-1, -1))
        return list(counted)

    ledger.workspace_counts = workspace_counts  # type: ignore[method-assign]
    tally = Tally()
    assert (await tally.overview(ledger, None, now=NOW)).counts == counted  # type: ignore[arg-type]
    counted[0] = WorkspaceCount("intercom", "w", 2)
    shown = await tally.overview(ledger, None, now=NOW)  # type: ignore[arg-type]
    assert shown.counts == [WorkspaceCount("intercom", "w", 1)]  # the kept counts, without waiting
    await asyncio.gather(*tally.counting.values())  # the count it started meanwhile
    assert tally.counting == {}
    again = await tally.overview(ledger, None, now=NOW)  # type: ignore[arg-type]
    assert again.counts == [WorkspaceCount("intercom", "w", 2)]
    await asyncio.gather(*tally.counting.values())
