"""Pulling end to end, on both engines: the real provider clients against the fake Intercom and Zendesk (in process,
on a virtual clock), through a sync pass into the store: a backfill stores exactly the fake's conversations, a second
pass fetches only what changed, a deletion tombstones, a webhook's hint leads to the full conversation."""

from __future__ import annotations

import json

import httpx2
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kbms.api.sync_metrics import SyncCollector
from kbms.providers import get_provider
from kbms.providers.pull import PullClient, SourceConfig
from kbms.storage.base import Filters, Store
from kbms.sync.policy import PassReport, SyncPolicy
from kbms.sync.runner import Pass
from kbms.sync.service import SyncService
from kbms.webhooks import receive_webhook
from tests.providers.intercom.fake import FakeIntercom
from tests.providers.zendesk.fake import FakeZendesk, build_app
from tests.support.clock import VirtualClock

pytestmark = pytest.mark.anyio
T0 = 1_650_000_000
POLICY = SyncPolicy(concurrency=4)


def intercom_client(fake: FakeIntercom, clock: VirtualClock) -> tuple[SourceConfig, PullClient]:
    source = SourceConfig("intercom", fake.app_id, fake.token)
    puller = get_provider("intercom").puller
    assert puller is not None
    return source, puller.client(source, transport=fake.transport(), timing=clock.timing)


async def sync_intercom(store: Store, fake: FakeIntercom, clock: VirtualClock, *, full: bool = False) -> PassReport:
    source, client = intercom_client(fake, clock)
    try:
        provider = get_provider("intercom")
        return await Pass(store, provider, source, client, full=full, policy=POLICY, timing=clock.timing).run()
    finally:
        await client.aclose()


async def stored(store: Store) -> dict[str, int]:
    """Each live conversation's external id and message count."""
    page = await store.list_conversations(limit=500, cursor=None)
    return {item.external_id: item.message_count for item in page.items}


async def test_an_intercom_backfill_stores_exactly_the_fakes_conversations_then_only_changes(store: Store) -> None:
    clock = VirtualClock(start=T0 + 86_400)
    fake = FakeIntercom(clock=clock.now)
    for i in range(40):
        fake.add(f"{1000 + i}", updated_at=T0 + i * 60, parts=i % 4)
    report = await sync_intercom(store, fake, clock)
    assert (report.listed, report.fetched, report.created, report.dead) == (40, 40, 40, 0)
    assert await stored(store) == {f"{1000 + i}": 1 + i % 4 for i in range(40)}

    fake.hits.clear()
    clock.advance(3600)
    fake.update("1003", updated_at=int(clock.now()) - 60, new_parts=2)
    fake.add("2000", updated_at=int(clock.now()) - 30, parts=1)
    report = await sync_intercom(store, fake, clock)
    assert sorted(fake.retrieved()) == ["1003", "2000"]
    assert (report.created, report.updated) == (1, 1)
    assert (await stored(store))["1003"] == 1 + 3 + 2

    # The sources' totals as /metrics shows them: read from the database (every process adds to the same ones).
    collector = SyncCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update(await store.sync_states())
    text = generate_latest(registry).decode()
    series = f'{{provider="intercom",workspace="{fake.app_id}"}}'
    assert f"kbms_sync_fetched_total{series} 42.0" in text
    assert f"kbms_sync_queue_depth{series} 0.0" in text
    assert f"kbms_sync_failing{series} 0.0" in text
    assert fake.token not in text


async def completeness(store: Store, external_id: str) -> dict[str, object]:
    page = await store.list_conversations(limit=500, cursor=None)
    [item] = [item for item in page.items if item.external_id == external_id]
    body = await store.get_conversation_json(item.id)
    assert body is not None
    return dict(json.loads(body)["completeness"])


