"""Every refusal is a clear 4xx with the error body; nothing is half-stored; surprises are 500s without a trace."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from kbms.api import create_app
from kbms.errors import StorageUnavailable
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations, ledger
from tests.support.helpers import JSON_HEADERS, ExplodingStore, dumps, intercom_payload, original_examples, part

INGEST = "/integrations/intercom/conversations"
REQUEST = original_examples()["Example Request"]


def stored(database_url: str) -> tuple[int, int]:
    """(conversations, ledger rows that are not rejections)."""
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            n_conversations = conn.execute(select(func.count()).select_from(conversations)).scalar_one()
            n_accepted = conn.execute(
                select(func.count()).select_from(ledger).where(ledger.c.outcome != "rejected")
            ).scalar_one()
            return int(n_conversations), int(n_accepted)
    finally:
        engine.dispose()


def error(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error_code", "message", "details"}
    return response.status_code, body["error_code"]


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"\xff\xfe{}", b'{"id": "\xc3\x28"}', b'{"id": "\\ud800"}', b"nul\x00", b"{}{}", b"[1,]"],
    ids=["empty", "truncated", "utf16-bom", "invalid-utf8", "lone-surrogate", "garbage", "two-docs", "trailing-comma"],
)
def test_malformed_json_is_400(client: TestClient, database_url: str, body: bytes) -> None:
    response = client.post(INGEST, content=body, headers=JSON_HEADERS)
    assert error(response) == (400, "invalid_json")
    assert response.json() == {"error_code": "invalid_json", "message": "Malformed JSON body", "details": None}
    assert stored(database_url) == (0, 0)


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_422(client: TestClient, body: bytes) -> None:
    response = client.post(INGEST, content=body, headers=JSON_HEADERS)
    assert error(response) == (422, "validation_error")
    assert response.json()["details"][0]["field"] == "body"


def mutate(path: str, value: Any, *, delete: bool = False) -> dict[str, Any]:
    request: dict[str, Any] = copy.deepcopy(REQUEST)
    *parents, last = path.split(".")
    node: Any = request
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return request


@pytest.mark.parametrize(
    ("path", "value", "field", "issue"),
    [
        ("id", "", "id", "string_too_short"),
        ("id", "   ", "id", "string_too_short"),
        ("id", True, "id", "string_type"),
        ("id", 1.5, "id", "string_type"),
        ("id", {"a": 1}, "id", "string_type"),
        ("created_at", True, "created_at", "timestamp_type"),
        ("created_at", 1567693209.5, "created_at", "timestamp_type"),
        ("created_at", 1567693209000, "created_at", "timestamp_range"),
        ("created_at", -1, "created_at", "timestamp_range"),
        ("created_at", "2101-01-01T00:00:00Z", "created_at", "timestamp_range"),
        ("created_at", "yesterday", "created_at", "timestamp_parsing"),
        ("created_at", "9999-12-31T23:59:59-23:59", "created_at", "timestamp_range"),
        ("created_at", "0001-01-01T00:00:00+01:00", "created_at", "timestamp_range"),
        ("created_at", "9" * 5000, "created_at", "timestamp_range"),
        ("created_at", "99999999999999", "created_at", "timestamp_range"),
        ("updated_at", False, "updated_at", "timestamp_type"),
        ("conversation_message.body", None, "conversation_message.body", "string_type"),
        ("conversation_message.author.id", "", "conversation_message.author.id", "string_too_short"),
        ("conversation_message.author", None, "conversation_message.author", "model_type"),
        (
            "conversation_parts.conversation_parts.0.id",
            None,
            "conversation_parts.conversation_parts.0.id",
            "string_type",
        ),
        (
            "conversation_parts.conversation_parts.0.created_at",
            1.5,
            "conversation_parts.conversation_parts.0.created_at",
            "timestamp_type",
        ),
    ],
)
def test_validation_rules(client: TestClient, database_url: str, path: str, value: Any, field: str, issue: str) -> None:
    response = client.post(INGEST, json=mutate(path, value))
    assert error(response) == (422, "validation_error")
    assert {"field": field, "issue": issue} in [
        {"field": d["field"], "issue": d["issue"]} for d in response.json()["details"]
    ]
    assert stored(database_url) == (0, 0)


def test_lower_case_rfc_3339_timestamps_are_read(client: TestClient) -> None:
    # RFC 3339 allows "t" and "z"; payload timestamps and the list's bounds read them the same way.
    response = client.post(INGEST, json=mutate("created_at", "2019-09-05t14:20:09z"))
    assert response.status_code == 201, response.text
    detail = client.get(f"/internal/conversations/{response.json()['id']}").json()
    assert detail["created_at"] == "2019-09-05T14:20:09Z"


def test_a_number_without_a_fraction_is_an_integer(client: TestClient) -> None:
    # JSON has one number type, and the OpenAPI document (JSON Schema) counts 5.0 as the integer 5.
    payload = copy.deepcopy(REQUEST)
    payload["id"] = 1122334455.0
    payload["created_at"] = 1567693209.0
    payload["conversation_message"]["author"]["id"] = 42.0
    response = client.post(INGEST, json=payload)
    assert response.status_code == 201, response.text
    assert response.json()["external_id"] == "1122334455"
    detail = client.get(f"/internal/conversations/{response.json()['id']}").json()
    assert detail["created_at"] == "2019-09-05T14:20:09Z"
    assert "42" in [p["id"] for p in detail["participants"]]


def test_a_part_without_an_id_is_refused(client: TestClient) -> None:
    response = client.post(INGEST, json=mutate("conversation_parts.conversation_parts.0.id", None, delete=True))
    assert response.status_code == 422
    assert response.json()["details"] == [
        {"field": "conversation_parts.conversation_parts.0.id", "issue": "missing", "message": "Field required"}
    ]


def test_source_shape_errors_name_source_fields(client: TestClient) -> None:
    payload = intercom_payload()
    del payload["source"]["author"]["id"]
    response = client.post(INGEST, json=payload)
    assert response.json()["details"] == [
        {"field": "source.author.id", "issue": "missing", "message": "Field required"}
    ]


def test_timestamps_may_be_iso_or_digit_strings(client: TestClient) -> None:
    payload = intercom_payload(parts=[part("p1", at=0)])
    payload["created_at"] = "1700000000"
    payload["conversation_parts"]["conversation_parts"][0]["created_at"] = "2023-11-14T22:13:20.000Z"
    assert client.post(INGEST, json=payload).status_code == 201


def test_rejected_payloads_are_kept_in_the_ledger_only(client: TestClient, database_url: str) -> None:
    client.post(INGEST, json=mutate("id", ""))
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(ledger.c.outcome, ledger.c.error)).all()
    finally:
        engine.dispose()
    assert [row.outcome for row in rows] == ["rejected"]
    assert '"field":"id"' in rows[0].error
    assert stored(database_url) == (0, 0)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", "application/xml"],
)
def test_non_json_media_types_are_415(client: TestClient, content_type: str) -> None:
    response = client.post(INGEST, content=dumps(REQUEST), headers={"content-type": content_type})
    assert error(response) == (415, "unsupported_media_type")


def test_compressed_bodies_are_415(client: TestClient) -> None:
    headers = {**JSON_HEADERS, "content-encoding": "gzip"}
    assert error(client.post(INGEST, content=dumps(REQUEST), headers=headers)) == (415, "unsupported_media_type")


def test_json_nested_too_deeply_says_so(client: TestClient) -> None:
    response = client.post(INGEST, content=b"[" * 300 + b"]" * 300, headers=JSON_HEADERS)
    assert response.json() == {
        "error_code": "invalid_json",
        "message": "JSON nested deeper than 200 levels",
        "details": None,
    }


def test_a_large_body_is_parsed_off_the_event_loop_and_stored(client: TestClient) -> None:
    big = intercom_payload("big", parts=[part(f"p{i}", "<p>" + "word " * 200 + "</p>") for i in range(100)])
    body = dumps(big)
    assert len(body) > 64 * 1024
    response = client.post(INGEST, content=body, headers=JSON_HEADERS)
    assert response.status_code == 201
    detail = client.get(f"/internal/conversations/{response.json()['id']}").json()
    assert len(detail["messages"]) == 101


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/vnd.intercom+json", None]
)
def test_json_media_types_are_read(client: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert client.post(INGEST, content=dumps(REQUEST), headers=headers).status_code == 201


@pytest.fixture
def small_client(database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=database_url, max_body_bytes=2048))) as test_client:
        yield test_client


def test_too_large_by_content_length_is_413(small_client: TestClient, database_url: str) -> None:
    response = small_client.post(INGEST, content=b" " * 4096 + dumps(REQUEST), headers=JSON_HEADERS)
    assert error(response) == (413, "payload_too_large")
    assert stored(database_url) == (0, 0)


def test_too_large_is_caught_while_streaming_without_content_length(small_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked, with no Content-Length
        for _ in range(1000):
            yield b" " * 1024

    response = small_client.post(INGEST, content=chunks(), headers=JSON_HEADERS)
    assert error(response) == (413, "payload_too_large")


def test_unknown_paths_and_providers_are_404(client: TestClient) -> None:
    assert error(client.get("/nope")) == (404, "not_found")
    assert error(client.post("/integrations/unknown/conversations", json=REQUEST)) == (404, "not_found")


def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    response = client.put("/internal/conversations")
    assert error(response) == (405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-3", "limit"),
        ("limit=abc", "limit"),
        ("cursor=!!", "cursor"),
        ("cursor=djE6eDp5", "cursor"),
        ("cursor=djE6OTk5OTk5OTk5OTk5OTk5OTk5OTk6MQ", "cursor"),
        ("limit=1&limit=2", "limit"),  # which one was meant cannot be known
        ("updated_after=1&updated_after=1", "updated_after"),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, query: str, field: str) -> None:
    response = client.get(f"/internal/conversations?{query}")
    assert error(response) == (422, "validation_error")
    assert response.json()["details"][0]["field"] == field


def test_bad_workspace_is_422(client: TestClient) -> None:
    response = client.post(f"{INGEST}?workspace=a%20b", json=REQUEST)
    assert error(response) == (422, "validation_error")
    assert response.json()["details"][0]["field"] == "workspace"


def test_unexpected_errors_are_500_without_a_trace(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url), store=ExplodingStore(RuntimeError("secret-token-1234")))  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.post(INGEST, json=REQUEST)
    assert response.status_code == 500
    assert response.json() == {"error_code": "internal_error", "message": "Internal server error", "details": None}
    assert "secret-token-1234" not in response.text


def test_database_unavailable_is_503_with_retry_after(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url), store=ExplodingStore(StorageUnavailable("db down")))  # type: ignore[arg-type]
    with TestClient(app) as test_client:
        response = test_client.post(INGEST, json=REQUEST)
        ready = test_client.get("/ready")
    assert error(response) == (503, "unavailable")
    assert response.headers["retry-after"] == "1"
    assert error(ready) == (503, "unavailable")


def test_openapi_documents_every_answer(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    ingest = document["paths"][INGEST]["post"]
    assert {"200", "201", "400", "413", "415", "422", "500", "503"} <= set(ingest["responses"])
    body_ref = ingest["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    assert document["paths"]["/internal/conversations/{conversation_id}"]["get"]["responses"]["404"]
    for path in document["paths"].values():
        for operation in path.values():
            for answer in operation["responses"].values():
                for media in answer.get("content", {}).values():
                    ref = media["schema"].get("$ref", "")
                    assert not ref.endswith("HTTPValidationError")
