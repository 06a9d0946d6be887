"""Completeness over HTTP, on both engines: the detail's ``completeness`` and the list's ``?truncated=``."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.support.helpers import JSON_HEADERS, dumps, intercom_payload, part

INGEST = "/integrations/intercom/conversations"


def push(client: TestClient, external_id: str, *, total_count: int | None) -> str:
    payload = intercom_payload(external_id, parts=[part(f"{external_id}-1", "<p>one</p>")])
    if total_count is not None:
        payload["conversation_parts"]["total_count"] = total_count
    response = client.post(INGEST, content=dumps(payload), headers=JSON_HEADERS)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_the_detail_says_how_complete_it_is_and_the_list_finds_what_was_cut_short(client: TestClient) -> None:
    cut = push(client, "cut", total_count=700)
    whole = push(client, "whole", total_count=1)
    unknown = push(client, "unknown", total_count=None)
    details = {key: client.get(f"/internal/conversations/{key}").json()["completeness"] for key in (cut, whole)}
    assert details[cut] == {"provider_count": 701, "stored_count": 2, "truncated": True}
    assert details[whole] == {"provider_count": 2, "stored_count": 2, "truncated": False}
    assert client.get(f"/internal/conversations/{unknown}").json()["completeness"] == {
        "provider_count": None,
        "stored_count": 2,
        "truncated": False,
    }

    def listed(**params: str) -> list[str]:
        response = client.get("/internal/conversations", params=params)
        assert response.status_code == 200, response.text
        return sorted(item["external_id"] for item in response.json()["items"])

    assert listed(truncated="true") == ["cut"]
    assert listed(truncated="false") == ["unknown", "whole"]
    assert listed(truncated="true", q="one") == ["cut"]
    exported = client.get("/internal/exports/conversations.ndjson", params={"truncated": "true"})
    assert exported.headers["x-kbms-count"] == "1"


def test_a_truncated_filter_that_is_no_boolean_is_a_422(client: TestClient) -> None:
    response = client.get("/internal/conversations", params={"truncated": "maybe"})
    assert response.status_code == 422
    assert [issue["field"] for issue in response.json()["details"]] == ["truncated"]
