"""Zendesk through the API: pushes, signed webhooks (with vectors computed here), and the same contract as Intercom."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kbms.api import create_app
from kbms.providers import REGISTRY
from kbms.providers.zendesk import signature
from kbms.settings import Settings
from tests.support.helpers import ZENDESK, intercom_payload, zendesk, zendesk_pushes

SECRET = "kbms-test-secret"
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
STAMP = "2026-11-26T12:00:00Z"
HOOK = "/webhooks/zendesk?workspace=acme"
PUSH = "/integrations/zendesk/conversations"
PUSHES = dict(zendesk_pushes())
COMMENT_ADDED = (ZENDESK / "24_webhook_ticket_comment_added_thirdparty_dust.json").read_bytes()


def independent_signature(body: bytes, timestamp: str, secret: str) -> str:
    """Zendesk's documented formula, written out here rather than imported: base64(HMAC-SHA256(ts + body))."""
    return base64.b64encode(hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).digest()).decode()


def headers(body: bytes, *, at: datetime = NOW, secret: str = SECRET) -> dict[str, str]:
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "content-type": "application/json",
        "x-zendesk-webhook-signature": independent_signature(body, stamp, secret),
        "x-zendesk-webhook-signature-timestamp": stamp,
    }


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, secrets={"KBMS_ZENDESK_WEBHOOK_SECRET": SECRET})
    with TestClient(create_app(settings, clock=lambda: NOW)) as test_client:
        yield test_client


def deliver(client: TestClient, body: bytes, **kwargs: Any) -> Any:
    return client.post(HOOK, content=body, headers=headers(body, **kwargs))


# Signature vectors


def test_a_vector_computed_with_openssl() -> None:
    # printf '%s' 2026-11-26T12:00:00Z | cat - 24_webhook_...json \
    #   | openssl dgst -sha256 -hmac kbms-test-secret -binary | base64
    assert signature.sign(COMMENT_ADDED, STAMP, SECRET) == "zrFrVLwnLAJSmAPP/kKR/1mtCoCPaXv1YbiY6hGKyZQ="
    assert independent_signature(COMMENT_ADDED, STAMP, SECRET) == "zrFrVLwnLAJSmAPP/kKR/1mtCoCPaXv1YbiY6hGKyZQ="


def test_verification_accepts_the_openssl_vector_and_nothing_else() -> None:
    # The same vector, held against verify itself rather than sign: the check the API runs.
    vector = "zrFrVLwnLAJSmAPP/kKR/1mtCoCPaXv1YbiY6hGKyZQ="
    good = {"X-Zendesk-Webhook-Signature": vector, "X-Zendesk-Webhook-Signature-Timestamp": STAMP}
    assert signature.verify(COMMENT_ADDED, good, SECRET, now=NOW)
    webhooks = REGISTRY["zendesk"].webhooks
    assert webhooks is not None
    assert webhooks.verify(COMMENT_ADDED, good, SECRET, now=NOW)
    assert not signature.verify(COMMENT_ADDED, good, "another-secret", now=NOW)
    assert not signature.verify(COMMENT_ADDED, good, "", now=NOW)
    assert not signature.verify(COMMENT_ADDED + b" ", good, SECRET, now=NOW)
    assert not signature.verify(
        COMMENT_ADDED, {**good, "X-Zendesk-Webhook-Signature-Timestamp": STAMP[:-1] + "1Z"}, SECRET, now=NOW
    )
    for missing in good:
        assert not signature.verify(COMMENT_ADDED, {k: v for k, v in good.items() if k != missing}, SECRET, now=NOW)


def test_the_published_third_party_vector_verifies() -> None:
    current = zendesk("30_signature_test_vectors.json")["vectors"][0]
    body = (ZENDESK / current["body_file"]).read_bytes()
    sent = {
        "x-zendesk-webhook-signature": current["expected_signature"],
        "x-zendesk-webhook-signature-timestamp": current["timestamp_header"],
    }
    at = datetime.fromtimestamp(int(current["timestamp_header"]), tz=UTC)  # "1234": unix seconds
    assert signature.verify(body, sent, current["secret"], now=at)
    assert not signature.verify(body, sent, current["secret"], now=at + signature.TOLERANCE + timedelta(seconds=1))


