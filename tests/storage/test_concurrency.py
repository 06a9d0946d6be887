"""Concurrent deliveries against a real server process: exactly one conversation, no lost part, no error."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from tests.conftest import LiveServer
from tests.support.helpers import JSON_HEADERS, dumps, intercom_payload, part

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
INGEST = "/integrations/intercom/conversations"


def client(server: LiveServer) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=server.url, timeout=30, limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    )


async def test_50_concurrent_deliveries_of_one_new_conversation_store_one(live_server: LiveServer) -> None:
    body = dumps(intercom_payload("burst", parts=[part("p1")]))
    async with client(live_server) as http:
        responses = await asyncio.gather(*(http.post(INGEST, content=body, headers=JSON_HEADERS) for _ in range(50)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 49 + [201]
        assert len({r.json()["id"] for r in responses}) == 1
        listed = (await http.get("/internal/conversations")).json()["items"]
    assert [item["external_id"] for item in listed] == ["burst"]


async def test_20_concurrent_snapshots_with_different_parts_keep_all_parts(live_server: LiveServer) -> None:
    payloads = [
        intercom_payload("merge", updated_at=1_700_000_000 + i, parts=[part(f"p{i}", at=1_700_000_000 + i)])
        for i in range(20)
    ]
    async with client(live_server) as http:
        responses = await asyncio.gather(*(http.post(INGEST, json=p) for p in payloads))
        assert all(r.status_code in (200, 201) for r in responses)
        assert [r.status_code for r in responses].count(201) == 1
        conversation_id = responses[0].json()["id"]
        detail = (await http.get(f"/internal/conversations/{conversation_id}")).json()
    assert {m["id"] for m in detail["messages"]} == {"merge-m0", *(f"p{i}" for i in range(20))}
    assert detail["updated_at"] == "2023-11-14T22:13:39Z"  # the newest snapshot's updated_at won
