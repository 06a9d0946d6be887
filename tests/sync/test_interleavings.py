"""Whatever the order of provider-side edits, webhooks, sweeps and queue work (Hypothesis draws it), on both
engines: once the provider is quiet and a last sweep has run, every stored conversation is exactly the provider's."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbms.providers import get_provider
from kbms.providers.pull import SourceConfig
from kbms.settings import Settings
from kbms.storage import open_store
from kbms.storage.base import Filters, Store
from kbms.sync.policy import SyncPolicy
from kbms.sync.runner import Pass
from kbms.webhooks import receive_webhook
from tests.providers.intercom.fake import FakeIntercom
from tests.support.clock import VirtualClock

T0 = 1_700_000_000
IDS = ("c1", "c2", "c3")
POLICY = SyncPolicy(concurrency=2)

step = st.one_of(
    st.tuples(st.just("edit"), st.sampled_from(IDS), st.integers(1, 3)),
    st.tuples(st.just("webhook"), st.sampled_from(IDS)),
    st.tuples(st.just("sweep")),
    st.tuples(st.just("queue")),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.4, 1.0, 30.0, 400.0])),
)


def webhook_body(fake: FakeIntercom, external_id: str, number: int) -> bytes:
    """Intercom's ``conversation.admin.replied``: the conversation with only its newest part."""
    item = json.loads(json.dumps(fake.conversations[external_id]))
    item["conversation_parts"]["conversation_parts"] = item["conversation_parts"]["conversation_parts"][-1:]
    notification = {
        "type": "notification_event",
        "app_id": fake.app_id,
        "id": f"notif-{external_id}-{number}",
        "topic": "conversation.admin.replied",
        "data": {"type": "notification_event_data", "item": item},
    }
    return json.dumps(notification).encode()


async def scenario(database_url: str, steps: list[tuple[Any, ...]], app_id: str) -> None:
    clock = VirtualClock(start=float(T0))
    fake = FakeIntercom(clock=clock.now, app_id=app_id, limit=1_000_000)
    for external_id in IDS:
        fake.add(external_id, updated_at=T0 - 3600, parts=1)
    source = SourceConfig("intercom", fake.app_id, fake.token, max_requests_per_minute=1_000_000)
    provider = get_provider("intercom")
    assert provider.puller is not None
    client = provider.puller.client(source, transport=fake.transport(), timing=clock.timing)
    store: Store = open_store(Settings(database_url=database_url))

    def at() -> datetime:
        return datetime.fromtimestamp(clock.now(), UTC)

    async def run(*, listing: bool) -> None:
        await Pass(store, provider, source, client, listing=listing, policy=POLICY, timing=clock.timing).run()

    try:
        for number, action in enumerate(steps):
            if action[0] == "edit":
                fake.update(action[1], updated_at=int(clock.now()), new_parts=action[2])
            elif action[0] == "webhook":
                body = webhook_body(fake, action[1], number)
                outcome = await receive_webhook(store, provider, body, {}, secret="", verify=False, clock=at)
                named: str | None = getattr(outcome, "external_id", None)
                if named is not None:  # the hint kbms serve's service queues
                    queued = [_Hint(named)]
                    await store.enqueue("intercom", fake.app_id, queued, "webhook", not_before=int(clock.now() * 1e6))
            elif action[0] == "sweep":
                await run(listing=True)
            elif action[0] == "queue":
                await run(listing=False)
            else:
                clock.advance(action[1])
        # The provider is quiet now: a second later, a sweep and the queue bring everything.
        clock.advance(1)
        await run(listing=True)
        await run(listing=False)
        page = await store.list_conversations(limit=100, cursor=None, filters=Filters(workspace=fake.app_id))
        mine = {item.external_id: item.message_count for item in page.items}
        parts = {key: item["conversation_parts"]["conversation_parts"] for key, item in fake.conversations.items()}
        expected = {key: 1 + len(their_parts) for key, their_parts in parts.items()}
        assert mine == expected, steps
    finally:
        await client.aclose()
        await store.close()


class _Hint:
    def __init__(self, external_id: str) -> None:
        self.external_id = external_id
        self.updated_at: int | None = None
        self.prefetched: bytes | None = None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=14))
def test_any_interleaving_of_edits_webhooks_sweeps_and_queue_work_converges(
    database_url: str, steps: list[tuple[Any, ...]]
) -> None:
    # Examples share the database: each has an Intercom app (a workspace) of its own.
    asyncio.run(scenario(database_url, steps, f"app{uuid.uuid4().hex[:12]}"))
