"""kbms reprocess: after a mapper change, stored conversations are re-derived from the raw ledger; twice is once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from kbms.api import create_app
from kbms.cli import app as cli
from kbms.deliveries import Delivery
from kbms.model import ConversationSnapshot, WebhookEvent
from kbms.providers import Provider
from kbms.providers.intercom import IntercomProvider, IntercomWebhooks
from kbms.providers.intercom.signature import sign
from kbms.providers.zendesk import ZendeskProvider
from kbms.reprocess import ReprocessReport, reprocess
from kbms.settings import Settings
from kbms.storage import Store, admin_engine, open_store
from kbms.storage.schema import ledger
from tests.support import canary
from tests.support.helpers import INTERCOM, dumps, intercom_conversations, intercom_payload, part

pytestmark = pytest.mark.anyio
SECRET = canary.secret("reprocess")  # never to be logged (tests/support/canary.py)
INGEST = "/integrations/intercom/conversations"


class ShoutingWebhooks(IntercomWebhooks):
    def parse(self, body: bytes, *, workspace: str | None) -> WebhookEvent:
        event = super().parse(body, workspace=workspace)
        if isinstance(event.change, ConversationSnapshot):
            return event.model_copy(update={"change": shout(event.change)})
        return event


class ShoutingIntercom(IntercomProvider):
    """A deliberate mapper change: message content in capitals, for pushes and webhooks alike."""

    webhooks = ShoutingWebhooks()

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        return shout(super().parse_push(body, workspace=workspace, default_workspace=default_workspace))


def shout(snapshot: ConversationSnapshot) -> ConversationSnapshot:
    loud = tuple(m.model_copy(update={"content": m.content.upper()}) for m in snapshot.messages)
    return snapshot.model_copy(update={"messages": loud})


class LenientIntercom(IntercomProvider):
    """A mapper fix: parts without an id get one (their position), where today's mapper refuses them."""

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        document = json.loads(body)
        for index, item in enumerate(document.get("conversation_parts", {}).get("conversation_parts", [])):
            item.setdefault("id", f"{document['id']}-part-{index}")
        return super().parse_push(
            json.dumps(document).encode(), workspace=workspace, default_workspace=default_workspace
        )