def test_the_published_third_party_vector() -> None:
    vectors = zendesk("30_signature_test_vectors.json")["vectors"]
    current, old = vectors
    body = (ZENDESK / current["body_file"]).read_bytes()
    assert signature.sign(body, current["timestamp_header"], current["secret"]) == current["expected_signature"]
    # The docs once signed body + timestamp: that order must not verify.
    old_body = old["body"].encode()
    assert signature.sign(old_body, old["timestamp_header"], old["secret"]) == old["signature_if_timestamp_plus_body"]
    stale_headers = {
        "x-zendesk-webhook-signature": old["expected_signature"],
        "x-zendesk-webhook-signature-timestamp": old["timestamp_header"],
    }
    assert not signature.verify(old_body, stale_headers, old["secret"], now=datetime(2021, 7, 25, 10, tzinfo=UTC))


@pytest.mark.parametrize(("offset", "valid"), [(-301, False), (-299, True), (0, True), (299, True), (301, False)])
def test_timestamps_more_than_five_minutes_away_are_refused(offset: int, valid: bool) -> None:
    sent = NOW + timedelta(seconds=offset)
    assert signature.verify(COMMENT_ADDED, headers(COMMENT_ADDED, at=sent), SECRET, now=NOW) is valid


@pytest.mark.parametrize(("offset", "status"), [(-301, 401), (-299, 200), (299, 200), (301, 401)])
def test_the_time_window_through_the_api(client: TestClient, offset: int, status: int) -> None:
    response = deliver(client, COMMENT_ADDED, at=NOW + timedelta(seconds=offset))
    assert response.status_code == status
    if status == 401:
        assert response.json()["error_code"] == "invalid_signature"


def test_wrong_secret_missing_headers_and_tampered_bodies_are_401(client: TestClient) -> None:
    assert deliver(client, COMMENT_ADDED, secret="not-the-secret").status_code == 401
    good = headers(COMMENT_ADDED)
    for missing in ("x-zendesk-webhook-signature", "x-zendesk-webhook-signature-timestamp"):
        partial = {k: v for k, v in good.items() if k != missing}
        assert client.post(HOOK, content=COMMENT_ADDED, headers=partial).status_code == 401
    tampered = COMMENT_ADDED.replace(b"investigating", b"ignoring")
    assert client.post(HOOK, content=tampered, headers=good).status_code == 401
    # The signature covers the timestamp too: a valid signature with another timestamp is refused.
    shifted = {**good, "x-zendesk-webhook-signature-timestamp": "2026-11-26T12:00:01Z"}
    assert client.post(HOOK, content=COMMENT_ADDED, headers=shifted).status_code == 401
    garbled = {**good, "x-zendesk-webhook-signature-timestamp": "yesterday"}
    assert client.post(HOOK, content=COMMENT_ADDED, headers=garbled).status_code == 401


def test_no_secret_configured_refuses_every_webhook(database_url: str) -> None:
    with TestClient(create_app(Settings(database_url=database_url, secrets={}), clock=lambda: NOW)) as client:
        assert deliver(client, COMMENT_ADDED).status_code == 401


# Webhooks into conversations


def test_a_webhook_merges_into_the_pushed_ticket(client: TestClient) -> None:
    ticket = {"id": 5158, "created_at": "2025-01-08T10:12:07Z", "updated_at": "2025-01-08T11:00:00Z"}
    ticket |= {
        "url": "https://acme.zendesk.com/api/v2/tickets/5158.json",
        "status": "new",
        "requester_id": 8447388090494,
    }
    comment = {"id": 1, "author_id": 8447388090494, "body": "I cannot log in", "created_at": "2025-01-08T10:12:07Z"}
    pushed = client.post(PUSH, json={"ticket": ticket, "comments": [comment]}).json()
    answer = deliver(client, COMMENT_ADDED).json()
    assert (answer["conversation_id"], answer["result"], answer["deduplicated"]) == (pushed["id"], "updated", False)
    detail = client.get(f"/internal/conversations/{pushed['id']}").json()
    assert [m["id"] for m in detail["messages"]] == ["1", "9876543210"]
    assert (detail["workspace"], detail["state"], detail["subject"]) == ("acme", "open", "Cannot login to mobile app")
    again = deliver(client, COMMENT_ADDED).json()
    assert (again["result"], again["deduplicated"]) == ("unchanged", True)
    assert client.get(f"/internal/conversations/{pushed['id']}").json()["revision"] == detail["revision"]


