"""Booleans are refused wherever a provider's schema expects a number or an id (pydantic's lax mode reads true as 1):
every such field of every provider's push and webhook schemas, found by walking the documented JSON Schemas."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kbms.api.errors import status_of
from kbms.deliveries import Delivery
from kbms.errors import ValidationFailed
from kbms.ingest import accept, push_delivery_key
from kbms.limits import DEFAULT_LIMITS
from kbms.providers import REGISTRY
from kbms.providers.fields import reading_the_ledger
from kbms.providers.intercom.schema import IntercomConversation
from kbms.providers.zendesk.schema import ZendeskPush
from kbms.reprocess import reprocess
from kbms.settings import Settings
from kbms.storage import open_store
from tests.conftest import ENGINES, engine_url
from tests.support.helpers import zendesk_pushes


def _notification(item: dict[str, Any], topic: str) -> dict[str, Any]:
    return {"type": "notification_event", "app_id": "app1", "id": "notif_1", "topic": topic, "data": {"item": item}}


PERSON = {"type": "admin", "id": 7, "name": "Ben"}
OPENING = {"id": "m0", "body": "<p>Hi</p>", "author": {"type": "user", "id": "u1"}, "attachments": [{"filesize": 9}]}
INTERCOM_ITEM = {
    "type": "conversation",
    "id": "c1",
    "created_at": 1_700_000_000,
    "updated_at": 1_700_000_100,
    "source": OPENING,
    "conversation_message": OPENING,
    "conversation_parts": {
        "conversation_parts": [
            {
                "id": "p1",
                "body": "x",
                "created_at": 1,
                "updated_at": 2,
                "author": PERSON,
                "attachments": [{"filesize": 1}],
            }
        ]
    },
    "admin_assignee_id": 7,
    "team_assignee_id": 8,
    "assignee": PERSON,
    "contacts": {"contacts": [PERSON]},
    "customers": [PERSON],
    "user": PERSON,
}
ZENDESK_ATTACHMENT = {"id": 5, "file_name": "a.txt", "size": 3}
ZENDESK_TICKET = {
    "id": 35436,
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-02T00:00:00Z",
    "requester_id": 1,
    "assignee_id": 2,
    "actor_id": 2,
    "via": {"channel": "web"},
}
ZENDESK_EVENT = {"account_id": 1, "id": "e1", "time": "2026-01-02T00:00:00Z", "detail": ZENDESK_TICKET}
EVENT_COMMENT = {
    "id": "9",
    "body": "hi",
    "author": {"id": "2"},
    "attachment": ZENDESK_ATTACHMENT,
    "attachments": [ZENDESK_ATTACHMENT],
}
# Per provider and way in: the schema that documents it, and documents that between them hold every field it
# types as a number (the first document holding a field is the one it is tested in).
BOOLEAN_CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "intercom push": (
        IntercomConversation.model_json_schema(),
        [INTERCOM_ITEM],
    ),
    "intercom webhook": (
        REGISTRY["intercom"].webhooks.delivery_schema(),  # type: ignore[union-attr]
        [
            _notification(INTERCOM_ITEM, "conversation.admin.replied"),
            _notification({"type": "conversation", "conversation_id": "c1"}, "conversation.deleted"),
        ],
    ),
    "zendesk push": (
        ZendeskPush.model_json_schema(),
        [
            {
                "ticket": ZENDESK_TICKET,
                "comments": [{"id": 1, "author_id": 1, "created_at": 1, "attachments": [ZENDESK_ATTACHMENT]}],
                "users": [{"id": 1}],
            }
        ],
    ),
    "zendesk webhook": (
        REGISTRY["zendesk"].webhooks.delivery_schema(),  # type: ignore[union-attr]
        [
            {**ZENDESK_EVENT, "type": "ticket.comment_added", "event": {"comment": EVENT_COMMENT}},
            {
                **ZENDESK_EVENT,
                "type": "messaging_ticket.message_added",
                "event": {"message": {"id": "m1", "body": "hi"}, "actor": {"id": "2"}},
            },
        ],
    ),
}


def numeric_paths(
    schema: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every path at which ``schema`` allows a number (an integer included), through refs, unions and arrays
    (whose items are reached at index 0)."""
    if "$ref" in schema:
        yield from numeric_paths(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, path)
    if schema.get("type") in ("integer", "number"):
        yield path
    for key in ("anyOf", "allOf", "oneOf"):
        for member in schema.get(key, []):
            yield from numeric_paths(member, defs, path)
    for name, member in schema.get("properties", {}).items():
        yield from numeric_paths(member, defs, (*path, name))
    if isinstance(schema.get("items"), dict):
        yield from numeric_paths(schema["items"], defs, (*path, "0"))


def _at(document: Any, path: tuple[str, ...]) -> tuple[Any, Any] | None:
    """(container, key) of ``path`` in ``document``; None when the document does not hold it."""
    node = document
    for index, step in enumerate(path):
        key: Any = int(step) if isinstance(node, list) else step
        if (isinstance(node, list) and key < len(node)) or (isinstance(node, dict) and key in node):
            if index == len(path) - 1:
                return node, key
            node = node[key]
        else:
            return None
    return None


