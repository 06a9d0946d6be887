"""PostgreSQL going away under load: connections killed (pg_terminate_backend), the server restarted, the server
crashed. In-flight requests get a 503 with ``Retry-After`` or succeed, never a 500 or a hang; ``/ready`` says 503
while the database is away; once it is back, requests succeed again without restarting kbms (the pool tests each
connection before use); and every acknowledged payload is in the database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
import httpx2
import pytest
from sqlalchemy import make_url, select, text

from kbms.storage import admin_engine
from kbms.storage.schema import conversations
from tests.conftest import POSTGRES_URL, migrate, postgres_schema
from tests.support.faults import PrivatePostgres
from tests.support.forkserver import ForkServer
from tests.support.helpers import intercom_payload, part

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
INGEST = "/integrations/intercom/conversations"


class Traffic:
    """Clients pushing new conversations back to back, until stopped, with every answer recorded."""

    def __init__(self, http: httpx2.AsyncClient, clients: int) -> None:
        self._http = http
        self._clients = clients
        self._stop = asyncio.Event()
        self._sent = 0
        self.acknowledged: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self.wrong: list[str] = []  # answers that break the contract

    async def _client(self) -> None:
        while not self._stop.is_set():
            self._sent += 1
            name = f"conversation-{self._sent}"
            body = intercom_payload(name, parts=[part(f"{name}-p1", "<p>hello</p>")])
            try:
                response = await self._http.post(INGEST, json=body)
            except httpx2.TransportError as exc:  # a hang ends here, at the client's timeout
                self.wrong.append(f"{name}: {exc!r}")
                continue
            self.statuses[response.status_code] += 1
            if response.status_code in (200, 201):
                self.acknowledged.add(name)
            elif response.status_code != 503 or response.headers.get("retry-after") != "1":
                self.wrong.append(f"{name}: {response.status_code} {response.headers} {response.text}")
            else:
                await asyncio.sleep(0.05)  # as a sender honouring Retry-After would, only sooner

    async def acknowledged_more(self, count: int) -> None:
        """Wait until ``count`` pushes sent from now on are acknowledged (the client's timeouts bound the wait).

        Only pushes sent from now: one in flight may have been committed before whatever the test just did.
        """
        first = self._sent + 1
        while sum(1 for name in self.acknowledged if int(name.rpartition("-")[2]) >= first) < count:
            assert not self.wrong, self.wrong
            await asyncio.sleep(0.02)

    async def answered_more(self, count: int) -> None:
        target = sum(self.statuses.values()) + count
        while sum(self.statuses.values()) < target:
            assert not self.wrong, self.wrong
            await asyncio.sleep(0.02)

    @classmethod
    @asynccontextmanager
    async def running(cls, url: str, *, clients: int = 8) -> AsyncIterator[Traffic]:
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
            traffic = cls(http, clients)
            tasks = [asyncio.create_task(traffic._client()) for _ in range(clients)]
            try:
                yield traffic
            finally:
                traffic._stop.set()
                await asyncio.gather(*tasks)
        print(f"\nanswers: {dict(sorted(traffic.statuses.items()))}, acknowledged: {len(traffic.acknowledged)}")
        assert not traffic.wrong, traffic.wrong[:5]


def stored(database_url: str) -> list[str]:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(conversations.c.external_id)).scalars())
    finally:
        engine.dispose()


def assert_kept(traffic: Traffic, database_url: str) -> None:
    names = stored(database_url)
    assert len(names) == len(set(names))  # none twice
    missing = traffic.acknowledged - set(names)
    assert not missing, f"{len(missing)} acknowledged pushes lost: {sorted(missing)[:5]}"


async def ready(url: str) -> int:
    async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
        return (await http.get("/ready")).status_code


@pytest.mark.postgres
async def test_connections_killed_under_load_cost_at_most_503s_and_kbms_reconnects(
    fork_server: ForkServer, tmp_path: Path
) -> None:
    """On the shared test server: only this test's connections are killed, found by their application name."""
    name = f"kbms-test-{uuid.uuid4().hex[:12]}"
    with postgres_schema() as schema_url:
        url = make_url(schema_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)
        server = fork_server.spawn(url, tmp_path / "server.log")
        admin = admin_engine(POSTGRES_URL)
        kill = text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"
        ).bindparams(name=name)
        try:
            async with Traffic.running(server.url) as traffic:
                await traffic.acknowledged_more(20)
                for _ in range(8):
                    with admin.connect() as conn:
                        assert conn.execute(kill).scalar_one() >= 1  # kbms was connected, and is no more
                    await traffic.acknowledged_more(5)  # ...and is again: reconnected by itself
            assert await ready(server.url) == 200
        finally:
            server.kill()
            admin.dispose()
        assert traffic.statuses[503] >= 1, traffic.statuses  # the kills did hit requests in flight
        assert_kept(traffic, url)


async def test_a_postgres_restart_and_a_postgres_crash_mid_load_cost_at_most_503s(
    fork_server: ForkServer, tmp_path: Path
) -> None:
    """A PostgreSQL server of the test's own (it needs the server binaries, not KBMS_TEST_POSTGRES_URL), stopped
    cleanly (``fast``: sessions ended, open transactions rolled back) and then crashed (``immediate``: recovery
    from the WAL at start), each time under load."""
    postgres = PrivatePostgres()
    try:
        postgres.start()
        url = migrate(postgres.url)
        server = fork_server.spawn(url, tmp_path / "server.log")
        try:
            async with Traffic.running(server.url) as traffic:
                await traffic.acknowledged_more(20)
                for mode in ("fast", "immediate"):
                    await anyio.to_thread.run_sync(postgres.stop, mode)
                    assert await ready(server.url) == 503
                    await traffic.answered_more(20)  # the load goes on, answered 503
                    await anyio.to_thread.run_sync(postgres.start)
                    await traffic.acknowledged_more(20)
                    assert await ready(server.url) == 200
        finally:
            server.kill()
        assert traffic.statuses[503] >= 20, traffic.statuses
        assert_kept(traffic, url)
    finally:
        postgres.close()


async def test_a_frozen_postgres_is_503_within_the_timeout_not_a_hang(fork_server: ForkServer, tmp_path: Path) -> None:
    """A server that stops answering while its connections stay up trips no timeout of the driver's: without
    KBMS_DB_TIMEOUT, as many requests as the pool has connections hung until it came back (the Traffic client's
    10 s timeout then fails the test)."""
    postgres = PrivatePostgres()
    try:
        postgres.start()
        url = migrate(postgres.url)
        server = fork_server.spawn(url, tmp_path / "server.log", env={"KBMS_DB_TIMEOUT": "1"})
        try:
            async with Traffic.running(server.url) as traffic:
                await traffic.acknowledged_more(20)
                with postgres.frozen():
                    await traffic.answered_more(40)
                    assert await ready(server.url) == 503
                await traffic.acknowledged_more(20)
                assert await ready(server.url) == 200
        finally:
            server.kill()
        assert traffic.statuses[503] >= 40, traffic.statuses
        assert_kept(traffic, url)
    finally:
        postgres.close()