def providers(provider: Provider) -> Mapping[str, Provider]:
    return {"intercom": provider}


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def ingest_everything(client: TestClient) -> dict[str, bytes]:
    """Push every fixture conversation and deliver every webhook fixture; the details, by id."""
    for _name, workspace, payload in intercom_conversations():
        assert client.post(f"{INGEST}?workspace={workspace}", json=payload).status_code in (200, 201)
    for path in sorted(INTERCOM.glob("1*_webhook_*.json")):
        body = path.read_bytes()
        headers = {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
        assert client.post("/webhooks/intercom", content=body, headers=headers).status_code == 200
    return details(client)


def details(client: TestClient) -> dict[str, bytes]:
    items = client.get("/internal/conversations?limit=500").json()["items"]
    return {item["id"]: client.get(f"/internal/conversations/{item['id']}").content for item in items}


async def run(database_url: str, provider: Provider, **filters: Any) -> ReprocessReport:
    store: Store = open_store(Settings(database_url=database_url))
    try:
        return await reprocess(store, providers=providers(provider), **filters)
    finally:
        await store.close()


def ledger_outcomes(database_url: str) -> list[tuple[str, str | None]]:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return [(r.outcome, r.error) for r in conn.execute(select(ledger).order_by(ledger.c.pk))]
    finally:
        engine.dispose()


async def test_reprocessing_with_the_same_mappers_changes_nothing(client: TestClient, database_url: str) -> None:
    before = ingest_everything(client)
    outcomes = ledger_outcomes(database_url)
    report = await run(database_url, IntercomProvider())
    assert report.conversations == len(before) + 1  # and the deleted one (a tombstone)
    assert (report.changed, report.deliveries_reclassified) == (0, 0)
    assert details(client) == before
    assert ledger_outcomes(database_url) == outcomes


async def test_a_mapper_change_is_applied_to_stored_conversations_and_twice_is_once(
    client: TestClient, database_url: str
) -> None:
    before = ingest_everything(client)
    first = await run(database_url, ShoutingIntercom())
    after = details(client)
    with_messages = [cid for cid, body in before.items() if json.loads(body)["messages"]]
    assert first.changed == len(with_messages)
    for cid in with_messages:
        old, new = json.loads(before[cid]), json.loads(after[cid])
        assert [m["content"].upper() for m in old["messages"]] == [m["content"] for m in new["messages"]]
        assert new["revision"] == old["revision"] + 1
    outcomes = ledger_outcomes(database_url)
    second = await run(database_url, ShoutingIntercom())
    assert (second.changed, second.deliveries_reclassified) == (0, 0)
    assert details(client) == after
    assert ledger_outcomes(database_url) == outcomes


async def test_previously_rejected_payloads_that_now_validate_are_picked_up(
    client: TestClient, database_url: str
) -> None:
    payload = intercom_payload("fixed", parts=[part("p1")])
    del payload["conversation_parts"]["conversation_parts"][0]["id"]
    assert client.post(INGEST, json=payload).status_code == 422
    assert ledger_outcomes(database_url)[0][0] == "rejected"
    assert client.get("/internal/conversations").json()["items"] == []

    first = await run(database_url, LenientIntercom())
    assert (first.changed, first.deliveries_reclassified) == (1, 1)
    assert ledger_outcomes(database_url) == [("created", None)]
    (item,) = client.get("/internal/conversations").json()["items"]
    detail = client.get(f"/internal/conversations/{item['id']}").json()
    assert [m["id"] for m in detail["messages"]] == ["fixed-m0", "fixed-part-0"]

    second = await run(database_url, LenientIntercom())
    assert (second.changed, second.deliveries_reclassified) == (0, 0)


async def test_filters_limit_the_scope(client: TestClient, database_url: str) -> None:
    before = ingest_everything(client)
    some = next(iter(before))
    report = await run(database_url, ShoutingIntercom(), conversation_id=some)
    assert (report.conversations, report.changed) == (1, 1)
    after = details(client)
    assert [cid for cid in before if after[cid] != before[cid]] == [some]
    future = int(datetime(2100, 1, 1).timestamp() * 1_000_000)
    assert (await run(database_url, ShoutingIntercom(), since=future)).conversations == 0


def test_the_cli_reprocesses_and_reports(client: TestClient, database_url: str) -> None:
    ingest_everything(client)
    runner = CliRunner()
    result = runner.invoke(cli, ["reprocess", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.strip().startswith("│")][-1]
    conversations, changed, unchanged, reclassified = (cell.strip() for cell in row.split("│")[1:5])
    assert (changed, reclassified) == ("0", "0")
    assert int(conversations) == int(unchanged) > 0
    assert runner.invoke(cli, ["reprocess", "--provider", "nope", "--database-url", database_url]).exit_code == 2
    since = runner.invoke(cli, ["reprocess", "--since", "2099-01-01", "--database-url", database_url])
    assert since.exit_code == 0, since.output


async def test_reprocessing_does_not_bring_redacted_text_back(client: TestClient, database_url: str) -> None:
    secret = "call me on +44 7700 900123"
    original = intercom_payload("r1", updated_at=1_700_000_200, parts=[part("p1", f"<p>{secret}</p>")])
    redacted_part = {**part("p1", "<p>This message was deleted</p>"), "updated_at": 1_700_000_300, "redacted": True}
    redaction = intercom_payload("r1", updated_at=1_700_000_300, parts=[redacted_part])
    created = client.post(INGEST, json=original).json()
    assert client.post(INGEST, json=redaction).json()["result"] == "updated"
    report = await run(database_url, ShoutingIntercom())
    assert report.changed == 1
    text = client.get(f"/internal/conversations/{created['id']}").text
    assert "THIS MESSAGE WAS DELETED" in text
    assert secret.upper() not in text
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            bodies = [bytes(row.body) for row in conn.execute(select(ledger))]
    finally:
        engine.dispose()
    assert all(secret.encode() not in body for body in bodies)


class RekeyingIntercom(IntercomProvider):
    """A mapper fix that changes which conversation a payload belongs to (say, an id that needed a prefix)."""

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        snapshot = super().parse_push(body, workspace=workspace, default_workspace=default_workspace)
        return snapshot.model_copy(update={"external_id": f"X{snapshot.external_id}"})


async def test_deliveries_that_move_to_another_conversation_settle_in_one_run(
    client: TestClient, database_url: str
) -> None:
    client.post(INGEST, json=intercom_payload("c1", parts=[part("p1")]))
    first = await run(database_url, RekeyingIntercom())
    listed = [item["external_id"] for item in client.get("/internal/conversations").json()["items"]]
    assert listed == ["Xc1"]  # c1 is a tombstone now: nothing produces it any more
    assert first.changed == 2
    second = await run(database_url, RekeyingIntercom())
    assert (second.changed, second.deliveries_reclassified) == (0, 0)


async def test_one_conversation_picks_up_its_rejected_payloads(client: TestClient, database_url: str) -> None:
    created = client.post(INGEST, json=intercom_payload("c5", parts=[part("p1")])).json()
    broken = intercom_payload("c5", updated_at=1_700_000_900, parts=[part("p2", at=1_700_000_800)])
    del broken["conversation_parts"]["conversation_parts"][0]["id"]
    assert client.post(INGEST, json=broken).status_code == 422
    report = await run(database_url, LenientIntercom(), conversation_id=created["id"])
    assert (report.conversations, report.changed) == (1, 1)
    detail = client.get(f"/internal/conversations/{created['id']}").json()
    assert [m["id"] for m in detail["messages"]] == ["c5-m0", "p1", "c5-part-0"]


async def test_deletions_leave_the_same_tombstone_in_any_order(database_url: str) -> None:
    """Live ingestion in one order, re-derivation in another: the same stored conversation."""
    settings = Settings(database_url=database_url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    snapshot = intercom_payload("d1", updated_at=1_700_000_900)
    deletion = {
        "type": "notification_event",
        "app_id": "default",
        "id": "n-d1",
        "topic": "conversation.deleted",
        "data": {"item": {"type": "conversation", "conversation_id": "d1"}},
    }
    with TestClient(create_app(settings)) as test_client:
        body = json.dumps(deletion).encode()
        headers = {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
        assert test_client.post("/webhooks/intercom", content=body, headers=headers).status_code == 200
        assert test_client.post(INGEST, json=snapshot).status_code == 200
    report = await run(database_url, IntercomProvider())
    assert (report.changed, report.deliveries_reclassified) == (0, 0)


class LenientZendesk(ZendeskProvider):
    """A mapper fix: comments without an id get one (their position), where today's mapper refuses them."""

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        document = json.loads(body)
        for index, comment in enumerate(document.get("comments", [])):
            comment.setdefault("id", 1000 + index)
        return super().parse_push(
            json.dumps(document).encode(), workspace=workspace, default_workspace=default_workspace
        )


async def test_a_zendesk_push_is_re_read_in_the_workspace_it_would_have_had(
    client: TestClient, database_url: str
) -> None:
    """The workspace a push names, or the one its payload names (a Zendesk ticket's url): the same on re-reading."""
    ticket = {"id": 7, "created_at": 1_700_000_000, "url": "https://acme.zendesk.com/api/v2/tickets/7.json"}
    body = {"ticket": ticket, "comments": [{"body": "no id", "created_at": 1_700_000_001}]}
    assert client.post("/integrations/zendesk/conversations", json=body).status_code == 422
    named = {"ticket": {**ticket, "id": 8}, "comments": body["comments"]}
    assert client.post("/integrations/zendesk/conversations?workspace=other", json=named).status_code == 422
    store: Store = open_store(Settings(database_url=database_url))
    try:
        report = await reprocess(store, providers={"zendesk": LenientZendesk()})
    finally:
        await store.close()
    assert report.deliveries_reclassified == 2
    items = client.get("/internal/conversations?provider=zendesk").json()["items"]
    assert sorted((item["external_id"], item["workspace"]) for item in items) == [("7", "acme"), ("8", "other")]


async def test_workspaces_with_colons_are_re_read_where_they_were(client: TestClient, database_url: str) -> None:
    for workspace in ("eu:app1", "acme:x"):
        assert client.post(f"{INGEST}?workspace={workspace}", json=intercom_payload("c1")).status_code == 201
    before = details(client)
    report = await run(database_url, IntercomProvider())
    assert (report.changed, report.deliveries_reclassified) == (0, 0)
    assert details(client) == before


async def test_a_webhook_refused_for_want_of_a_workspace_stays_refused(client: TestClient, database_url: str) -> None:
    from tests.providers.zendesk.test_api import COMMENT_ADDED, NOW
    from tests.providers.zendesk.test_api import headers as zendesk_headers

    settings = Settings(database_url=database_url, secrets={"KBMS_ZENDESK_WEBHOOK_SECRET": "kbms-test-secret"})
    with TestClient(create_app(settings, clock=lambda: NOW)) as zendesk_client:
        response = zendesk_client.post(
            "/webhooks/zendesk", content=COMMENT_ADDED, headers=zendesk_headers(COMMENT_ADDED)
        )
    assert response.status_code == 422
    assert [outcome for outcome, _error in ledger_outcomes(database_url)] == ["rejected"]
    store: Store = open_store(Settings(database_url=database_url))
    try:
        report = await reprocess(store, providers={"zendesk": ZendeskProvider()})
    finally:
        await store.close()
    assert (report.conversations, report.deliveries_reclassified) == (0, 0)
    assert client.get("/internal/conversations").json()["items"] == []


async def test_a_pulled_conversation_is_re_read_like_a_push_in_its_source_workspace(database_url: str) -> None:
    """Ledger kind ``pull`` (kbms sync): the body is a retrieved conversation, which ``parse_push`` reads, and the
    delivery names its source's workspace (an Intercom conversation does not carry it)."""
    body = dumps(intercom_payload("pulled", parts=[part("p1"), part("p2", at=1_700_000_200)]))
    digest = hashlib.sha256(body).hexdigest()
    pulled = Delivery(
        provider="intercom",
        workspace="app1",
        kind="pull",
        topic="pull.retrieve",
        delivery_key=f"pull:app1:{digest}",
        body_hash=digest,
        body=body,
        received_at=datetime.now(UTC),
        named_workspace="app1",
    )
    store: Store = open_store(Settings(database_url=database_url))
    try:
        snapshot = IntercomProvider().parse_push(body, workspace="app1", default_workspace="default")
        applied = await store.ingest(pulled, snapshot)
        assert applied.result == "created"
        assert applied.conversation_id is not None
        before = await store.get_conversation_json(applied.conversation_id)
        same = await reprocess(store, providers=providers(IntercomProvider()))
        assert (same.conversations, same.changed, same.deliveries_reclassified) == (1, 0, 0)
        assert await store.get_conversation_json(applied.conversation_id) == before
        assert ledger_outcomes(database_url) == [("created", None)]
        loud = await reprocess(store, providers=providers(ShoutingIntercom()))  # read by the push mapper
        assert (loud.changed, loud.deliveries_reclassified) == (1, 0)
        after = await store.get_conversation_json(applied.conversation_id)
    finally:
        await store.close()
    assert before is not None
    assert after is not None
    old, new = json.loads(before), json.loads(after)
    assert new["workspace"] == old["workspace"] == "app1"
    assert [m["content"] for m in new["messages"]] == [m["content"].upper() for m in old["messages"]]
