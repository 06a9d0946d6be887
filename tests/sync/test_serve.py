"""Syncing inside ``kbms serve``: two server processes on one PostgreSQL database, with the same source, sweeping
every second, fetch each conversation once per change; a signed webhook about a conversation makes its whole
conversation arrive."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from kbms.providers.intercom.signature import sign
from tests.conftest import postgres_schema
from tests.providers.intercom.fake import FakeIntercom
from tests.support.forkserver import ForkServer
from tests.support.served import served

pytestmark = pytest.mark.slow
T0 = 1_650_000_000
SECRET = "serve-sync-webhook-secret"


def wait_until(condition: Callable[[], bool], *, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def messages(url: str) -> dict[str, int]:
    items = httpx2.get(f"{url}/internal/conversations", params={"limit": 500}, timeout=10).json()["items"]
    return {item["external_id"]: item["message_count"] for item in items}


@pytest.mark.postgres
def test_two_servers_on_one_postgresql_fetch_each_conversation_once_per_change(
    fork_server: ForkServer, tmp_path: Path
) -> None:
    fake = FakeIntercom(limit=100_000)
    for i in range(80):
        fake.add(f"{7000 + i}", updated_at=T0 + i, parts=1 + i % 3)
    with served(fake.app) as base_url, postgres_schema() as database_url:
        source = {"provider": "intercom", "workspace": fake.app_id, "token": fake.token, "base_url": base_url}
        env = {
            "KBMS_SOURCES": json.dumps([{**source, "max_requests_per_minute": 1_000_000}]),
            "KBMS_SYNC_INTERVAL": "1",
            "KBMS_INTERCOM_CLIENT_SECRET": SECRET,
        }
        servers = [fork_server.spawn(database_url, tmp_path / f"serve-{n}.log", env=env) for n in range(2)]
        try:
            wait_until(lambda: messages(servers[0].url) == fake.messages())
            assert set(fake.retrieved().values()) == {1}

            now = int(time.time())
            fake.update("7005", updated_at=now - 5, new_parts=2)
            fake.update("7006", updated_at=now - 5, new_parts=1)
            wait_until(lambda: messages(servers[1].url) == fake.messages())
            time.sleep(3)  # a few more sweeps by both: nothing is fetched again
            counts = fake.retrieved()
            assert (counts["7005"], counts["7006"]) == (2, 2)
            assert {count for key, count in counts.items() if key not in ("7005", "7006")} == {1}

        finally:
            for server in servers:
                server.kill()


def test_a_webhooks_hint_brings_the_whole_conversation(
    fork_server: ForkServer, database_url: str, tmp_path: Path
) -> None:
    fake = FakeIntercom(limit=100_000)
    for i in range(10):
        fake.add(f"{7000 + i}", updated_at=T0 + i, parts=2)
    with served(fake.app) as base_url:
        source = {"provider": "intercom", "workspace": fake.app_id, "token": fake.token, "base_url": base_url}
        env = {
            "KBMS_SOURCES": json.dumps([source]),
            "KBMS_SYNC_INTERVAL": "3600",  # one sweep, at the start: what comes later comes by the hint
            "KBMS_INTERCOM_CLIENT_SECRET": SECRET,
        }
        server = fork_server.spawn(database_url, tmp_path / "serve.log", env=env)
        try:
            wait_until(lambda: messages(server.url) == fake.messages())
            fake.update("7003", updated_at=int(time.time()), new_parts=3)
            body = fake.webhook("7003", "notif_7003")
            headers = {"Content-Type": "application/json", "X-Hub-Signature": sign(body, SECRET)}
            for _ in range(3):  # redelivered: still one fetch
                answer = httpx2.post(f"{server.url}/webhooks/intercom", content=body, headers=headers, timeout=10)
                assert answer.status_code == 200, answer.text
            assert messages(server.url)["7003"] == 1 + 2 + 1  # the webhook's part, merged at once
            wait_until(lambda: messages(server.url)["7003"] == fake.messages()["7003"])  # then the whole of it
            assert fake.retrieved()["7003"] == 2
        finally:
            server.kill()