def test_events_arrive_out_of_order_and_the_newest_ticket_state_wins(client: TestClient) -> None:
    names = ["25_webhook_ticket_status_changed_thirdparty_dust.json", "21_webhook_ticket_created_docs_copy.json"]
    ids = {deliver(client, (ZENDESK / name).read_bytes()).json()["conversation_id"] for name in names}
    assert len(ids) == 1
    detail = client.get(f"/internal/conversations/{ids.pop()}").json()
    assert detail["state"] == "solved"  # status_changed (16:45) is newer than created (10:12)
    assert [e["type"] for e in detail["events"]] == ["opened", "closed"]


def test_a_permanently_deleted_ticket_is_gone(client: TestClient) -> None:
    created = deliver(client, (ZENDESK / "21_webhook_ticket_created_docs_copy.json").read_bytes()).json()
    event = json.loads((ZENDESK / "21_webhook_ticket_created_docs_copy.json").read_text())
    event |= {"type": "zen:event-type:ticket.permanently_deleted", "id": "deleted-1", "event": {}}
    body = json.dumps(event).encode()
    assert deliver(client, body).json()["result"] == "updated"
    assert client.get(f"/internal/conversations/{created['conversation_id']}").status_code == 404
    assert client.get("/internal/conversations?provider=zendesk").json()["items"] == []


def test_a_webhook_without_its_workspace_is_422_and_kept(client: TestClient) -> None:
    response = client.post("/webhooks/zendesk", content=COMMENT_ADDED, headers=headers(COMMENT_ADDED))
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "workspace"
    assert "?workspace=" in response.json()["details"][0]["message"]


def test_events_about_users_are_acknowledged_and_ignored(client: TestClient) -> None:
    body = (ZENDESK / "20_webhook_user_active_changed_docs.json").read_bytes()
    answer = deliver(client, body).json()
    assert (answer["result"], answer["conversation_id"]) == ("ignored", None)


# Pushes, and the contract


def test_tickets_are_listed_and_served_like_intercom_conversations(client: TestClient) -> None:
    zendesk_ids = [client.post(PUSH, json=body).json()["id"] for body in PUSHES.values()]
    intercom_id = client.post("/integrations/intercom/conversations", json=intercom_payload("c1")).json()["id"]
    listed = client.get("/internal/conversations?provider=zendesk&limit=500").json()["items"]
    assert sorted(item["id"] for item in listed) == sorted(set(zendesk_ids))
    assert {item["provider"] for item in listed} == {"zendesk"}
    everything = client.get("/internal/conversations?limit=500").json()["items"]
    assert {item["id"] for item in everything} == {*zendesk_ids, intercom_id}
    company = client.get("/internal/conversations?provider=zendesk&workspace=company").json()["items"]
    assert [item["external_id"] for item in company] == ["35436"]
    for conversation_id in zendesk_ids:
        detail = client.get(f"/internal/conversations/{conversation_id}").json()
        intercom = client.get(f"/internal/conversations/{intercom_id}").json()
        assert detail.keys() == intercom.keys()


def test_paging_a_provider_filter_with_the_cursor(client: TestClient) -> None:
    for i in range(7):
        client.post(PUSH, json={"ticket": {"id": i, "created_at": 1_700_000_000 + i}})
        client.post(
            "/integrations/intercom/conversations", json=intercom_payload(f"i{i}", created_at=1_700_000_000 + i)
        )
    seen: list[str] = []
    url = "/internal/conversations?provider=zendesk&limit=3"
    while url:
        page = client.get(url).json()
        seen += [item["external_id"] for item in page["items"]]
        url = (
            f"/internal/conversations?provider=zendesk&limit=3&cursor={page['next_cursor']}"
            if page["next_cursor"]
            else ""
        )
    assert seen == [str(i) for i in reversed(range(7))]


def test_an_unknown_provider_filter_is_422(client: TestClient) -> None:
    response = client.get("/internal/conversations?provider=freshdesk")
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "provider"