async def test_a_conversation_over_500_parts_is_stored_with_what_intercom_returns_and_says_so(store: Store) -> None:
    clock = VirtualClock(start=T0 + 86_400)
    fake = FakeIntercom(clock=clock.now)
    fake.add("big", updated_at=T0, parts=620)
    fake.add("small", updated_at=T0, parts=3)
    report = await sync_intercom(store, fake, clock)
    assert report.created == 2
    assert await stored(store) == {"big": 501, "small": 4}  # the 500 newest parts and the opening message
    # Intercom counts 620 parts and the opening message; kbms holds the opening message and the 500 it returned.
    assert await completeness(store, "big") == {"provider_count": 621, "stored_count": 501, "truncated": True}
    assert await completeness(store, "small") == {"provider_count": 4, "stored_count": 4, "truncated": False}
    cut = await store.list_conversations(limit=10, cursor=None, filters=Filters(truncated=True))
    whole = await store.list_conversations(limit=10, cursor=None, filters=Filters(truncated=False))
    assert ([i.external_id for i in cut.items], [i.external_id for i in whole.items]) == (["big"], ["small"])

    # A webhook about a newer reply counts in its statistics (its conversation_parts count only the new part):
    # the count follows it, and the conversation stays cut short of its oldest parts.
    clock.advance(60)
    fake.update("big", updated_at=int(clock.now()), new_parts=1)
    body = fake.webhook("big", "notif-1")
    outcome = await receive_webhook(store, get_provider("intercom"), body, {}, secret="", verify=False)
    assert getattr(outcome, "result", None) == "updated"
    assert await completeness(store, "big") == {"provider_count": 622, "stored_count": 502, "truncated": True}


async def test_a_webhook_hint_fetches_the_whole_conversation_and_a_deleted_one_is_tombstoned(store: Store) -> None:
    clock = VirtualClock(start=T0 + 86_400)
    fake = FakeIntercom(clock=clock.now)
    fake.add("1", updated_at=T0, parts=3)
    fake.add("2", updated_at=T0, parts=1)
    source, client = intercom_client(fake, clock)
    service = SyncService(store, [source], {"intercom": get_provider("intercom")}, interval=3600, timing=clock.timing)
    try:
        # Webhooks about both (their payloads carry only the newest part): one fetch each, however many arrive.
        for _ in range(3):
            assert await service.hint("intercom", fake.app_id, "1")
        fake.delete("2")
        assert await service.hint("intercom", fake.app_id, "2")
        assert not await service.hint("intercom", "another-app", "1")  # not a configured source
        clock.advance(5)  # past the hint's delay
        provider = get_provider("intercom")
        await Pass(store, provider, source, client, listing=False, policy=POLICY, timing=clock.timing).run()
    finally:
        await client.aclose()
    assert fake.retrieved()["1"] == 1
    assert await stored(store) == {"1": 4}


def zendesk_client(fake: FakeZendesk) -> tuple[SourceConfig, PullClient]:
    source = SourceConfig("zendesk", fake.subdomain, fake.api_token, email=fake.email)
    puller = get_provider("zendesk").puller
    assert puller is not None
    return source, puller.client(source, transport=httpx2.ASGITransport(app=build_app(fake)), timing=fake.clock.timing)


async def test_a_zendesk_backfill_and_a_sweep_store_tickets_with_all_their_comments(store: Store) -> None:
    fake = FakeZendesk(VirtualClock(start=T0))
    fake.add_user(1, "Carla", "end-user", email="carla@example.com")
    fake.add_user(2, "Andy", "agent")
    for ticket_id in range(1, 13):
        fake.put_ticket(ticket_id, subject=f"Ticket {ticket_id}", requester_id=1, assignee_id=2)
        for n in range(ticket_id % 3 + (150 if ticket_id == 7 else 0)):
            fake.add_comment(ticket_id, 1 if n % 2 == 0 else 2, f"comment {n}")
        fake.clock.advance(1)
    fake.clock.advance(300)
    provider = get_provider("zendesk")

    async def sync() -> PassReport:
        source, client = zendesk_client(fake)
        try:
            return await Pass(store, provider, source, client, policy=POLICY, timing=fake.clock.timing).run()
        finally:
            await client.aclose()

    report = await sync()
    assert (report.created, report.dead) == (12, 0)
    expected = {str(t): t % 3 + (150 if t == 7 else 0) for t in range(1, 13)}
    assert await stored(store) == expected
    # Every comment, over several pages for ticket 7: the count is what kbms holds, and nothing is cut short.
    assert await completeness(store, "7") == {"provider_count": 151, "stored_count": 151, "truncated": False}

    fake.add_comment(4, 2, "a reply")
    fake.put_ticket(4, status="open")
    fake.delete_ticket(5)
    fake.clock.advance(300)
    report = await sync()
    assert (report.updated, report.deleted) == (1, 1)
    after = await stored(store)
    assert after["4"] == expected["4"] + 1
    assert "5" not in after
