"""The Zendesk pull client against the fake Zendesk (``fake.py``), in process and on a virtual clock: listing by
the incremental export, fetching comments with their users, deletions, authentication, pacing and failures."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator

import httpx2
import pytest

from kbms.model import ConversationSnapshot
from kbms.providers import get_provider
from kbms.providers.pull import Listed, ProviderRefused, ProviderUnreachable, PullClient, SourceConfig
from tests.providers.zendesk.fake import GARBAGE, TOO_RECENT, WRONG_SHAPE, FakeZendesk, build_app
from tests.providers.zendesk.fake_api import EXPORT, Fault
from tests.support.clock import VirtualClock

pytestmark = pytest.mark.anyio
CUSTOMER, AGENT = 20, 30
COMMENTS = "/api/v2/tickets/{}/comments"


@pytest.fixture
def zendesk() -> FakeZendesk:
    fake = FakeZendesk(VirtualClock())
    fake.add_user(CUSTOMER, "Carla Customer", "end-user", email="carla@example.com")
    fake.add_user(AGENT, "Andy Agent", "agent")
    return fake


@pytest.fixture
async def client(zendesk: FakeZendesk) -> AsyncIterator[PullClient]:
    client = connect(zendesk)
    yield client
    await client.aclose()


def connect(zendesk: FakeZendesk, *, bearer: bool = False, token: str | None = None) -> PullClient:
    email = None if bearer else zendesk.email
    token = token or (zendesk.oauth_token if bearer else zendesk.api_token)
    source = SourceConfig(provider="zendesk", workspace="acme", token=token, email=email)
    puller = get_provider("zendesk").puller
    assert puller is not None
    transport = httpx2.ASGITransport(app=build_app(zendesk))
    return puller.client(source, transport=transport, timing=zendesk.clock.timing)


def tickets(zendesk: FakeZendesk, ids: range, *, comments: int = 1) -> None:
    """Tickets under a second apart (some sharing one), then a while for them to leave the most recent minute."""
    for ticket_id in ids:
        zendesk.put_ticket(ticket_id, subject=f"Ticket {ticket_id}", requester_id=CUSTOMER, assignee_id=AGENT)
        for n in range(comments):
            zendesk.add_comment(ticket_id, CUSTOMER if n % 2 == 0 else AGENT, f"comment {n} of {ticket_id}")
        zendesk.clock.advance(0.4)
    zendesk.clock.advance(120)


async def list_all(
    client: PullClient, *, since: int | None = None, position: str | None = None
) -> tuple[list[Listed], str | None]:
    items: list[Listed] = []
    while True:
        page = await client.list_changed(since=since, position=position)
        items.extend(page.items)
        position = page.position
        if page.done:
            return items, position


def snapshot(body: bytes) -> ConversationSnapshot:
    return get_provider("zendesk").parse_push(body, workspace="acme", default_workspace="default")


async def test_full_listing_over_several_export_pages(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 2501), comments=0)
    items, position = await list_all(client)
    assert [item.external_id for item in items] == [str(n) for n in range(1, 2501)]  # (generated_timestamp, id)
    exports = zendesk.hits(EXPORT)
    assert len(exports) == 3  # 1000 a page, the most the export gives
    assert "start_time" in exports[0].query
    assert all("cursor" in hit.query and "start_time" not in hit.query for hit in exports[1:])
    assert position is not None
    assert items[0].updated_at is not None
    assert json.loads(items[0].prefetched or b"{}")["subject"] == "Ticket 1"  # the export's ticket, kept


async def test_resume_from_position_lists_only_what_changed(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 6))
    _items, position = await list_all(client)
    assert position is not None
    zendesk.add_comment(2, AGENT, "a reply")
    zendesk.put_ticket(7, subject="new", requester_id=CUSTOMER)
    zendesk.clock.advance(120)
    again, moved = await list_all(client, position=position)
    assert [item.external_id for item in again] == ["2", "7"]
    assert moved not in (None, position)
    # A position is all it takes: another client (the next process) resumes from it too.
    other = connect(zendesk)
    assert [item.external_id for item in (await list_all(other, position=position))[0]] == ["2", "7"]
    await other.aclose()
    # Caught up: nothing new, and the position holds.
    assert await list_all(client, position=moved) == ([], moved)


async def test_start_time_is_never_within_the_last_minute(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 4))
    now = zendesk.clock.now()
    items, _ = await list_all(client, since=int(now * 1_000_000))  # since "now": Zendesk would refuse it
    assert int(zendesk.hits(EXPORT)[0].query["start_time"]) <= now - 60
    assert items == []  # the tickets are older than the start
    zendesk.fail(TOO_RECENT, path=EXPORT)
    page = await client.list_changed(since=0, position=None)  # a clock running ahead of Zendesk's
    assert (page.items, page.position, page.done) == ((), None, True)


async def test_deleted_tickets_are_fetched_as_deletions(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 4))
    zendesk.delete_ticket(2)
    zendesk.clock.advance(120)
    items, _ = await list_all(client)
    assert [item.external_id for item in items] == ["1", "3", "2"]  # the deletion moved it to the end
    fetched = await client.fetch(items[-1])
    assert fetched.deleted
    assert json.loads(fetched.body)["status"] == "deleted"
    assert zendesk.hits(COMMENTS.format(2)) == []  # no comments asked of a deleted ticket
    # Deleted after it was listed: its comments answer 404.
    zendesk.delete_ticket(3)
    gone = await client.fetch(items[1])
    assert (gone.external_id, gone.deleted) == ("3", True)
    # Listed without the ticket (a webhook's hint): the ticket is asked for, and is gone.
    hinted = await client.fetch(Listed(external_id="3", updated_at=None))
    assert hinted.deleted
    live = await client.fetch(Listed(external_id="1", updated_at=None))
    assert not live.deleted
    assert snapshot(live.body).external_id == "1"


async def test_many_comments_over_several_pages_with_users(zendesk: FakeZendesk, client: PullClient) -> None:
    zendesk.add_user(40, "Olga Other", "admin")
    zendesk.put_ticket(9, subject="Long one", requester_id=CUSTOMER, assignee_id=AGENT)
    written = [zendesk.add_comment(9, (CUSTOMER, AGENT, 40)[n % 3], f"message {n}") for n in range(250)]
    zendesk.clock.advance(120)
    items, _ = await list_all(client)
    fetched = await client.fetch(items[0])
    pages = zendesk.hits(COMMENTS.format(9))
    assert len(pages) == 3
    assert all(hit.query["page[size]"] == "100" and hit.query["include"] == "users" for hit in pages)
    assert not fetched.deleted
    body = json.loads(fetched.body)
    assert [c["body"] for c in body["comments"]] == [f"message {n}" for n in range(250)]  # every one, in order
    assert sorted(user["id"] for user in body["users"]) == [CUSTOMER, AGENT, 40]  # side-loaded once each
    got = snapshot(fetched.body)
    assert [m.id for m in got.messages] == [str(c["id"]) for c in written]
    assert got.messages[249].content == "message 249"
    roles = {p.id: p.role for p in got.participants}
    assert roles == {str(CUSTOMER): "customer", str(AGENT): "agent", "40": "agent"}


@pytest.mark.parametrize("bearer", [False, True])
async def test_basic_and_bearer_auth(zendesk: FakeZendesk, bearer: bool) -> None:
    tickets(zendesk, range(1, 3))
    client = connect(zendesk, bearer=bearer)
    await client.check()
    items, _ = await list_all(client)
    await client.fetch(items[0])
    await client.aclose()
    assert {hit.auth for hit in zendesk.requests} == {"bearer" if bearer else "basic"}


@pytest.mark.parametrize("bearer", [False, True])
async def test_wrong_credentials_are_refused(zendesk: FakeZendesk, bearer: bool) -> None:
    client = connect(zendesk, bearer=bearer, token="not-the-token-1234")
    with pytest.raises(ProviderRefused, match="401"):
        await client.check()
    with pytest.raises(ProviderRefused, match="401"):
        await client.list_changed(since=None, position=None)
    await client.aclose()
    assert len(zendesk.requests) == 2  # refused at once, never retried


async def test_agent_token_is_refused_the_export_with_a_hint(zendesk: FakeZendesk, client: PullClient) -> None:
    zendesk.users[zendesk.owner_id]["role"] = zendesk.role = "agent"
    with pytest.raises(ProviderRefused, match="admin"):
        await client.check()
    with pytest.raises(ProviderRefused, match=r"403.*admin"):
        await client.list_changed(since=None, position=None)


async def test_an_anonymous_users_me_is_refused(zendesk: FakeZendesk, client: PullClient) -> None:
    """users/me answers requests without credentials with the anonymous user (a proxy that drops them, say)."""
    zendesk.fail(Fault(200, b'{"user": {"id": null, "name": "Anonymous user", "role": "end-user"}}'))
    with pytest.raises(ProviderRefused, match="anonymous"):
        await client.check()


async def test_429_retry_after_is_honoured_without_spending_a_retry(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 3))
    zendesk.fail(Fault(429, b'{"error":"APIRateLimitExceeded"}', retry_after=37), path=EXPORT)
    items, _ = await list_all(client)
    assert len(items) == 2
    first, second = zendesk.hits(EXPORT)[:2]
    assert second.at - first.at >= 37
    assert (client.stats.rate_limited, client.stats.retries) == (1, 0)
    # The export's own limit, spent by another client of the account: its 429 says when, and is waited out.
    zendesk.spend_exports(10)
    before = zendesk.clock.now()
    await client.list_changed(since=None, position=None)
    assert zendesk.export_limited >= 1
    assert zendesk.hits(EXPORT)[-1].at >= before + 60


async def test_export_never_exceeds_ten_a_minute_over_a_long_run(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 4))
    start = zendesk.clock.now()
    _, position = await list_all(client)
    fetched: list[str] = []
    for round_ in range(45):  # a sync polling as fast as it may, fetching what it lists; only the client moves time
        if round_ % 5 == 0:
            zendesk.add_comment(1 + round_ % 3, AGENT, f"poll {round_}")  # listed once it is a minute old
        page = await client.list_changed(since=None, position=position)
        position = page.position
        fetched += [(await client.fetch(item)).external_id for item in page.items]
    exports = zendesk.hits(EXPORT)
    assert len(exports) == 46
    assert zendesk.export_limited == 0  # paced, never refused
    assert zendesk.max_exports_per_minute() == 10  # the limit used, never passed
    assert exports[40].at - exports[0].at >= 4 * 60  # the 1st, 11th, 21st, ... a minute apart at least
    assert zendesk.clock.now() - start < 5 * 60  # and no slower than it has to be
    assert len(fetched) >= 5
    assert client.stats.rate_limited == 0


async def test_5xx_is_retried_then_unreachable(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 3))
    zendesk.fail(Fault(503), Fault(500), path=EXPORT)
    items, _ = await list_all(client)
    assert len(items) == 2
    assert client.stats.retries == 2
    zendesk.fail(*[Fault(502)] * 20, path=COMMENTS.format(1))
    with pytest.raises(ProviderUnreachable, match=r"acme\.zendesk\.com.*502"):
        await client.fetch(items[0])


@pytest.mark.parametrize("fault", [GARBAGE, WRONG_SHAPE])
async def test_an_answer_that_is_not_zendesk_is_unreachable(
    zendesk: FakeZendesk, client: PullClient, fault: Fault
) -> None:
    tickets(zendesk, range(1, 3))
    zendesk.fail(*[fault] * 20, path=EXPORT)
    with pytest.raises(ProviderUnreachable, match="not its API"):
        await client.list_changed(since=None, position=None)
    zendesk.faults.clear()
    items, _ = await list_all(client)
    zendesk.fail(*[fault] * 20, path=COMMENTS.format(1))
    with pytest.raises(ProviderUnreachable, match="not its API"):
        await client.fetch(items[0])
    zendesk.faults.clear()
    zendesk.fail(Fault(200, b'{"comments": [], "meta": {"has_more": true}}'), path=COMMENTS.format(1))
    with pytest.raises(ProviderUnreachable, match="after_cursor"):
        await client.fetch(items[0])


async def test_the_token_is_never_in_messages_or_logs(zendesk: FakeZendesk, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [zendesk.api_token, zendesk.oauth_token]
    secrets.append(base64.b64encode(f"{zendesk.email}/token:{zendesk.api_token}".encode()).decode())
    tickets(zendesk, range(1, 3))
    messages: list[str] = []
    for bearer in (False, True):
        client = connect(zendesk, bearer=bearer)
        token = zendesk.oauth_token if bearer else zendesk.api_token
        zendesk.faults.clear()
        zendesk.fail(Fault(503), Fault(429, retry_after=1), *[GARBAGE] * 4)
        zendesk.fail(*[Fault(500, b'{"error": "' + token.encode() + b'"}')] * 5)  # an answer quoting the token
        for call in (client.check(), client.list_changed(since=None, position=None)):
            with pytest.raises((ProviderUnreachable, ProviderRefused)) as caught:
                await call
            messages.append(str(caught.value))
        await client.aclose()
        wrong = connect(zendesk, bearer=bearer, token=zendesk.api_token + "x")
        with pytest.raises(ProviderRefused) as refused:
            await wrong.check()
        messages.append(str(refused.value))
        await wrong.aclose()
    text = "\n".join(messages + [record.getMessage() for record in caplog.records])
    assert "503" in text  # the failures are there, named
    for secret in secrets:
        assert secret not in text


async def test_a_comment_cursor_going_round_in_circles_is_unreachable(zendesk: FakeZendesk, client: PullClient) -> None:
    tickets(zendesk, range(1, 2))
    items, _ = await list_all(client)
    same = Fault(200, b'{"comments": [], "meta": {"has_more": true, "after_cursor": "c2FtZQ=="}}')
    zendesk.fail(same, same, same, path=COMMENTS.format(1))
    with pytest.raises(ProviderUnreachable, match="circle"):
        await client.fetch(items[0])
    assert len(zendesk.hits(COMMENTS.format(1))) == 2


async def test_a_404_that_is_not_zendesks_own_is_no_deletion() -> None:
    # A proxy's 404 (or a base URL with a wrong path) must not tombstone the ticket: tombstones are for good.
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(404, json={"message": "no route"})

    source = SourceConfig(provider="zendesk", workspace="acme", token="zd-token", email="owner@acme.example")
    puller = get_provider("zendesk").puller
    assert puller is not None
    client = puller.client(source, transport=httpx2.MockTransport(answer), timing=VirtualClock().timing)
    try:
        with pytest.raises(ProviderUnreachable, match="RecordNotFound"):
            await client.fetch(Listed("12", None))
    finally:
        await client.aclose()
