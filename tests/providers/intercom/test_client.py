"""The Intercom pull client against the fake Intercom (``fake.py``), in process, on a virtual clock."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx2
import pytest

from kbms.providers.intercom import IntercomProvider
from kbms.providers.intercom.client import IntercomClient, search_query
from kbms.providers.pull import Listed, ProviderRefused, ProviderUnreachable, SourceConfig
from tests.providers.intercom.fake import FakeIntercom
from tests.support.clock import VirtualClock

pytestmark = pytest.mark.anyio

T0 = 1_650_000_000  # conversations' times, unix seconds
MICROS = 1_000_000


def source(fake: FakeIntercom, **options: object) -> SourceConfig:
    return SourceConfig("intercom", fake.app_id, fake.token, **options)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def fake(clock: VirtualClock) -> FakeIntercom:
    return FakeIntercom(clock=clock.now)


@pytest.fixture
async def client(fake: FakeIntercom, clock: VirtualClock) -> AsyncIterator[IntercomClient]:
    puller = IntercomProvider().puller
    opened = puller.client(source(fake), transport=fake.transport(), timing=clock.timing)
    assert isinstance(opened, IntercomClient)
    yield opened
    await opened.aclose()


async def list_all(client: IntercomClient, since: int | None = None) -> list[Listed]:
    listed: list[Listed] = []
    position = None
    while True:
        page = await client.list_changed(since=since, position=position)
        listed.extend(page.items)
        if page.done:
            assert page.position is None
            return listed
        assert page.position is not None
        position = page.position


async def test_check_accepts_the_workspace_the_token_opens(client: IntercomClient, fake: FakeIntercom) -> None:
    await client.check()
    assert fake.hits[-1].path == "/me"


async def test_check_refuses_a_token_of_another_app(fake: FakeIntercom, clock: VirtualClock) -> None:
    client = IntercomClient(
        SourceConfig("intercom", "otherapp", fake.token), transport=fake.transport(), timing=clock.timing
    )
    with pytest.raises(ProviderRefused, match=r"'otherapp'.*'fakeapp'") as raised:
        await client.check()
    assert fake.token not in str(raised.value)


async def test_a_wrong_token_is_refused_at_once(fake: FakeIntercom, clock: VirtualClock) -> None:
    wrong = "wrong-token-123456"
    client = IntercomClient(
        SourceConfig("intercom", fake.app_id, wrong), transport=fake.transport(), timing=clock.timing
    )
    with pytest.raises(ProviderRefused, match=r"HTTP 401 \(unauthorized\)") as raised:
        await client.list_changed(since=None, position=None)
    assert wrong not in str(raised.value)
    assert len(fake.hits) == 1


async def test_the_client_sends_the_token_and_pins_the_version(fake: FakeIntercom, clock: VirtualClock) -> None:
    seen: list[httpx2.Request] = []
    network = fake.transport()

    async def spy(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return await network.handle_async_request(request)

    transport = httpx2.MockTransport(spy)
    client = IntercomClient(source(fake), transport=transport, timing=clock.timing)
    await client.check()
    assert seen[0].headers["authorization"] == f"Bearer {fake.token}"
    assert seen[0].headers["intercom-version"] == "2.16"
    assert str(seen[0].url) == "https://api.intercom.io/me"


async def test_listing_walks_every_page_once(client: IntercomClient, fake: FakeIntercom) -> None:
    for n in range(400):
        fake.add(f"c{n}", updated_at=T0 + n % 37)
    listed = await list_all(client)
    assert sorted(item.external_id for item in listed) == sorted(fake.conversations)
    assert len(listed) == 400
    searches = [hit for hit in fake.hits if hit.path == "/conversations/search"]
    assert len(searches) == 3  # 150 a page
    item = next(item for item in listed if item.external_id == "c5")
    assert item.updated_at == (T0 + 5) * MICROS


async def test_since_lists_what_changed_at_or_after_it(client: IntercomClient, fake: FakeIntercom) -> None:
    for n in range(10):
        fake.add(f"c{n}", updated_at=T0 + n)
    # The fake reads ">" strictly: the conversation updated in the very second of ``since`` comes from "=".
    listed = await list_all(client, since=(T0 + 6) * MICROS + 250_000)
    assert [item.external_id for item in listed] == ["c6", "c7", "c8", "c9"]


def test_the_query_asks_for_greater_or_equal_and_no_filter_lists_all() -> None:
    query = search_query(T0 * MICROS + 5)
    assert query["operator"] == "OR"
    assert {(f["field"], f["operator"], f["value"]) for f in query["value"]} == {
        ("updated_at", ">", T0),
        ("updated_at", "=", T0),
    }
    assert "updated_at" not in json.dumps(search_query(None))


async def test_a_conversation_updated_mid_listing_is_not_missed(client: IntercomClient, fake: FakeIntercom) -> None:
    for n in range(300):
        fake.add(f"c{n:03}", updated_at=T0 + n)
    first = await client.list_changed(since=T0 * MICROS, position=None)
    fake.update("c000", updated_at=T0 + 1000)  # already listed: moves behind the cursor's end
    rest = await list_all_from(client, T0 * MICROS, first.position)
    ids = [item.external_id for item in (*first.items, *rest)]
    assert set(ids) == set(fake.conversations)


async def list_all_from(client: IntercomClient, since: int, position: str | None) -> list[Listed]:
    listed: list[Listed] = []
    while position is not None:
        page = await client.list_changed(since=since, position=position)
        listed.extend(page.items)
        position = page.position
    return listed


async def test_fetch_gives_the_conversation_as_received_and_it_maps(client: IntercomClient, fake: FakeIntercom) -> None:
    fake.add("c1", updated_at=T0, parts=3)
    fetched = await client.fetch(Listed("c1", T0 * MICROS))
    assert not fetched.deleted
    snapshot = IntercomProvider().parse_push(fetched.body, workspace=fake.app_id, default_workspace="default")
    assert (snapshot.workspace, snapshot.external_id) == (fake.app_id, "c1")
    assert len(snapshot.messages) == 4  # the opening message and its three replies
    assert fake.hits[-1].path == "/conversations/c1"


async def test_over_500_parts_the_provider_says_more_than_it_returns(
    client: IntercomClient, fake: FakeIntercom
) -> None:
    fake.add("long", updated_at=T0, parts=620)
    fetched = await client.fetch(Listed("long", None))
    listing = json.loads(fetched.body)["conversation_parts"]
    assert (listing["total_count"], len(listing["conversation_parts"])) == (620, 500)
    assert listing["conversation_parts"][0]["id"] == "long-p121"  # the 500 newest


async def test_a_404_is_a_deletion_with_intercoms_body(client: IntercomClient, fake: FakeIntercom) -> None:
    fake.add("c1", updated_at=T0)
    fake.delete("c1")
    fetched = await client.fetch(Listed("c1", None))
    assert fetched.deleted
    assert json.loads(fetched.body)["errors"][0]["code"] == "not_found"


async def test_unreachable_base_url(fake: FakeIntercom, clock: VirtualClock) -> None:
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    client = IntercomClient(source(fake, base_url="http://127.0.0.1:9"), timing=clock.timing)
    with pytest.raises(ProviderUnreachable, match=r"127\.0\.0\.1 did not answer GET /me.*after 5 attempts"):
        await client.check()
    assert client.stats.requests == 5
    assert client.stats.retries == 4
    await client.aclose()


@pytest.mark.parametrize("fault", ["garbage", "wrong", "503", "timeout", "reset"])
async def test_a_provider_that_keeps_failing_is_unreachable_after_retries(
    client: IntercomClient, fake: FakeIntercom, fault: str
) -> None:
    fake.outage = fault
    with pytest.raises(ProviderUnreachable) as raised:
        await client.list_changed(since=None, position=None)
    assert "after 5 attempts" in str(raised.value)
    assert len(fake.hits) == 5
    assert client.stats.retries == 4
    assert fake.token not in str(raised.value)


async def test_a_passing_failure_is_retried_away(client: IntercomClient, fake: FakeIntercom) -> None:
    fake.add("c1", updated_at=T0)
    fake.inject("502", "timeout", "garbage")
    fetched = await client.fetch(Listed("c1", None))
    assert not fetched.deleted
    assert [hit.status for hit in fake.hits] == [502, 0, 200, 200]  # the garbage came as a 200


async def test_a_429_is_waited_out_until_the_reset(
    client: IntercomClient, fake: FakeIntercom, clock: VirtualClock
) -> None:
    fake.add("c1", updated_at=T0)
    clock.advance(3.0)  # mid-window
    fake.spend(fake.limit)  # another client of the app spent this window
    fetched = await client.fetch(Listed("c1", None))
    assert not fetched.deleted
    assert [hit.status for hit in fake.hits] == [429, 200]
    assert fake.window_of(fake.hits[1].at) == fake.window_of(fake.hits[0].at) + 1
    assert client.stats.rate_limited == 1
    assert client.stats.retries == 0


@pytest.mark.parametrize(
    ("concurrency", "skew"),
    [(1, 0.0), (8, 0.0), (8, 1.5), (8, -30.0)],
    ids=["sequential", "concurrent", "intercom-1.5s-ahead", "intercom-30s-behind"],
)
async def test_a_long_run_uses_the_budget_without_tripping_it(
    clock: VirtualClock, concurrency: int, skew: float
) -> None:
    # Intercom's clock may differ from ours: its resets are absolute, read on our clock through its Date headers.
    fake = FakeIntercom(clock=lambda: clock.now() + skew, limit=25)
    for n in range(600):
        fake.add(f"c{n}", updated_at=T0 + n, parts=2)
    client = IntercomClient(source(fake), transport=fake.transport(), timing=clock.timing)
    queue: asyncio.Queue[Listed | None] = asyncio.Queue()

    async def fetcher() -> None:
        while (item := await queue.get()) is not None:
            await client.fetch(item)

    workers = [asyncio.create_task(fetcher()) for _ in range(concurrency)]
    for item in await list_all(client):
        queue.put_nowait(item)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    await client.aclose()

    first, last = fake.window_of(fake.hits[0].at), fake.window_of(fake.hits[-1].at)
    full = range(first, last)  # every window but the last, which the run may not have needed in full
    assert len(full) >= 20
    for index in full:
        window = fake.windows[index]
        assert window.limited <= 1
        assert window.served >= 0.9 * fake.limit
    assert sum(fake.windows[index].served for index in full) >= 0.9 * fake.limit * len(full)
    assert len([hit for hit in fake.hits if hit.status == 200]) == 604  # 4 search pages, 600 retrieves


async def test_the_ceiling_holds_under_a_generous_budget(fake: FakeIntercom, clock: VirtualClock) -> None:
    fake.limit = 1000
    for n in range(10):
        fake.add(f"c{n}", updated_at=T0 + n)
    client = IntercomClient(source(fake, max_requests_per_minute=40), transport=fake.transport(), timing=clock.timing)
    for _ in range(10):
        for n in range(10):
            await client.fetch(Listed(f"c{n}", None))
    times = [hit.at for hit in fake.hits]
    assert len(times) == 100
    assert all(later - earlier >= 60.0 for earlier, later in zip(times, times[40:], strict=False))
    await client.aclose()


async def test_no_token_in_any_message_or_log_record(
    fake: FakeIntercom, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    fake.add("c1", updated_at=T0)
    client = IntercomClient(source(fake), transport=fake.transport(), timing=clock.timing)
    fake.inject("500", "timeout", "reset", "garbage")
    await client.fetch(Listed("c1", None))
    fake.outage = "503"
    with pytest.raises(ProviderUnreachable) as unreachable:
        await client.check()
    messages.append(str(unreachable.value))
    fake.outage = None
    fake.spend(fake.limit)
    await client.fetch(Listed("c1", None))
    refused = IntercomClient(
        SourceConfig("intercom", "otherapp", fake.token), transport=fake.transport(), timing=clock.timing
    )
    with pytest.raises(ProviderRefused) as wrong_app:
        await refused.check()
    messages.append(str(wrong_app.value))
    messages.extend(record.getMessage() for record in caplog.records)
    messages.extend(repr(record.args) for record in caplog.records)
    assert any("rate limited" in message for message in messages)
    assert all(fake.token not in message for message in messages)
    assert fake.token not in repr(source(fake))
