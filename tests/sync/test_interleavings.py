"""Whatever the order of provider-side edits, webhooks, sweeps and queue work (Hypothesis draws it), on both
engines: once the provider is quiet and a last sweep has run, every stored conversation is exactly the provider's."""

from __future__ import annotations

import asyncio
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
from kbms.sync.service import HINT_DELAY, SyncService
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

    service = SyncService(store, [source], {"intercom": provider}, interval=3600, timing=clock.timing)

    def at() -> datetime:
        return datetime.fromtimestamp(clock.now(), UTC)

    async def run(*, listing: bool) -> None:
        await Pass(store, provider, source, client, listing=listing, policy=POLICY, timing=clock.timing).run()

    try:
        for number, action in enumerate(steps):
            if action[0] == "edit":
                fake.update(action[1], updated_at=int(clock.now()), new_parts=action[2])
            elif action[0] == "webhook":
                body = fake.webhook(action[1], f"notif-{action[1]}-{number}")
                outcome = await receive_webhook(store, provider, body, {}, secret="", verify=False, clock=at)
                named: str | None = getattr(outcome, "external_id", None)
                if named is not None:  # as kbms serve does: the webhook hints the sync service
                    assert await service.hint("intercom", fake.app_id, named)
            elif action[0] == "sweep":
                await run(listing=True)
            elif action[0] == "queue":
                await run(listing=False)
            else:
                clock.advance(action[1])
        # The provider is quiet now: a little later (past a hint's delay), a sweep and the queue bring everything.
        clock.advance(HINT_DELAY + 1)
        await run(listing=True)
        await run(listing=False)
        page = await store.list_conversations(limit=100, cursor=None, filters=Filters(workspace=fake.app_id))
        mine = {item.external_id: item.message_count for item in page.items}
        assert mine == fake.messages(), steps
    finally:
        await client.aclose()
        await store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=14))
def test_any_interleaving_of_edits_webhooks_sweeps_and_queue_work_converges(
    database_url: str, steps: list[tuple[Any, ...]]
) -> None:
    # Examples share the database: each has an Intercom app (a workspace) of its own.
    asyncio.run(scenario(database_url, steps, f"app{uuid.uuid4().hex[:12]}"))
