"""A sync pass (kbms.sync.runner) on both engines, against a small in-memory provider client: what is listed is
queued and stored, a second pass fetches only what changed, deletions tombstone, failures retry and end as dead
letters, a refused payload is kept and dead-lettered, a listing that cannot be reached ends the pass."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from kbms.providers import get_provider
from kbms.providers.pull import (
    ClientStats,
    Fetched,
    Listed,
    ListPage,
    ProviderRefused,
    ProviderUnreachable,
    SourceConfig,
)
from kbms.storage.base import Store
from kbms.sync.policy import SyncPolicy
from kbms.sync.runner import Pass
from tests.support.clock import VirtualClock
from tests.support.helpers import intercom_payload

pytestmark = pytest.mark.anyio
SECOND = 1_000_000
SOURCE = SourceConfig(provider="intercom", workspace="w1", token="not-a-real-token")
POLICY = SyncPolicy(concurrency=3, retry_after=1.0, max_attempts=3)


def later_clock() -> VirtualClock:
    """A virtual clock an hour ahead of the wall clock: what the store queues "now" (a dead letter retried) is due
    by this clock too."""
    return VirtualClock(start=float(int(time.time()) + 3600))


class Provider:
    """What the fake holds: conversations by id, with their update time (seconds) and title."""

    def __init__(self) -> None:
        self.conversations: dict[str, tuple[int, str]] = {}
        self.fetches: list[str] = []
        self.failing: dict[str, int] = {}  # id -> fetches still to fail
        self.listing_down = False
        self.refusing = False
        self.garbage: set[str] = set()
        self.crashing: set[str] = set()  # fetches that fail as no provider error does (a bug, an id it cannot take)
        self.pages_until_down: int | None = None  # listing pages served before the listing goes down

    def put(self, external_id: str, updated_at: int, title: str = "hello") -> None:
        self.conversations[external_id] = (updated_at, title)

    def body(self, external_id: str) -> bytes:
        updated_at, title = self.conversations[external_id]
        payload = intercom_payload(external_id, updated_at=updated_at, title=title)
        return json.dumps(payload).encode()


class Client:
    """A ``PullClient`` over ``Provider``: pages of 3, oldest update first, ``since`` inclusive."""

    PAGE = 3

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.stats = ClientStats()

    async def check(self) -> None:
        if self.provider.refusing:
            raise ProviderRefused("provider refused the credentials (401)")

    async def list_changed(self, *, since: int | None, position: str | None) -> ListPage:
        self.stats.requests += 1
        if self.provider.listing_down or (position is not None and not position.isdigit()):
            raise ProviderUnreachable("provider.test cannot be reached")
        if self.provider.pages_until_down is not None:
            if self.provider.pages_until_down == 0:
                raise ProviderUnreachable("provider.test cannot be reached")
            self.provider.pages_until_down -= 1
        rows = sorted((at, cid) for cid, (at, _) in self.provider.conversations.items())
        rows = [(at, cid) for at, cid in rows if since is None or at * SECOND >= since]
        start = int(position or 0)
        page = rows[start : start + self.PAGE]
        done = start + self.PAGE >= len(rows)
        items = tuple(Listed(cid, at * SECOND) for at, cid in page)
        return ListPage(items, None if done else str(start + self.PAGE), done)

    async def fetch(self, listed: Listed) -> Fetched:
        self.stats.requests += 1
        cid = listed.external_id
        self.provider.fetches.append(cid)
        if cid in self.provider.crashing:
            raise ValueError(f"cannot fetch {cid}")
        if self.provider.failing.get(cid, 0) > 0:
            self.provider.failing[cid] -= 1
            raise ProviderUnreachable("provider.test answered 503")
        if cid not in self.provider.conversations:
            return Fetched(cid, b'{"type":"error.list"}', deleted=True)
        if cid in self.provider.garbage:
            return Fetched(cid, b'{"type": "conversation", "id": "' + cid.encode() + b'"}')  # no created_at
        return Fetched(cid, self.provider.body(cid))

    async def aclose(self) -> None:
        return None


async def run(store: Store, provider: Provider, clock: VirtualClock, *, full: bool = False) -> Any:
    sync_pass = Pass(
        store,
        get_provider("intercom"),
        SOURCE,
        Client(provider),
        full=full,
        policy=POLICY,
        timing=clock.timing,
    )
    return await sync_pass.run()


async def titles(store: Store) -> dict[str, str | None]:
    page = await store.list_conversations(limit=100, cursor=None)
    return {item.external_id: item.subject for item in page.items}


async def source_state(store: Store) -> Any:
    (state,) = await store.sync_states()
    return state


async def test_a_backfill_stores_every_conversation_and_a_second_pass_fetches_only_what_changed(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    started = clock.now()
    for i in range(8):
        provider.put(f"c{i}", 1_700_000_000 + i, f"title {i}")
    report = await run(store, provider, clock)
    assert (report.listed, report.fetched, report.created, report.dead) == (8, 8, 8, 0)
    assert await titles(store) == {f"c{i}": f"title {i}" for i in range(8)}
    state = await source_state(store)
    assert state.checkpoint == int(started * SECOND)  # the pass's start
    assert (state.pending, state.running, state.dead_letters, state.pass_outcome) == (0, 0, 0, "ok")

    clock.advance(600)
    provider.fetches.clear()
    provider.put("c3", int(clock.now()) - 300, "title 3, edited")
    provider.put("c9", int(clock.now()) - 200, "new")
    report = await run(store, provider, clock)
    assert sorted(provider.fetches) == ["c3", "c9"]
    assert (report.created, report.updated) == (1, 1)
    assert (await titles(store))["c3"] == "title 3, edited"


async def test_the_lookback_lists_again_but_fetches_nothing_already_stored(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("a", int(clock.now()) - 100)
    await run(store, provider, clock)
    provider.put("b", int(clock.now()))  # updated in the very second the first pass started
    provider.fetches.clear()
    clock.advance(5)
    report = await run(store, provider, clock)
    assert provider.fetches == ["b"]
    assert report.listed == 2  # "a" is listed again (the lookback), but stored at that version: not fetched
    assert report.skipped == 1
    assert set(await titles(store)) == {"a", "b"}


async def test_a_full_pass_lists_everything_and_fetches_only_what_is_not_stored_at_that_version(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    for i in range(4):
        provider.put(f"c{i}", 1_600_000_000 + i)
    await run(store, provider, clock)
    provider.fetches.clear()
    report = await run(store, provider, clock, full=True)
    assert (report.listed, report.skipped, provider.fetches) == (4, 4, [])


async def test_a_conversation_the_provider_no_longer_has_is_tombstoned(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("gone", 1_600_000_000)
    await run(store, provider, clock)
    del provider.conversations["gone"]
    # Listings never show a deleted conversation; a hint (a webhook) queues its fetch.
    await store.enqueue("intercom", "w1", [Listed("gone", None)], "webhook", not_before=0)
    report = await run(store, provider, clock)
    assert report.deleted == 1
    assert await titles(store) == {}


async def test_failed_fetches_are_retried_with_backoff_then_become_dead_letters(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("flaky", 1_600_000_000)
    provider.put("down", 1_600_000_001)
    provider.failing = {"flaky": 2, "down": 99}
    report = await run(store, provider, clock)
    assert provider.fetches.count("flaky") == 3
    assert provider.fetches.count("down") == POLICY.max_attempts
    assert (report.created, report.dead, report.retried) == (1, 1, 4)
    state = await source_state(store)
    assert (state.pending, state.dead_letters, state.pass_outcome) == (0, 1, "dead_letters")
    (letter,) = await store.dead_letters("intercom", "w1")
    assert letter.external_id == "down"
    assert "503" in (letter.last_error or "")
    assert not any(delay > POLICY.retry_max for delay in clock.slept)

    provider.failing = {}
    assert await store.retry_dead_letters("intercom", "w1") == 1
    report = await run(store, provider, clock)
    assert report.created == 1
    assert set(await titles(store)) == {"flaky", "down"}


async def test_a_payload_the_mapper_refuses_is_kept_and_dead_lettered(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("bad", 1_600_000_000)
    provider.garbage = {"bad"}
    report = await run(store, provider, clock)
    assert (report.rejected, report.dead, report.created) == (1, 1, 0)
    (letter,) = await store.dead_letters("intercom", "w1")
    assert (letter.last_error or "").startswith("refused:")
    kept = await store.unlinked_deliveries(provider="intercom", since=None, after=None, limit=10)
    assert [(entry.kind, entry.outcome) for entry in kept] == [("pull", "rejected")]


async def test_a_listing_that_cannot_be_reached_ends_the_pass_and_moves_no_checkpoint(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("a", 1_600_000_000)
    provider.listing_down = True
    with pytest.raises(ProviderUnreachable):
        await run(store, provider, clock)
    state = await source_state(store)
    assert (state.checkpoint, state.pass_outcome) == (None, "unreachable")
    assert "cannot be reached" in (state.last_error or "")


async def test_refused_credentials_end_the_pass_before_anything_is_stored(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("a", 1_600_000_000)
    provider.refusing = True
    with pytest.raises(ProviderRefused):
        await run(store, provider, clock)
    assert await titles(store) == {}
    state = await source_state(store)
    assert (state.pass_outcome, state.last_error) == ("refused", "provider refused the credentials (401)")


async def test_one_conversation_that_cannot_be_fetched_does_not_stop_the_others(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    for i in range(5):
        provider.put(f"c{i}", int(clock.now()) - 100 + i)
    provider.crashing = {"c2"}
    report = await run(store, provider, clock)
    assert (report.created, report.dead) == (4, 1)
    (letter,) = await store.dead_letters("intercom", "w1")
    assert (letter.external_id, letter.last_error) == ("c2", "failed: ValueError")

    # Later edited and listed again, it is stored, and its dead letter is over.
    provider.crashing = set()
    clock.advance(60)
    provider.put("c2", int(clock.now()) - 1, "fixed")
    report = await run(store, provider, clock)
    assert report.created == 1
    assert await store.dead_letters("intercom", "w1") == []
    assert (await source_state(store)).dead_letters == 0


async def test_a_cursor_the_provider_no_longer_takes_is_dropped_and_the_listing_starts_again(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    for i in range(4):
        provider.put(f"c{i}", int(clock.now()) - 100 + i)
    await store.enqueue("intercom", "w1", [], "sweep", position="expired-cursor")
    report = await run(store, provider, clock)
    assert (report.listed, report.created) == (4, 4)
    state = await source_state(store)
    assert (state.cursor, state.pass_outcome) == (None, "ok")


async def test_an_interrupted_full_pass_leaves_no_cursor_for_a_sweep_and_a_resumed_sweep_keeps_its_start(
    store: Store,
) -> None:
    provider, clock = Provider(), later_clock()
    for i in range(7):
        provider.put(f"c{i}", int(clock.now()) - 100 + i)
    provider.pages_until_down = 1
    with pytest.raises(ProviderUnreachable):
        await run(store, provider, clock, full=True)
    assert (await source_state(store)).cursor is None  # a full pass's cursor is its own

    provider.pages_until_down = 1
    first = clock.now()
    with pytest.raises(ProviderUnreachable):
        await run(store, provider, clock)  # a sweep (the first: a backfill) that stops after a page
    assert (await source_state(store)).cursor == "3"
    clock.advance(30)
    provider.pages_until_down = None
    report = await run(store, provider, clock)
    assert report.listed == 4  # resumed after the first page
    state = await source_state(store)
    assert state.checkpoint == int(first * SECOND)  # the interrupted pass's start, not this one's
    assert set(await titles(store)) == {f"c{i}" for i in range(7)}


async def test_a_draining_pass_waits_for_the_sources_fetches_due_later(store: Store) -> None:
    provider, clock = Provider(), later_clock()
    provider.put("now", int(clock.now()) - 10)
    provider.put("later", int(clock.now()) - 3600)
    await run(store, provider, clock)
    # Edited at a time the next listing does not reach back to (before the lookback): only the queued job brings it.
    provider.put("later", int(clock.now()) - 200, "edited")
    due = int((clock.now() + 30) * SECOND)
    await store.enqueue("intercom", "w1", [Listed("later", None)], "webhook", not_before=due)
    intercom, client = get_provider("intercom"), Client(provider)
    report = await Pass(store, intercom, SOURCE, client, policy=SyncPolicy(drain=True), timing=clock.timing).run()
    assert (report.listed, report.updated, report.left_queued) == (1, 1, 0)
    assert (await titles(store))["later"] == "edited"

    # Without draining, a pass ends with what is not yet due left in the queue.
    provider.put("later", int(clock.now()) - 300, "edited again")
    due = int((clock.now() + 30) * SECOND)
    await store.enqueue("intercom", "w1", [Listed("later", None)], "webhook", not_before=due)
    report = await run(store, provider, clock)
    assert report.updated == 0
    assert (await source_state(store)).pending == 1


async def test_claims_waiting_on_a_slow_pace_are_renewed_so_no_other_fetcher_takes_them(store: Store) -> None:
    clock = later_clock()
    provider = Provider()
    for i in range(4):
        provider.put(f"c{i}", int(clock.now()) - 600 + i)
    policy = SyncPolicy(concurrency=1, claim_batch=4, lease=10.0)
    taken: list[str] = []

    class Paced(Client):
        PAGE = 4  # listed at once: the fetcher claims all four in one batch

        async def fetch(self, listed: Listed) -> Fetched:
            # Each fetch waits on the provider's pace for 40 % of a lease, so the batch outlives its first lease;
            # meanwhile another process claims whatever has expired.
            await clock.timing.sleep(0.4 * policy.lease)
            now = int(clock.now() * 1_000_000)
            stolen = await store.claim("intercom", "w1", owner="another", limit=10, now=now, lease=10**9)
            taken.extend(job.external_id for job in stolen)
            return await super().fetch(listed)

    report = await Pass(
        store, get_provider("intercom"), SOURCE, Paced(provider), policy=policy, timing=clock.timing
    ).run()
    assert taken == []
    assert provider.fetches == ["c0", "c1", "c2", "c3"]
    assert (report.created, report.dead) == (4, 0)


async def test_a_full_pass_waits_for_a_listing_another_process_holds_then_lists_everything(store: Store) -> None:
    clock = later_clock()
    provider = Provider()
    for i in range(5):
        provider.put(f"c{i}", int(clock.now()) - 600 + i)
    now = int(clock.now() * 1_000_000)
    assert await store.lease_source("intercom", "w1", owner="a server", now=now, until=now + 30_000_000)
    report = await run(store, provider, clock, full=True)
    assert report.listed == 5  # once the other listing's lease ran out (it would end sooner by finishing)
    assert sorted(provider.fetches) == [f"c{i}" for i in range(5)]
    assert clock.now() * 1_000_000 >= now + 30_000_000
