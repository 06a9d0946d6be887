"""Signed Intercom webhooks: verification before anything else, deduplication, topics, tombstones, redaction."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kbms.api import create_app
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations, ledger, messages
from tests.conftest import migrated_sqlite_url
from tests.support import canary
from tests.support.helpers import INTERCOM, intercom_payload, part

SECRET = canary.secret("intercom")  # never to be logged (tests/support/canary.py)
HOOK = "/webhooks/intercom"
INGEST = "/integrations/intercom/conversations"
SECRETS = {"KBMS_INTERCOM_CLIENT_SECRET": SECRET}


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"content-type": "application/json", "x-hub-signature": sign(body, secret)}


def post(client: TestClient, document: Any) -> Any:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return client.post(HOOK, content=body, headers=signed(body))


def fixture(name: str) -> bytes:
    return (INTERCOM / name).read_bytes()


def envelope(item: dict[str, Any], *, topic: str, delivery_id: str | None, app_id: str = "app1") -> dict[str, Any]:
    return {
        "type": "notification_event",
        "app_id": app_id,
        "data": {"type": "notification_event_data", "item": item},
        "id": delivery_id,
        "topic": topic,
        "delivery_attempts": 1,
        "first_sent_at": 1_700_000_000,
        "created_at": 1_700_000_000,
    }


def rows(database_url: str, table: Any) -> list[Any]:
    """Every row of a table, in insertion order for the ledger."""
    query = select(table).order_by(ledger.c.pk) if table is ledger else select(table)
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query))
    finally:
        engine.dispose()


def count(database_url: str, table: Any, *where: Any) -> int:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def hooks(database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=database_url, secrets=SECRETS))) as client:
        yield client


# --- verification ------------------------------------------------------------------------------------------


def test_a_valid_signature_is_accepted(hooks: TestClient) -> None:
    response = post(hooks, fixture("13_webhook_conversation_operator_replied_2026_zulip.json"))
    assert response.status_code == 200
    assert response.json()["result"] == "created"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda body: signed(body, "another-secret"), id="wrong-secret"),
        pytest.param(lambda body: {"content-type": "application/json"}, id="missing-header"),
        pytest.param(lambda body: {"content-type": "application/json", "x-hub-signature": ""}, id="empty-header"),
        pytest.param(
            lambda body: {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)[5:]},
            id="no-sha1-prefix",
        ),
        pytest.param(lambda body: signed(body + b" "), id="signature-of-other-bytes"),
    ],
)
def test_bad_signatures_are_401_and_nothing_is_kept(hooks: TestClient, database_url: str, headers: Any) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    response = hooks.post(HOOK, content=body, headers=headers(body))
    assert response.status_code == 401
    assert response.json() == {
        "error_code": "invalid_signature",
        "message": "Invalid or missing webhook signature",
        "details": None,
    }
    assert count(database_url, ledger) == count(database_url, conversations) == 0


def test_a_tampered_body_is_401(hooks: TestClient, database_url: str) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    headers = signed(body)
    tampered = body.replace(b"helklo", b"hello!")
    assert hooks.post(HOOK, content=tampered, headers=headers).status_code == 401
    assert count(database_url, ledger) == 0


def test_the_same_json_re_serialized_is_401(hooks: TestClient, database_url: str) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    headers = signed(body)
    reformatted = json.dumps(json.loads(body), separators=(",", ":")).encode()
    assert reformatted != body
    assert hooks.post(HOOK, content=reformatted, headers=headers).status_code == 401
    assert count(database_url, ledger) == 0


@pytest.mark.parametrize("secrets", [{}, {"KBMS_INTERCOM_CLIENT_SECRET": ""}], ids=["unset", "empty"])
def test_without_a_secret_nothing_gets_in(database_url: str, secrets: dict[str, str]) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    with TestClient(create_app(Settings(database_url=database_url, secrets=secrets))) as client:
        for headers in (signed(body, ""), signed(body), {"content-type": "application/json"}):
            assert client.post(HOOK, content=body, headers=headers).status_code == 401
    assert count(database_url, ledger) == 0


def test_unsigned_webhooks_only_with_the_explicit_opt_in(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    settings = Settings(database_url=database_url, allow_unsigned_webhooks=True)
    with caplog.at_level("WARNING"), TestClient(create_app(settings)) as client:
        response = client.post(HOOK, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert any("KBMS_ALLOW_UNSIGNED_WEBHOOKS" in record.getMessage() for record in caplog.records)


def test_head_answers_200_for_url_validation(hooks: TestClient) -> None:
    response = hooks.head(HOOK)
    assert response.status_code == 200


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    url = migrated_sqlite_url(Path(tmp_path_factory.mktemp("signature-fuzz")))
    with TestClient(create_app(Settings(database_url=url, secrets=SECRETS))) as client:
        yield client, url


# Header values as they come off the wire: latin-1 bytes without line breaks; and some that look right.
header_values = st.one_of(
    st.binary(max_size=120).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b),
    st.text("0123456789abcdefABCDEF", min_size=40, max_size=40).map(lambda h: f"sha1={h}".encode()),
    st.text("0123456789abcdef=sha1 ", max_size=60).map(str.encode),
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_values)
def test_10000_random_signatures_none_accepted_no_5xx(fuzz_client: tuple[TestClient, str], value: bytes) -> None:
    client, _url = fuzz_client
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    response = client.post(
        HOOK, content=body, headers={b"content-type": b"application/json", b"x-hub-signature": value}
    )
    assert response.status_code == 401


def test_after_the_signature_fuzzing_nothing_was_stored(fuzz_client: tuple[TestClient, str]) -> None:
    _client, url = fuzz_client
    assert count(url, ledger) == 0


# --- topics, workspaces, deduplication, the ledger -----------------------------------------------------------


def test_every_fixture_is_answered_200_and_never_410(hooks: TestClient) -> None:
    for path in sorted(INTERCOM.glob("1*_webhook_*.json")):
        response = post(hooks, path.read_bytes())
        assert response.status_code == 200, (path.name, response.text)


def test_ping_and_items_that_are_not_conversations_are_kept_as_ignored(hooks: TestClient, database_url: str) -> None:
    for name in (
        "19_webhook_ping_zulip.json",
        "12_webhook_conversation_contact_attached_internal_shape_webhookdb.json",
    ):
        response = post(hooks, fixture(name))
        assert response.json()["result"] == "ignored"
    kept = rows(database_url, ledger)
    assert [(r.topic, r.outcome, r.kind, r.workspace) for r in kept] == [
        ("ping", "ignored", "webhook", "i6wc9ipe"),
        ("conversation.contact.attached", "ignored", "webhook", "ol9hno6x"),
    ]
    assert count(database_url, conversations) == 0


def test_app_id_is_the_workspace(hooks: TestClient) -> None:
    response = post(hooks, fixture("13_webhook_conversation_operator_replied_2026_zulip.json"))
    detail = hooks.get(f"/internal/conversations/{response.json()['conversation_id']}").json()
    assert (detail["workspace"], detail["external_id"]) == ("abc123def", "215472621202693")


def test_a_redelivery_is_answered_without_reprocessing(hooks: TestClient, database_url: str) -> None:
    body = fixture("14_webhook_conversation_read_multi_parts_2026_zulip.json")
    first = post(hooks, body).json()
    again = post(hooks, body).json()
    assert (first["deduplicated"], again["deduplicated"]) == (False, True)
    assert again["result"] == "unchanged"
    assert again["delivery_id"] == first["delivery_id"] == "notif_7fde0300-6bf1-4916-8475-75497db01d08"
    assert count(database_url, ledger) == 1
    detail = hooks.get(f"/internal/conversations/{first['conversation_id']}").json()
    assert detail["revision"] == 1


def test_a_null_notification_id_is_deduplicated_by_the_body_hash(hooks: TestClient, database_url: str) -> None:
    body = fixture("10_webhook_conversation_read_minimal_item_webhookdb.json")
    first = post(hooks, body).json()
    assert first["delivery_id"].startswith("sha256:")
    assert post(hooks, body).json()["deduplicated"] is True
    assert count(database_url, ledger) == 1


def test_the_ledger_records_every_verified_delivery(hooks: TestClient, database_url: str) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    post(hooks, body)
    (row,) = rows(database_url, ledger)
    assert (row.provider, row.workspace, row.kind, row.topic) == (
        "intercom",
        "abc123def",
        "webhook",
        "conversation.operator.replied",
    )
    assert (row.delivery_key, row.outcome, row.error) == ("notif_9108e504-998b-4afb-afd2-405cff43b99f", "created", None)
    assert len(row.body_hash) == 64
    assert row.received_at > 0
    assert row.body == body


def test_a_signed_but_invalid_item_is_422_and_kept_as_rejected(hooks: TestClient, database_url: str) -> None:
    doc = json.loads(fixture("13_webhook_conversation_operator_replied_2026_zulip.json"))
    del doc["data"]["item"]["created_at"]
    response = post(hooks, doc)
    assert response.status_code == 422
    assert response.json()["details"] == [
        {"field": "data.item.created_at", "issue": "missing", "message": "Field required"}
    ]
    (row,) = rows(database_url, ledger)
    assert (row.outcome, row.delivery_key, row.topic) == ("rejected", doc["id"], "conversation.operator.replied")
    assert '"field":"data.item.created_at"' in row.error


def test_signed_garbage_is_400_and_kept_as_rejected(hooks: TestClient, database_url: str) -> None:
    assert post(hooks, b"{not json").status_code == 400
    (row,) = rows(database_url, ledger)
    assert (row.outcome, row.body) == ("rejected", b"{not json")


def test_a_minimal_item_updates_fields_without_touching_messages(hooks: TestClient) -> None:
    created = post(hooks, fixture("13_webhook_conversation_operator_replied_2026_zulip.json")).json()
    minimal = envelope(
        {
            "type": "conversation",
            "id": "215472621202693",
            "created_at": 1768031789,
            "updated_at": 1768039999,
            "state": "closed",
            "open": False,
        },
        topic="conversation.admin.closed",
        delivery_id="notif_close",
        app_id="abc123def",
    )
    assert post(hooks, minimal).json()["result"] == "updated"
    detail = hooks.get(f"/internal/conversations/{created['conversation_id']}").json()
    assert detail["state"] == "closed"
    assert len(detail["messages"]) == 2


# --- deletion ------------------------------------------------------------------------------------------------


def _deletion(app_id: str, external_id: str, delivery_id: str) -> dict[str, Any]:
    item = {"type": "conversation", "conversation_id": external_id}
    return envelope(item, topic="conversation.deleted", delivery_id=delivery_id, app_id=app_id)


def test_deleted_conversations_leave_a_tombstone(hooks: TestClient, database_url: str) -> None:
    created = post(hooks, fixture("13_webhook_conversation_operator_replied_2026_zulip.json")).json()
    response = post(hooks, _deletion("abc123def", "215472621202693", "notif_del"))
    assert (response.status_code, response.json()["result"]) == (200, "updated")
    assert hooks.get(f"/internal/conversations/{created['conversation_id']}").status_code == 404
    assert hooks.get("/internal/conversations").json()["items"] == []
    assert count(database_url, messages) == 0  # the content is gone, not only hidden
    # A retry of an older delivery must not bring it back.
    later = copy.deepcopy(json.loads(fixture("14_webhook_conversation_read_multi_parts_2026_zulip.json")))
    assert post(hooks, later).status_code == 200
    assert hooks.get(f"/internal/conversations/{created['conversation_id']}").status_code == 404
    assert count(database_url, messages) == 0


def test_a_deletion_that_arrives_first_wins_too(hooks: TestClient) -> None:
    assert post(hooks, _deletion("abc123def", "215472621202693", "notif_early_delete")).json()["result"] == "created"
    response = post(hooks, fixture("13_webhook_conversation_operator_replied_2026_zulip.json"))
    assert response.status_code == 200
    assert hooks.get(f"/internal/conversations/{response.json()['conversation_id']}").status_code == 404


# --- merging deltas and redactions -----------------------------------------------------------------------------


def test_a_delta_webhook_never_removes_earlier_messages(hooks: TestClient) -> None:
    pushed = hooks.post(f"{INGEST}?workspace=app1", json=intercom_payload("c1", parts=[part("p1"), part("p2")]))
    assert pushed.status_code == 201
    delta = intercom_payload("c1", updated_at=1_700_000_900, parts=[part("p3", "<p>new</p>", at=1_700_000_800)])
    assert (
        post(hooks, envelope(delta, topic="conversation.admin.replied", delivery_id="n1")).json()["result"] == "updated"
    )
    detail = hooks.get(f"/internal/conversations/{pushed.json()['id']}").json()
    assert [m["id"] for m in detail["messages"]] == ["c1-m0", "p1", "p2", "p3"]


SECRET_TEXT = "my card is 4242 4242 4242 4242"


def _original_and_redaction() -> tuple[dict[str, Any], dict[str, Any]]:
    original = intercom_payload(
        "c9",
        updated_at=1_700_000_200,
        parts=[part("p1", f"<p>{SECRET_TEXT}</p>", at=1_700_000_100, translations={"fr": SECRET_TEXT})],
    )
    redacted_part = part("p1", "<p><i>This message was deleted</i></p>", at=1_700_000_100)
    redacted_part.update(updated_at=1_700_000_300, redacted=True)
    redaction = envelope(
        intercom_payload("c9", updated_at=1_700_000_300, parts=[redacted_part]),
        topic="conversation_part.redacted",
        delivery_id="n-redact",
    )
    return envelope(original, topic="conversation.user.replied", delivery_id="n-original"), redaction


def _no_secret_left(hooks: TestClient, database_url: str, conversation_id: str) -> None:
    detail = hooks.get(f"/internal/conversations/{conversation_id}")
    assert SECRET_TEXT not in detail.text
    assert detail.json()["messages"][1]["content"] == "This message was deleted"
    assert SECRET_TEXT not in hooks.get("/internal/conversations").text
    stored = rows(database_url, messages)
    assert all(SECRET_TEXT not in (r.content + (r.content_html or "")) for r in stored)
    bodies = [r.body for r in rows(database_url, ledger)]
    assert len(bodies) == 2
    assert all(SECRET_TEXT.encode() not in body for body in bodies)


def test_a_redaction_overwrites_the_text_everywhere(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    conversation_id = post(hooks, original).json()["conversation_id"]
    assert SECRET_TEXT in hooks.get(f"/internal/conversations/{conversation_id}").text
    assert post(hooks, redaction).json()["result"] == "updated"
    _no_secret_left(hooks, database_url, conversation_id)


def test_an_older_copy_arriving_after_the_redaction_is_scrubbed_too(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    conversation_id = post(hooks, redaction).json()["conversation_id"]
    assert post(hooks, original).status_code == 200
    _no_secret_left(hooks, database_url, conversation_id)


def test_the_fixture_redaction_replaces_the_stored_text(hooks: TestClient) -> None:
    doc = json.loads(fixture("15_webhook_conversation_part_redacted_2026_zulip.json"))
    before = copy.deepcopy(doc)
    part_before = before["data"]["item"]["conversation_parts"]["conversation_parts"][0]
    part_before.update(body="<p>Call me on +44 7700 900123</p>", redacted=False, updated_at=part_before["created_at"])
    before["id"], before["data"]["item"]["updated_at"] = "notif_before", 1768032812
    conversation_id = post(hooks, before).json()["conversation_id"]
    assert "7700 900123" in hooks.get(f"/internal/conversations/{conversation_id}").text
    post(hooks, doc)
    text = hooks.get(f"/internal/conversations/{conversation_id}").text
    assert "7700 900123" not in text
    assert "This message was deleted" in text


# --- review findings: redaction whatever the order, input the database would refuse ---------------------------------


def _deletion_of_c9() -> dict[str, Any]:
    return _deletion("app1", "c9", "n-delete-c9")


def test_a_redaction_after_the_deletion_still_scrubs_the_ledger(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    post(hooks, original)
    post(hooks, _deletion_of_c9())
    assert post(hooks, redaction).status_code == 200
    assert all(SECRET_TEXT.encode() not in row.body for row in rows(database_url, ledger))


def test_an_older_copy_after_redaction_and_deletion_is_scrubbed(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    post(hooks, redaction)
    post(hooks, _deletion_of_c9())
    assert post(hooks, original).status_code == 200
    assert all(SECRET_TEXT.encode() not in row.body for row in rows(database_url, ledger))


def test_a_redaction_removes_attachments_from_stored_payloads(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    leaked = "https://files.example/passport-of-ana.png"
    original["data"]["item"]["conversation_parts"]["conversation_parts"][0]["attachments"] = [
        {"type": "upload", "name": "passport.png", "url": leaked, "content_type": "image/png", "filesize": 9}
    ]
    post(hooks, original)
    post(hooks, redaction)
    assert all(leaked.encode() not in row.body for row in rows(database_url, ledger))


def test_a_rejected_payload_of_the_conversation_is_scrubbed_too(hooks: TestClient, database_url: str) -> None:
    original, redaction = _original_and_redaction()
    broken = copy.deepcopy(original)
    broken["id"] = "n-broken"
    del broken["data"]["item"]["created_at"]
    assert post(hooks, broken).status_code == 422
    post(hooks, original)
    post(hooks, redaction)
    assert all(SECRET_TEXT.encode() not in row.body for row in rows(database_url, ledger))


def test_nul_in_envelope_strings_is_no_5xx(hooks: TestClient) -> None:
    doc = envelope({"type": "conversation", "id": "x"}, topic="conversation.x\u0000y", delivery_id="n-nul")
    assert post(hooks, doc).status_code in (200, 422)
    nul_only = _deletion("app1", "\u0000", "n-nul-delete")
    response = post(hooks, nul_only)
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "data.item.conversation_id"


@pytest.mark.parametrize("where", ["delivery_id", "conversation", "deletion"])
def test_over_long_ids_are_422_not_503(hooks: TestClient, where: str) -> None:
    long_id = "x" * 100_000
    if where == "delivery_id":
        doc = envelope({"type": "ping"}, topic="ping", delivery_id=long_id)
    elif where == "conversation":
        doc = envelope(intercom_payload(long_id), topic="conversation.user.created", delivery_id="n-long-c")
    else:
        doc = _deletion("app1", long_id, "n-long-d")
    response = post(hooks, doc)
    assert response.status_code == 422, response.text


def test_unsigned_deliveries_are_marked_unverified(database_url: str) -> None:
    body = fixture("13_webhook_conversation_operator_replied_2026_zulip.json")
    with TestClient(create_app(Settings(database_url=database_url, allow_unsigned_webhooks=True))) as client:
        client.post(HOOK, content=body, headers={"content-type": "application/json"})
    assert [row.verified for row in rows(database_url, ledger)] == [False]


def test_a_reclaimed_rejected_delivery_records_its_new_body_hash(hooks: TestClient, database_url: str) -> None:
    doc = json.loads(fixture("13_webhook_conversation_operator_replied_2026_zulip.json"))
    broken = copy.deepcopy(doc)
    del broken["data"]["item"]["created_at"]
    assert post(hooks, broken).status_code == 422
    assert post(hooks, doc).status_code == 200
    (row,) = rows(database_url, ledger)
    assert row.outcome == "created"
    assert row.body_hash == hashlib.sha256(row.body).hexdigest()