def _boolean_cases() -> Iterator[Any]:
    for case, (schema, documents) in BOOLEAN_CASES.items():
        paths = list(dict.fromkeys(numeric_paths(schema, schema.get("$defs", {}))))
        assert paths, case
        for path in paths:
            holder = next((document for document in documents if _at(document, path) is not None), None)
            assert holder is not None, f"{case}: no document holds {'.'.join(path)}; add it to BOOLEAN_CASES"
            for value in (True, False):
                yield pytest.param(case, holder, path, value, id=f"{case}-{'.'.join(path)}-{value}")


def _read(case: str, document: Any) -> object:
    provider = REGISTRY[case.split()[0]]
    body = json.dumps(document).encode()
    if case.endswith("push"):
        return provider.parse_push(body, workspace=None, default_workspace="default")
    assert provider.webhooks is not None
    return provider.webhooks.parse(body, workspace="acme")


@pytest.mark.parametrize("case", list(BOOLEAN_CASES))
def test_the_boolean_documents_are_valid_as_they_are(case: str) -> None:
    for document in BOOLEAN_CASES[case][1]:
        _read(case, document)


@pytest.mark.parametrize(("case", "document", "path", "value"), list(_boolean_cases()))
def test_a_boolean_where_a_number_or_id_is_expected_is_a_422_at_its_field(
    case: str, document: Any, path: tuple[str, ...], value: bool
) -> None:
    changed = copy.deepcopy(document)
    container, key = _at(changed, path)  # type: ignore[misc]
    container[key] = value
    with pytest.raises(ValidationFailed) as refused:
        _read(case, changed)
    assert status_of(refused.value) == (422, "validation_error")
    assert ".".join(path) in [issue.field for issue in refused.value.issues]


def test_a_zendesk_attachment_size_of_false_is_422(client: TestClient) -> None:
    push = copy.deepcopy(dict(zendesk_pushes())["01_02_docs_ticket_with_comment"])
    push["comments"][0]["attachments"][0]["size"] = False
    response = client.post("/integrations/zendesk/conversations", json=push)
    assert response.status_code == 422
    assert response.json()["details"] == [
        {"field": "comments.0.attachments.0.size", "issue": "int_type", "message": "Input should be an integer"}
    ]
    assert client.get("/internal/conversations").json()["items"] == []


@pytest.mark.parametrize(
    ("size", "status"), [("1843200", 201), (1843200.0, 201), ("1.5", 422), ("-3", 422), (" 7", 422)]
)
def test_a_size_in_digits_is_read_as_before_and_other_text_is_not(
    client: TestClient, size: object, status: int
) -> None:
    # pydantic's lax int read "1843200" too: a payload an older kbms accepted reads the same in kbms reprocess.
    push = copy.deepcopy(dict(zendesk_pushes())["01_02_docs_ticket_with_comment"])
    push["comments"][0]["attachments"][0]["size"] = size
    response = client.post("/integrations/zendesk/conversations", json=push)
    assert response.status_code == status
    if status == 201:
        detail = client.get(f"/internal/conversations/{response.json()['id']}").json()
        sizes = [a["size"] for m in detail["messages"] for a in m["attachments"]]
        assert 1843200 in sizes


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [True, " 7", "1_000", "-3"])
async def test_reprocess_reads_an_accepted_size_as_the_kbms_that_accepted_it(
    engine: str, size: object, tmp_path: Path
) -> None:
    # An older kbms read an attachment size with pydantic's lax int and kept the payload as accepted. kbms reprocess
    # must read it the same way, not refuse it now and delete the conversation; a payload kept as rejected stays so.
    accepted = copy.deepcopy(dict(zendesk_pushes())["01_02_docs_ticket_with_comment"])
    accepted["comments"][0]["attachments"][0]["size"] = size
    rejected = copy.deepcopy(accepted)
    rejected["ticket"]["id"] = 999_001
    provider = REGISTRY["zendesk"]
    with engine_url(engine, tmp_path) as url:
        store = open_store(Settings(database_url=url))
        try:
            body = json.dumps(accepted).encode()
            with reading_the_ledger():
                snapshot = provider.parse_push(body, workspace=None, default_workspace="default")
            applied = await store.ingest(push(body, snapshot.workspace), snapshot)
            assert applied.conversation_id is not None
            refused = accept(
                provider,
                json.dumps(rejected).encode(),
                workspace=None,
                default_workspace="default",
                limits=DEFAULT_LIMITS,
            )
            assert isinstance(refused, ValidationFailed)  # at arrival, the same size is refused
            await store.reject(push(json.dumps(rejected).encode(), "default"), refused.issues)

            report = await reprocess(store, providers=REGISTRY)

            assert (report.changed, report.deliveries_reclassified) == (0, 0)
            assert await store.get_conversation(applied.conversation_id) is not None
            page = await store.list_conversations(limit=10, cursor=None)
            assert [item.external_id for item in page.items] == [snapshot.external_id]
        finally:
            await store.close()


def push(body: bytes, workspace: str) -> Delivery:
    body_hash = hashlib.sha256(body).hexdigest()
    return Delivery(
        provider="zendesk",
        workspace=workspace,
        kind="push",
        topic=None,
        delivery_key=push_delivery_key(None, body_hash),
        body_hash=body_hash,
        body=body,
        received_at=datetime.now(UTC),
    )
