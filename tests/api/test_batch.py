"""POST /integrations/intercom/conversations/batch: NDJSON in, one result per line, bad lines rejected alone."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from kbms.api import create_app
from kbms.api.body import MAX_BATCH_LINES, ndjson_lines
from kbms.errors import StorageUnavailable
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations, ledger
from tests.conftest import migrate
from tests.support.helpers import dumps, intercom_conversations, intercom_payload, part

BATCH = "/integrations/intercom/conversations/batch"
SINGLE = "/integrations/intercom/conversations"
NDJSON = {"content-type": "application/x-ndjson"}


def ndjson(*lines: bytes | dict[str, Any]) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else dumps(line) for line in lines) + b"\n"


def stored(database_url: str, table: Any = conversations) -> int:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


def test_every_line_is_answered_and_a_bad_line_is_rejected_alone(client: TestClient, database_url: str) -> None:
    body = ndjson(
        intercom_payload("a"),
        b"{not json",
        intercom_payload(""),  # an empty id breaks the schema
        b"   ",  # blank lines are skipped, but numbered and counted
        intercom_payload("b", parts=[part("p1")]),
        intercom_payload("a"),  # the same body again
        intercom_payload("b", updated_at=1_800_000_000, parts=[part("p2")]),
    )
    response = client.post(BATCH, content=body, headers=NDJSON)
    assert response.status_code == 200
    answer = response.json()
    assert {k: answer[k] for k in ("lines", "created", "updated", "unchanged", "rejected")} == {
        "lines": 7,
        "created": 2,
        "updated": 1,
        "unchanged": 1,
        "rejected": 2,
    }
    results = answer["results"]
    assert [(r["line"], r["status"], r["result"]) for r in results if r["line"] not in (5, 7)] == [
        (1, 201, "created"),
        (2, 400, "rejected"),
        (3, 422, "rejected"),
        (6, 200, "unchanged"),
    ]
    # Lines 5 and 7 are two versions of one conversation: applied in delivery-key (body hash) order, not line order,
    # so which of them creates it depends on the bytes.
    assert sorted((r["status"], r["result"]) for r in results if r["line"] in (5, 7)) == [
        (200, "updated"),
        (201, "created"),
    ]
    assert results[1]["error"] == {"error_code": "invalid_json", "message": "Malformed JSON body", "details": None}
    assert results[2]["error"]["error_code"] == "validation_error"
    assert results[2]["error"]["details"][0]["field"] == "id"
    assert results[0]["id"] == results[4]["id"]
    assert results[4]["deduplicated"] is True
    assert results[0]["external_id"] == "a"
    assert results[0]["deduplicated"] is False
    assert all(r["id"] is None and r["error"] for r in results if r["result"] == "rejected")

    detail = client.get(f"/internal/conversations/{results[5]['id']}").json()
    assert [m["id"] for m in detail["messages"]] == ["b-m0", "p1", "p2"]
    assert stored(database_url) == 2
    # The schema-breaking line is kept in the ledger (a later mapper may read it); the non-JSON line is not.
    assert stored(database_url, ledger) == 4


def test_a_batch_stores_exactly_what_single_pushes_store(tmp_path: Path, database_url: str) -> None:
    payloads = [json.dumps(conversation).encode() for _name, _workspace, conversation in intercom_conversations()]
    # Two versions of one conversation, newest first: order must not matter.
    payloads += [dumps(intercom_payload("v", updated_at=1_800_000_000, parts=[part("p2")]))]
    payloads += [dumps(intercom_payload("v", parts=[part("p1")]))]
    with TestClient(create_app(Settings(database_url=database_url))) as client:
        results = client.post(BATCH, content=b"\n".join(payloads), headers=NDJSON).json()["results"]
        assert all(r["status"] in (200, 201) for r in results), results
        batched = {r["id"]: client.get(f"/internal/conversations/{r['id']}").content for r in results}

    single_url = f"sqlite:///{tmp_path / 'single.db'}"
    with TestClient(create_app(Settings(database_url=migrate(single_url)))) as client:
        ids = [
            client.post(SINGLE, content=p, headers={"content-type": "application/json"}).json()["id"] for p in payloads
        ]
        single = {i: client.get(f"/internal/conversations/{i}").content for i in ids}
    assert batched == single


def test_sending_a_batch_again_changes_nothing(client: TestClient, database_url: str) -> None:
    body = ndjson(*(intercom_payload(f"c{i}", parts=[part(f"p{i}")]) for i in range(20)))
    first = client.post(BATCH, content=body, headers=NDJSON).json()
    again = client.post(BATCH, content=body, headers=NDJSON).json()
    assert (first["created"], again["unchanged"], again["created"]) == (20, 20, 0)
    assert [r["id"] for r in first["results"]] == [r["id"] for r in again["results"]]
    assert all(r["deduplicated"] for r in again["results"])
    assert (stored(database_url), stored(database_url, ledger)) == (20, 20)


def test_a_redaction_scrubs_the_raw_copy_an_earlier_line_of_its_batch_kept(
    client: TestClient, database_url: str
) -> None:
    # Each line's ledger row learns its conversation at the end of the batch's transaction (with the commit, on
    # PostgreSQL): the redaction must still find the first line's raw copy of the text, in the same transaction.
    secret = "my card is 4242 4242 4242 4242"
    original = intercom_payload("c9", updated_at=1_700_000_200, parts=[part("p1", f"<p>{secret}</p>")])
    deleted = part("p1", "<p><i>This message was deleted</i></p>", updated_at=1_700_000_300, redacted=True)
    redaction = intercom_payload("c9", updated_at=1_700_000_300, parts=[deleted])
    # A batch applies one conversation's lines in the order of their delivery keys (the body's SHA-256): the
    # original must come first, or it would be scrubbed before it is kept, another path.
    for attempt in itertools.count():
        if hashlib.sha256(dumps(original)).hexdigest() < hashlib.sha256(dumps(redaction)).hexdigest():
            break
        original["title"] = f"Card {attempt}"
    response = client.post(BATCH, content=ndjson(original, redaction), headers=NDJSON)
    assert [line["result"] for line in response.json()["results"]] == ["created", "updated"]
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            kept = conn.execute(select(ledger.c.body, ledger.c.outcome).order_by(ledger.c.pk)).all()
    finally:
        engine.dispose()
    assert [outcome for _body, outcome in kept] == ["created", "updated"]
    assert not [body for body, _outcome in kept if secret.encode() in body]


def test_crlf_line_endings_and_media_type_parameters(client: TestClient) -> None:
    body = dumps(intercom_payload("a")) + b"\r\n" + dumps(intercom_payload("b")) + b"\r\n"
    response = client.post(BATCH, content=body, headers={"content-type": "application/x-ndjson; charset=utf-8"})
    assert [r["status"] for r in response.json()["results"]] == [201, 201]
    # The ledger keeps each line without its line break, as if it had been pushed alone: a push is a repeat.
    again = client.post(SINGLE, content=dumps(intercom_payload("a")), headers={"content-type": "application/json"})
    assert again.json()["result"] == "unchanged"


@pytest.mark.parametrize("media_type", ["application/ndjson", "application/jsonl", None])
def test_ndjson_media_types_are_accepted(client: TestClient, media_type: str | None) -> None:
    headers = {"content-type": media_type} if media_type else {}
    response = client.post(BATCH, content=ndjson(intercom_payload("a")), headers=headers)
    assert response.json()["created"] == 1


@pytest.mark.parametrize("media_type", ["application/json", "text/plain", "application/x-ndjson; charset=latin-1"])
def test_other_media_types_are_415(client: TestClient, media_type: str) -> None:
    response = client.post(BATCH, content=ndjson(intercom_payload("a")), headers={"content-type": media_type})
    assert response.status_code == 415
    assert response.json()["error_code"] == "unsupported_media_type"
    assert "application/x-ndjson" in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "lines", "numbers"),
    [
        (b"A\n\nA\n", 3, [1, 3]),
        (b"A\n \n\t\nA\n\n\n", 6, [1, 4]),  # blank lines in the middle and at the end
        (b"A\r\n\r\nA\r\n\r\n", 4, [1, 3]),  # CRLF
        (b"\nA", 2, [2]),  # no final line break: the last line still counts
        (b"A\n   ", 2, [1]),  # a last line of spaces is a line
    ],
)
def test_lines_counts_every_line_of_the_body_and_results_are_numbered_in_it(
    client: TestClient, body: bytes, lines: int, numbers: list[int]
) -> None:
    payloads = iter([dumps(intercom_payload("a")), dumps(intercom_payload("b"))])
    body = b"".join(next(payloads) if piece == b"A" else piece for piece in re.split(b"(A)", body))
    answer = client.post(BATCH, content=body, headers=NDJSON).json()
    assert answer["lines"] == lines
    assert [r["line"] for r in answer["results"]] == numbers
    assert max(r["line"] for r in answer["results"]) <= answer["lines"]


@given(
    st.lists(st.sampled_from([b"{}", b"x", b"", b" ", b"\t", b"\r"]), min_size=1, max_size=12),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)
def test_ndjson_lines_agrees_with_the_lines_it_was_made_of(lines: list[bytes], end: bytes, final: bool) -> None:
    data = end.join(lines) + (end if final else b"")
    count, numbered = ndjson_lines(data)
    # A last line that is empty is indistinguishable from a final line break: it is not a line.
    made_of = lines[:-1] if lines[-1] == b"" and not final else lines
    assert count == len(made_of)
    assert numbered == [(number, line) for number, line in enumerate(made_of, start=1) if line.strip()]


def test_blank_lines_do_not_count_toward_the_limit(client: TestClient, database_url: str) -> None:
    # Lines that are not JSON: refused without a write, so the limit is tested without ingesting 1,000 payloads.
    answer = client.post(BATCH, content=b"x\n\n" * MAX_BATCH_LINES, headers=NDJSON).json()
    assert (answer["lines"], answer["rejected"], len(answer["results"])) == (2 * MAX_BATCH_LINES, 1000, 1000)
    assert answer["results"][-1]["line"] == 2 * MAX_BATCH_LINES - 1
    assert stored(database_url, ledger) == 0


def test_an_empty_batch_is_422(client: TestClient) -> None:
    response = client.post(BATCH, content=b"\n \n", headers=NDJSON)
    assert response.status_code == 422
    assert response.json()["details"] == [
        {"field": "body", "issue": "empty_batch", "message": "The batch has no lines"}
    ]


def test_too_many_lines_is_413_and_nothing_is_stored(client: TestClient, database_url: str) -> None:
    body = ndjson(*(intercom_payload(f"c{i}") for i in range(MAX_BATCH_LINES + 1)))
    response = client.post(BATCH, content=body, headers=NDJSON)
    assert response.status_code == 413
    message = f"A batch holds at most 1000 non-blank lines; this one has {MAX_BATCH_LINES + 1}"
    assert response.json()["message"] == message
    assert stored(database_url, ledger) == 0


def test_limits_on_the_body_and_on_each_line(database_url: str) -> None:
    settings = Settings(database_url=database_url, max_body_bytes=2048, max_batch_bytes=8192)
    with TestClient(create_app(settings)) as client:
        big = intercom_payload("big", parts=[part("p", "<p>" + "x" * 3000 + "</p>")])
        response = client.post(BATCH, content=ndjson(intercom_payload("a"), big, intercom_payload("b")), headers=NDJSON)
        assert [(r["line"], r["status"]) for r in response.json()["results"]] == [(1, 201), (2, 413), (3, 201)]
        assert response.json()["results"][1]["error"]["error_code"] == "payload_too_large"
        huge = ndjson(*(intercom_payload(f"c{i}") for i in range(40)))
        assert len(huge) > 8192
        response = client.post(BATCH, content=huge, headers=NDJSON)
        assert (response.status_code, response.json()["error_code"]) == (413, "payload_too_large")
    assert stored(database_url) == 2


def test_a_bad_workspace_is_422(client: TestClient) -> None:
    response = client.post(f"{BATCH}?workspace=no%20spaces", content=ndjson(intercom_payload("a")), headers=NDJSON)
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "workspace"


def test_workspace_applies_to_every_line(client: TestClient) -> None:
    body = ndjson(intercom_payload("a"), intercom_payload("b"))
    results = client.post(f"{BATCH}?workspace=app1", content=body, headers=NDJSON).json()["results"]
    other = client.post(BATCH, content=body, headers=NDJSON).json()["results"]
    assert {r["result"] for r in results + other} == {"created"}  # another workspace: other conversations
    workspaces = {client.get(f"/internal/conversations/{r['id']}").json()["workspace"] for r in results}
    assert workspaces == {"app1"}


class UnavailableStore:
    async def find_deliveries(self, provider: str, keys: list[str]) -> dict[str, Any]:
        return {}

    async def ingest_many(self, items: Any, *, redact: Any = None) -> Any:
        raise StorageUnavailable("db down")


def test_database_unavailable_is_503_for_the_whole_batch(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url), store=UnavailableStore())  # type: ignore[arg-type]
    with TestClient(app) as client:
        response = client.post(BATCH, content=ndjson(intercom_payload("a")), headers=NDJSON)
    assert (response.status_code, response.json()["error_code"]) == (503, "unavailable")
    assert response.headers["retry-after"] == "1"


def test_the_batch_route_is_documented(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][BATCH]["post"]
    assert {"200", "413", "415", "422", "503"} <= set(operation["responses"])
    assert "application/x-ndjson" in operation["requestBody"]["content"]
