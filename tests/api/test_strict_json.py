"""Strict JSON at the door: NaN and Infinity are refused on every ingest path (push, batch, webhook, ``kbms ingest``)
and never stored."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json
from sqlalchemy import select

from kbms.api import create_app
from kbms.api.errors import status_of
from kbms.backfill import ingest_file
from kbms.deliveries import Delivery
from kbms.errors import InvalidJson, NonFiniteNumber, ValidationFailed
from kbms.ingest import push_delivery_key
from kbms.providers import REGISTRY
from kbms.providers.base import refuse_non_finite, validate_json
from kbms.providers.intercom.schema import IntercomConversation
from kbms.reprocess import reprocess
from kbms.settings import Settings
from kbms.storage import admin_engine, open_store
from kbms.storage.schema import ledger
from tests.conftest import ENGINES, engine_url
from tests.providers.zendesk.test_api import NOW
from tests.providers.zendesk.test_api import SECRET as ZENDESK_SECRET
from tests.providers.zendesk.test_api import headers as zendesk_headers
from tests.support import canary
from tests.support.helpers import INTERCOM, JSON_HEADERS, ZENDESK, intercom_payload, part, zendesk_pushes

INTERCOM_SECRET = canary.secret("intercom")
NDJSON = {"content-type": "application/x-ndjson"}
NOT_JSON_NUMBERS = "Malformed JSON body: NaN and Infinity are not JSON numbers"
NON_FINITE = [float("nan"), float("inf"), float("-inf")]  # json.dumps writes NaN, Infinity, -Infinity


def intercom_headers(body: bytes) -> dict[str, str]:
    """Intercom's documented formula, written out here rather than imported: sha1=hex(HMAC-SHA1(body))."""
    digest = hmac.new(INTERCOM_SECRET.encode(), body, hashlib.sha1).hexdigest()
    return {**JSON_HEADERS, "x-hub-signature": f"sha1={digest}"}


# --- the literals each parser reads ----------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["top", "unmapped", "nested", "mapped"])
def test_the_three_non_finite_literals_are_refused_anywhere(literal: str, where: str) -> None:
    payload = {"id": "c1", "created_at": 1_700_000_000, "source": {"body": "x", "author": {"id": "u1"}}}
    text = json.dumps(payload)
    bodies = {
        "top": text.replace('"id": "c1"', f'"id": "c1", "score": {literal}'),
        "unmapped": text.replace('"body": "x"', f'"body": "x", "rating": {literal}'),
        "nested": text.replace('"body": "x"', f'"body": "x", "extra": [1, {{"deep": [{literal}]}}]'),
        "mapped": text.replace("1700000000", literal),
    }
    with pytest.raises(NonFiniteNumber) as refused:
        refuse_non_finite(bodies[where].encode())
    assert refused.value.message == NOT_JSON_NUMBERS
    assert status_of(refused.value) == (400, "invalid_json")


@pytest.mark.parametrize("literal", ["nan", "-NaN", "+NaN", "+Infinity", "infinity", "inf", "-inf", "Inf"])
def test_other_spellings_are_ordinary_malformed_json(literal: str) -> None:
    # pydantic's parser (like Python's json) refuses these itself: the usual message, no special case.
    with pytest.raises(InvalidJson) as refused:
        validate_json(IntercomConversation, b'{"id": "c1", "rating": %s}' % literal.encode())
    assert type(refused.value) is InvalidJson
    assert refused.value.message == "Malformed JSON body"


def test_the_same_letters_inside_strings_are_text() -> None:
    body = json.dumps(
        intercom_payload("NaN", title="Infinity", parts=[part("Infinity", "<p>NaN, -Infinity</p>")], NaN="NaN")
    )
    refuse_non_finite(body.encode())  # nothing to refuse
    conversation = validate_json(IntercomConversation, body.encode())
    assert (conversation.id, conversation.title, conversation.parts[0].id) == ("NaN", "Infinity", "Infinity")


def test_a_huge_number_is_a_json_number_and_only_a_mapped_field_refuses_it() -> None:
    # 1e999 is valid JSON (RFC 8259 leaves the range to implementations) that reads as infinity in binary64: it is
    # stored as sent in a field kbms ignores; a field kbms maps refuses it.
    ignored = intercom_payload("c1")
    ignored["source"]["author"]["score"] = 1.0
    body = json.dumps(ignored).replace("1.0", "1e999").encode()
    assert validate_json(IntercomConversation, body).id == "c1"
    mapped = json.dumps(intercom_payload("c1")).replace("1700000000", "1e999", 1).encode()
    with pytest.raises(ValidationFailed) as refused:
        validate_json(IntercomConversation, mapped)
    assert [i.field for i in refused.value.issues] == ["created_at"]


