"""The original design document's API contract, checked against its own examples (docs/original-design.md)."""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.helpers import JSON_HEADERS, original_examples, original_request_text

EXAMPLES = original_examples()
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
INGEST = "/integrations/intercom/conversations"


def same_shape(example: Any, got: Any, path: str = "") -> None:
    """Every field of the example is in the answer, with the same JSON type (kbms may add fields)."""
    if isinstance(example, dict):
        assert isinstance(got, dict), path
        for key, value in example.items():
            assert key in got, f"{path}.{key} missing"
            if value is not None:
                same_shape(value, got[key], f"{path}.{key}")
    elif isinstance(example, list):
        assert isinstance(got, list), path
        for item in got:
            same_shape(example[0], item, f"{path}[]")
    else:
        assert type(got) is type(example), f"{path}: {got!r} is not like {example!r}"
        if isinstance(example, str) and ISO_Z.match(example):
            assert ISO_Z.match(got), f"{path}: {got!r} is not an ISO-8601 Z timestamp"


def test_the_examples_were_found() -> None:
    assert {
        "Example Request",
        "Example Success Response (201 created)",
        "Example Success Response (200 deduplicated)",
        "Example Response",
        "Example Response (200)",
        "Example Response (404)",
        "Malformed JSON returns:",
    } <= set(EXAMPLES)
    assert any(title.startswith("Validation failures return") for title in EXAMPLES)


def test_example_request_is_created_then_deduplicated(client: TestClient) -> None:
    created = client.post(INGEST, content=original_request_text(), headers=JSON_HEADERS)
    assert created.status_code == 201
    body = created.json()
    same_shape(EXAMPLES["Example Success Response (201 created)"], body)
    assert (body["provider"], body["external_id"], body["deduplicated"]) == ("intercom", "1122334455", False)
    assert uuid.UUID(body["id"])
    assert body["result"] == "created"

    again = client.post(INGEST, content=original_request_text(), headers=JSON_HEADERS)
    assert again.status_code == 200
    dedup = again.json()
    same_shape(EXAMPLES["Example Success Response (200 deduplicated)"], dedup)
    assert (dedup["id"], dedup["deduplicated"], dedup["result"]) == (body["id"], True, "unchanged")


def test_example_request_re_serialized_is_still_one_conversation(client: TestClient) -> None:
    request = EXAMPLES["Example Request"]
    first = client.post(INGEST, json=request).json()
    second = client.post(INGEST, content=json.dumps(request, indent=4), headers=JSON_HEADERS)
    assert second.status_code == 200
    assert second.json() == {**first, "deduplicated": True, "result": "unchanged"}


def test_list_matches_the_example(client: TestClient) -> None:
    created = client.post(INGEST, json=EXAMPLES["Example Request"]).json()
    listed = client.get("/internal/conversations")
    assert listed.status_code == 200
    body = listed.json()
    same_shape(EXAMPLES["Example Response"], body)
    item = body["items"][0]
    assert (item["id"], item["external_id"], item["provider"]) == (created["id"], "1122334455", "intercom")
    assert (item["created_at"], item["updated_at"]) == ("2019-09-05T14:20:09Z", "2019-09-13T09:44:41Z")
    assert (item["participant_count"], item["message_count"]) == (1, 2)
    assert item["last_message_at"] == "2019-09-05T14:21:13Z"
    assert item["last_message_preview"].startswith("We've removed this part of the conversation")
    assert body["next_cursor"] is None


def test_detail_matches_the_example(client: TestClient) -> None:
    created = client.post(INGEST, json=EXAMPLES["Example Request"]).json()
    detail = client.get(f"/internal/conversations/{created['id']}")
    assert detail.status_code == 200
    body = detail.json()
    same_shape(EXAMPLES["Example Response (200)"], body)
    assert body["participants"] == [{"id": "5310d8e7598c9a0b24000002", "role": "customer", "name": None, "email": None}]
    assert body["assignee_participant_id"] == "1223334"  # assigned, but never wrote: not a participant
    assert body["participants"][0] == {
        "id": "5310d8e7598c9a0b24000002",
        "role": "customer",
        "name": None,
        "email": None,
    }
    assert [(m["id"], m["author_participant_id"], m["sent_at"]) for m in body["messages"]] == [
        ("409820079", "5310d8e7598c9a0b24000002", "2019-09-05T14:20:09Z"),
        ("1223445555", "5310d8e7598c9a0b24000002", "2019-09-05T14:21:13Z"),
    ]


def test_unknown_conversation_is_the_example_404(client: TestClient) -> None:
    response = client.get(f"/internal/conversations/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json() == EXAMPLES["Example Response (404)"]


def test_validation_error_is_the_example_field_for_field(client: TestClient) -> None:
    request = copy.deepcopy(EXAMPLES["Example Request"])
    del request["conversation_message"]["author"]["id"]
    response = client.post(INGEST, json=request)
    assert response.status_code == 422
    example = next(v for k, v in EXAMPLES.items() if k.startswith("Validation failures return"))
    assert response.json() == example


def test_malformed_json_is_the_example(client: TestClient) -> None:
    response = client.post(INGEST, content=original_request_text()[:-20], headers=JSON_HEADERS)
    assert response.status_code == 400
    assert response.json() == EXAMPLES["Malformed JSON returns:"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", None), ("created_at", None), ("conversation_message", None)],
)
def test_each_required_field_of_the_original_is_required(client: TestClient, field: str, value: None) -> None:
    request = copy.deepcopy(EXAMPLES["Example Request"])
    del request[field]
    response = client.post(INGEST, json=request)
    assert response.status_code == 422
    assert response.json()["details"] == [{"field": field, "issue": "missing", "message": "Field required"}]


def test_docs_and_health(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