def test_an_unknown_provider_route_is_404_with_the_error_body(client: TestClient) -> None:
    for path in ("/integrations/freshdesk/conversations", "/webhooks/freshdesk"):
        response = client.post(path, json={})
        assert (response.status_code, response.json()["error_code"]) == (404, "not_found")


def test_a_bad_ticket_is_422_with_dotted_fields(client: TestClient) -> None:
    response = client.post(PUSH, json={"ticket": {"id": "", "created_at": True}, "comments": [{"body": "x"}]})
    assert response.status_code == 422
    fields = {(d["field"], d["issue"]) for d in response.json()["details"]}
    assert fields == {
        ("ticket.id", "string_too_short"),
        ("ticket.created_at", "timestamp_type"),
        ("comments.0.id", "missing"),
    }


def test_the_zendesk_routes_are_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    push = spec["paths"]["/integrations/zendesk/conversations"]["post"]
    assert push["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ZendeskPush"}
    assert "ZendeskPush" in spec["components"]["schemas"]
    assert "subdomain" in push["parameters"][0]["description"]
    assert "workspace" in {p["name"] for p in spec["paths"]["/webhooks/zendesk"]["post"]["parameters"]}


# Found in review


@pytest.mark.parametrize(
    "stamp", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00", "9" * 40, "١٢٣٤", "+1234", "", " "]
)
def test_hostile_timestamps_are_401_not_500(client: TestClient, stamp: str) -> None:
    signed = {k.encode(): v.encode() for k, v in headers(COMMENT_ADDED).items()}
    signed[b"x-zendesk-webhook-signature-timestamp"] = stamp.encode()
    response = client.post(HOOK, content=COMMENT_ADDED, headers=signed)
    assert (response.status_code, response.json()["error_code"]) == (401, "invalid_signature")


def test_non_ascii_digits_in_ids_are_text(client: TestClient) -> None:
    body = {"ticket": {"id": 1, "created_at": 1}, "comments": [{"id": "²", "body": "x", "created_at": 1}]}
    assert client.post(PUSH, json=body).status_code == 201


@pytest.mark.parametrize("webhook_first", [True, False])
def test_the_complete_copy_of_a_comment_wins_over_the_webhook_s(client: TestClient, webhook_first: bool) -> None:
    """The webhook carries a comment's plain text only; the pushed copy (HTML, attachments) replaces it, always."""
    ticket = {"id": 5158, "created_at": "2025-01-08T10:12:07Z", "updated_at": "2025-01-08T14:25:30Z"}
    ticket |= {"url": "https://acme.zendesk.com/api/v2/tickets/5158.json"}
    comment = {
        "id": 9876543210,
        "author_id": 8447388090495,
        "body": "We are investigating this issue and will update you shortly.",
        "html_body": "<p>We are <b>investigating</b> this issue and will update you shortly.</p>",
        "created_at": "2025-01-08T14:25:30Z",
        "attachments": [{"file_name": "log.txt", "content_url": "https://acme.zendesk.com/a/1", "size": 3}],
    }

    def webhook() -> int:
        return int(deliver(client, COMMENT_ADDED).status_code)

    def push() -> int:
        return client.post(PUSH, json={"ticket": ticket, "comments": [comment]}).status_code

    for step in [webhook, push] if webhook_first else [push, webhook]:
        assert step() in (200, 201)
    conversation_id = client.get("/internal/conversations?provider=zendesk").json()["items"][0]["id"]
    message = client.get(f"/internal/conversations/{conversation_id}").json()["messages"][0]
    assert message["content_html"] == comment["html_body"]
    assert [a["name"] for a in message["attachments"]] == ["log.txt"]
    assert message["sent_at"] == "2025-01-08T14:25:30Z"


def test_workspaces_are_case_insensitive_like_subdomains(client: TestClient) -> None:
    ticket = {"id": 5158, "created_at": "2025-01-08T10:12:07Z", "url": "https://acme.zendesk.com/api/v2/tickets/5158"}
    pushed = client.post(PUSH, json={"ticket": ticket}).json()["id"]
    body = COMMENT_ADDED
    answer = client.post("/webhooks/zendesk?workspace=Acme", content=body, headers=headers(body)).json()
    assert answer["conversation_id"] == pushed