# --- every ingest path: nothing with a non-finite number is ever stored -------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, str]]:
    # One app for all examples, as in test_api_properties.
    secrets = {"KBMS_INTERCOM_CLIENT_SECRET": INTERCOM_SECRET, "KBMS_ZENDESK_WEBHOOK_SECRET": ZENDESK_SECRET}
    with (
        engine_url(request.param, Path(tmp_path_factory.mktemp("strict"))) as url,
        TestClient(create_app(Settings(database_url=url, secrets=secrets), clock=lambda: NOW)) as client,
    ):
        yield client, url


def _fixture(directory: Path, name: str) -> Any:
    return json.loads((directory / name).read_text())


def _notification(item: dict[str, Any], topic: str) -> dict[str, Any]:
    return {"type": "notification_event", "app_id": "app1", "id": "notif_nf", "topic": topic, "data": {"item": item}}


ATTACHMENT = {"type": "upload", "name": "a.png", "url": "https://x.test/a.png", "content_type": "image/png"}
INTERCOM_PUSH = intercom_payload("nf-i", parts=[part("p1", attachments=[{**ATTACHMENT, "filesize": 9}])])
ZENDESK_PUSH = dict(zendesk_pushes())["01_02_docs_ticket_with_comment"]
# Pushes the injected payloads are sent with, and webhooks: a conversation's, and ones whose topic kbms only records.
BASES: dict[str, dict[str, list[Any]]] = {
    "intercom": {
        "push": [INTERCOM_PUSH],
        "webhook": [
            _notification(INTERCOM_PUSH, "conversation.admin.replied"),
            _fixture(INTERCOM, "19_webhook_ping_zulip.json"),
            _fixture(INTERCOM, "12_webhook_conversation_contact_attached_internal_shape_webhookdb.json"),
        ],
    },
    "zendesk": {
        "push": [ZENDESK_PUSH],
        "webhook": [
            _fixture(ZENDESK, "24_webhook_ticket_comment_added_thirdparty_dust.json"),
            _fixture(ZENDESK, "20_webhook_user_active_changed_docs.json"),
        ],
    },
}
# Each provider's webhook path and how its deliveries are signed: a table, so the test itself names no provider.
WEBHOOKS: dict[str, tuple[str, Callable[[bytes], dict[str, str]]]] = {
    "intercom": ("/webhooks/intercom", intercom_headers),
    "zendesk": ("/webhooks/zendesk?workspace=acme", zendesk_headers),
}


@st.composite
def injected(draw: st.DrawFn, document: Any) -> bytes:
    """``document`` with NaN, Infinity or -Infinity put where a JSON value can go: in place of any value (mapped
    or not), as a new member or element, at any depth, bare or inside an array or an object."""
    literal = draw(st.sampled_from(NON_FINITE))
    value = draw(st.sampled_from([literal, [1, literal], {"kbms_extra": literal}]))
    result = copy.deepcopy(document)
    node = result
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        inner = [key for key in keys if isinstance(node[key], dict | list)]
        if not inner or draw(st.booleans()):
            break
        node = node[draw(st.sampled_from(inner))]
    if isinstance(node, dict):
        node[draw(st.sampled_from([*node, "kbms_unmapped"]))] = value
    elif node and draw(st.booleans()):
        node[draw(st.integers(0, len(node) - 1))] = value
    else:
        node.insert(draw(st.integers(0, len(node))), value)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    body = json.dumps(result, separators=separators).encode()
    assert b"NaN" in body or b"Infinity" in body
    return body


def stored_bodies(url: str) -> list[bytes]:
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            return [bytes(body) for body in conn.execute(select(ledger.c.body)).scalars()]
    finally:
        engine.dispose()


def holds_non_finite(body: bytes) -> bool:
    """Whether ``body`` is JSON only to a parser that reads NaN and Infinity (signed garbage is kept, and is JSON to
    no parser at all)."""
    try:
        from_json(body, allow_inf_nan=False)
    except ValueError:
        try:
            from_json(body)
        except ValueError:
            return False
        return True
    return False


