"""A 2xx means committed: kill the server with SIGKILL in the middle of a stream of deliveries, restart it, and
every delivery that was acknowledged is there, none twice; redelivering everything then completes the picture."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select

from kbms.providers.intercom.signature import sign
from kbms.storage import admin_engine
from kbms.storage.schema import conversations, ledger, messages
from tests import canary
from tests.conftest import start_server
from tests.helpers import intercom_payload, part

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
SECRET = canary.secret("crash")  # never to be logged (tests/canary.py)
CONVERSATIONS, PARTS = 100, 3
KILL_AFTER = 120  # acknowledged deliveries before the SIGKILL


def delivery(conversation: int, index: int) -> dict[str, Any]:
    item = intercom_payload(
        f"crash-{conversation}",
        updated_at=1_700_000_000 + index,
        parts=[part(f"c{conversation}-p{index}", f"<p>part {index}</p>", at=1_700_000_000 + index)],
    )
    return {
        "type": "notification_event",
        "app_id": "crashapp",
        "id": f"notif-{conversation}-{index}",
        "topic": "conversation.user.replied",
        "data": {"type": "notification_event_data", "item": item},
    }


def state(database_url: str) -> tuple[set[str], int, dict[str, int], set[str]]:
    """(delivery keys in the ledger, ledger rows, messages per conversation, message ids stored)."""
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            keys = set(conn.execute(select(ledger.c.delivery_key)).scalars())
            rows = conn.execute(select(func.count()).select_from(ledger)).scalar_one()
            pending = conn.execute(select(func.count()).select_from(ledger).where(ledger.c.outcome == "pending"))
            assert pending.scalar_one() == 0  # a committed delivery always has its outcome
            stored_ids = set(conn.execute(select(messages.c.message_id)).scalars())
            per_conversation: dict[str, int] = dict(
                conn.execute(
                    select(conversations.c.external_id, func.count(messages.c.message_id))
                    .join(messages, messages.c.conversation_pk == conversations.c.pk)
                    .group_by(conversations.c.external_id)
                ).all()
            )
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            return keys, int(rows), per_conversation, stored_ids
    finally:
        engine.dispose()


async def send_all(url: str, deliveries: list[dict[str, Any]], on_ack: Any = None) -> set[str]:
    acknowledged: set[str] = set()
    slots = asyncio.Semaphore(32)
    async with httpx2.AsyncClient(base_url=url, timeout=15) as http:

        async def send(document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            headers = {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
            async with slots:
                try:
                    response = await http.post("/webhooks/intercom", content=body, headers=headers)
                except httpx2.TransportError:
                    return  # the server died under this request: not acknowledged
            assert response.status_code == 200, response.text
            acknowledged.add(document["id"])
            if on_ack is not None:
                on_ack(len(acknowledged))

        await asyncio.gather(*(send(d) for d in deliveries))
    return acknowledged


async def test_sigkill_loses_no_acknowledged_delivery_and_stores_none_twice(database_url: str, tmp_path: Path) -> None:
    env = {"KBMS_INTERCOM_CLIENT_SECRET": SECRET}
    deliveries = [delivery(c, i) for i in range(PARTS) for c in range(CONVERSATIONS)]
    server = start_server(database_url, tmp_path / "first.log", env=env)

    def kill_at_threshold(acknowledged: int) -> None:
        if acknowledged == KILL_AFTER:
            server.process.send_signal(signal.SIGKILL)

    try:
        acknowledged = await send_all(server.url, deliveries, kill_at_threshold)
    finally:
        server.stop(signal.SIGKILL)
    assert KILL_AFTER <= len(acknowledged) < len(deliveries)  # killed in the middle of the stream

    keys, rows, _, stored_ids = state(database_url)
    assert acknowledged <= keys  # every acknowledged delivery survived the kill, with its part
    parts = {d["id"]: d["data"]["item"]["conversation_parts"]["conversation_parts"][0]["id"] for d in deliveries}
    assert {parts[a] for a in acknowledged} <= stored_ids

    restarted = start_server(database_url, tmp_path / "second.log", env=env)
    try:
        assert await send_all(restarted.url, deliveries) == {d["id"] for d in deliveries}
    finally:
        restarted.stop()
    keys, rows, per_conversation, _ = state(database_url)
    assert rows == len(keys) == len(deliveries)
    assert per_conversation == {f"crash-{c}": PARTS + 1 for c in range(CONVERSATIONS)}
