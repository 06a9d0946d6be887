"""At-least-once, unordered delivery: any permutation of a conversation's webhooks, with duplicates, stores the
same conversation as in-order delivery. Built on the real Zulip-recorded deliveries of one conversation."""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbms.api import create_app
from kbms.model import conversation_id
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from tests.conftest import ENGINES, engine_url, start_server
from tests.support import canary
from tests.support.helpers import load

SECRET = canary.secret("order")  # never to be logged (tests/support/canary.py)
EXTERNAL_ID = "215472621202693"
HOOK = "/webhooks/intercom"


def deliveries() -> list[dict[str, Any]]:
    """Six deliveries of conversation 215472621202693, as Intercom sends them: deltas, a reply, a redaction."""
    replied = load("13_webhook_conversation_operator_replied_2026_zulip.json")
    read = load("14_webhook_conversation_read_multi_parts_2026_zulip.json")
    priority = load("16_webhook_conversation_priority_updated_body_null_2026_zulip.json")
    redacted = load("15_webhook_conversation_part_redacted_2026_zulip.json")
    # The admin's reply before it was redacted (the recording only has the redaction).
    admin_replied = copy.deepcopy(redacted)
    original = admin_replied["data"]["item"]["conversation_parts"]["conversation_parts"][0]
    original.update(body="<p>My number is +44 7700 900123</p>", redacted=False, updated_at=original["created_at"])
    admin_replied.update(id="notif_admin_replied", topic="conversation.admin.replied")
    admin_replied["data"]["item"]["updated_at"] = original["created_at"]
    closed = copy.deepcopy(priority)
    closed.update(id="notif_closed", topic="conversation.admin.closed")
    item = closed["data"]["item"]
    item.update(state="closed", open=False, updated_at=1768033900, conversation_parts={"conversation_parts": []})
    return [replied, read, priority, admin_replied, redacted, closed]


DELIVERIES = deliveries()


@pytest.fixture(scope="module", params=ENGINES)
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    secrets = {"KBMS_INTERCOM_CLIENT_SECRET": SECRET}
    with (
        engine_url(request.param, Path(tmp_path_factory.mktemp("order"))) as url,
        TestClient(create_app(Settings(database_url=url, secrets=secrets))) as test_client,
    ):
        yield test_client


def deliver(client: TestClient, document: dict[str, Any], workspace: str) -> None:
    # Each example gets its own workspace (app_id): a fresh conversation in the same database. Notification ids
    # are unique across workspaces (a redelivery is recognized by its id alone), so they get the workspace too.
    body = json.dumps({**document, "app_id": workspace, "id": f"{document['id']}-{workspace}"}).encode()
    response = client.post(
        HOOK, content=body, headers={"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
    )
    assert response.status_code == 200, response.text


def stored(client: TestClient, workspace: str) -> dict[str, Any]:
    response = client.get(f"/internal/conversations/{conversation_id('intercom', workspace, EXTERNAL_ID)}")
    assert response.status_code == 200
    detail = response.json()
    # The id derives from the workspace, which differs by example; revision counts the changes on the way.
    return {k: v for k, v in detail.items() if k not in ("id", "workspace", "revision")}


def test_in_order_delivery_is_what_the_recording_says(client: TestClient) -> None:
    for document in DELIVERIES:
        deliver(client, document, "inorder")
    detail = stored(client, "inorder")
    assert detail["state"] == "closed"
    texts = {m["id"]: m["content"] for m in detail["messages"]}
    assert texts["37358539897"] == "This message was deleted"
    assert "7700" not in json.dumps(detail)


EXAMPLES = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(range(len(DELIVERIES))), st.lists(st.integers(0, len(DELIVERIES) - 1), max_size=4), st.data())
def test_any_order_with_duplicates_converges(
    client: TestClient, order: list[int], repeats: list[int], data: st.DataObject
) -> None:
    reference = "reference"
    if client.get(f"/internal/conversations/{conversation_id('intercom', reference, EXTERNAL_ID)}").status_code == 404:
        for document in DELIVERIES:
            deliver(client, document, reference)
    sequence = list(order)
    for index in repeats:  # redeliveries, at any point
        sequence.insert(data.draw(st.integers(0, len(sequence))), index)
    workspace = f"w{next(EXAMPLES)}"
    for index in sequence:
        deliver(client, DELIVERIES[index], workspace)
    assert stored(client, workspace) == stored(client, reference)


@pytest.mark.slow
@pytest.mark.anyio
async def test_concurrent_shuffled_deliveries_converge_on_a_live_server(database_url: str, tmp_path: Path) -> None:
    server = start_server(database_url, tmp_path / "server.log", env={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    try:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30) as http:

            async def deliver_live(document: dict[str, Any], workspace: str) -> None:
                body = json.dumps({**document, "app_id": workspace, "id": f"{document['id']}-{workspace}"}).encode()
                headers = {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
                response = await http.post(HOOK, content=body, headers=headers)
                assert response.status_code == 200, response.text

            async def stored_live(workspace: str) -> dict[str, Any]:
                cid = conversation_id("intercom", workspace, EXTERNAL_ID)
                detail = (await http.get(f"/internal/conversations/{cid}")).json()
                return {k: v for k, v in detail.items() if k not in ("id", "workspace", "revision")}

            for document in DELIVERIES:
                await deliver_live(document, "inorder")
            rng = random.Random(20261126)
            for trial in range(6):
                sequence = DELIVERIES * 2  # every delivery twice: at-least-once
                rng.shuffle(sequence)
                await asyncio.gather(*(deliver_live(d, f"t{trial}") for d in sequence))
                assert await stored_live(f"t{trial}") == await stored_live("inorder")
    finally:
        server.stop()