def refused(response: Any) -> None:
    assert response.status_code == 400, response.text
    assert response.json() == {"error_code": "invalid_json", "message": NOT_JSON_NUMBERS, "details": None}


@pytest.mark.parametrize("provider", sorted(BASES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_payload_with_a_non_finite_number_is_ever_stored(
    shared: tuple[TestClient, str], provider: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, url = shared
    push = BASES[provider]["push"][0]
    bad = data.draw(injected(push), label="push")
    good = json.dumps(push).encode()
    other = json.dumps({**push, "kbms_note": "another body of the same conversation"}).encode()

    refused(client.post(f"/integrations/{provider}/conversations", content=bad, headers=JSON_HEADERS))

    batch = client.post(
        f"/integrations/{provider}/conversations/batch", content=b"\n".join([good, bad, other]), headers=NDJSON
    )
    lines = batch.json()["results"]
    assert [line["status"] for line in lines][1] == 400
    assert lines[1]["error"] == {"error_code": "invalid_json", "message": NOT_JSON_NUMBERS, "details": None}
    assert {lines[0]["status"], lines[2]["status"]} <= {200, 201}  # only that line is refused

    hook = data.draw(injected(data.draw(st.sampled_from(BASES[provider]["webhook"]))), label="webhook")
    path, sign = WEBHOOKS[provider]
    refused(client.post(path, content=hook, headers=sign(hook)))

    # kbms ingest: the file as NDJSON, as a JSON array (each item alone) or as one JSON document.
    mode = data.draw(st.sampled_from(["ndjson", "array", "document"]), label="file")
    documents = [json.loads(good), json.loads(bad), json.loads(other)]
    text = {
        "ndjson": b"\n".join([good, bad, other]),
        "array": json.dumps(documents, indent=1).encode(),
        "document": json.dumps(documents[1], indent=2).encode(),
    }[mode]
    file = tmp_path_factory.mktemp("ingest") / "conversations.json"
    file.write_bytes(text)
    report = ingest_file(Settings(database_url=url), provider, file, workspace=None, jobs=1, advance=lambda _: None)
    assert report.rejects == [(1 if mode == "document" else 2, NOT_JSON_NUMBERS)]

    bodies = stored_bodies(url)
    assert bad not in bodies
    assert hook not in bodies
    assert [body for body in bodies if holds_non_finite(body)] == []


def test_a_signed_nan_webhook_is_not_kept_but_signed_garbage_still_is(shared: tuple[TestClient, str]) -> None:
    client, url = shared
    hook = json.dumps(_notification({"type": "ping", "rating": float("nan")}, "ping")).encode()
    refused(client.post("/webhooks/intercom", content=hook, headers=intercom_headers(hook)))
    assert hook not in stored_bodies(url)
    garbage = b'{"type": "notification_event", "id": nope}'
    assert client.post("/webhooks/intercom", content=garbage, headers=intercom_headers(garbage)).status_code == 400
    assert garbage in stored_bodies(url)  # kept as rejected: it reads as JSON to no one


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
async def test_reprocess_keeps_what_an_older_kbms_accepted(engine: str, tmp_path: Path) -> None:
    # Before strict JSON, a NaN in a field kbms ignores was stored and accepted. Re-reading the ledger must not refuse
    # it now: the conversation would be deleted for want of a payload, though nothing new says it should be.
    body = json.dumps(intercom_payload("c-older")).replace("{", '{"score": NaN, ', 1).encode()
    provider = REGISTRY["intercom"]
    snapshot = provider.parse_push(body, workspace="acme", default_workspace="default")
    body_hash = hashlib.sha256(body).hexdigest()
    delivery = Delivery(
        provider="intercom",
        workspace="acme",
        kind="push",
        topic=None,
        delivery_key=push_delivery_key("acme", body_hash),
        body_hash=body_hash,
        body=body,
        received_at=datetime.now(UTC),
        named_workspace="acme",
    )
    with engine_url(engine, tmp_path) as url:
        store = open_store(Settings(database_url=url))
        try:
            applied = await store.ingest(delivery, snapshot, redact=provider.redactor)
            assert applied.result == "created"
            assert applied.conversation_id is not None
            report = await reprocess(store, providers=REGISTRY)
            assert (report.conversations, report.changed, report.deliveries_reclassified) == (1, 0, 0)
            kept = await store.get_conversation(applied.conversation_id)
            assert kept is not None
            assert kept.external_id == "c-older"
        finally:
            await store.close()
