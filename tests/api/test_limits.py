"""Limits on what a request may hold: payload caps, JSON nesting, bodies without a declared length, page sizes.

Every refusal is a 4xx with the documented error body, never a 5xx, and a payload over a cap is not kept.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kbms.api import create_app
from kbms.cli import app as cli
from kbms.settings import Settings
from kbms.storage.schema import conversations, ledger
from tests.conftest import start_server
from tests.providers.intercom.test_webhooks import SECRETS, count, envelope, signed
from tests.support import helpers
from tests.support.helpers import JSON_HEADERS, dumps

INGEST = "/integrations/intercom/conversations"
BATCH = "/integrations/intercom/conversations/batch"
HOOK = "/webhooks/intercom"
DEEP = b"[" * (4 * 1024 * 1024)  # 4 MiB of nesting: under the body limit, far past any parser's depth


def small_payload(external_id: str, **fields: Any) -> dict[str, Any]:
    """The helpers' payload with short texts: the caps below are tiny, and the canary texts are not."""
    payload = helpers.intercom_payload(external_id, **fields)
    payload["source"]["author"]["email"] = "ana@example.com"
    return payload


def part(part_id: str, body: str | None = "<p>Hi</p>", **fields: Any) -> dict[str, Any]:
    return helpers.part(part_id, body, **fields)


@pytest.fixture
def capped(sqlite_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=sqlite_url,
        secrets=SECRETS,
        max_parts=3,
        max_list_items=2,
        max_message_chars=50,
        max_field_chars=20,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def refusal(response: Any) -> list[tuple[str, str]]:
    """(field, issue) of a 422 validation_error with the documented body."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error_code", "message", "details"}
    assert body["error_code"] == "validation_error"
    return [(d["field"], d["issue"]) for d in body["details"]]


# --- payload caps ------------------------------------------------------------------------------------------


def test_a_payload_at_every_cap_is_accepted(capped: TestClient) -> None:
    payload = small_payload("edge", parts=[part("p1", "<p>" + "x" * 43 + "</p>"), part("p2")])  # HTML: 50
    payload["tags"] = {"type": "tag.list", "tags": [{"name": "a" * 20}, {"name": "b"}]}
    assert capped.post(INGEST, json=payload).status_code == 201


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda p: p["conversation_parts"]["conversation_parts"].extend(part(f"p{i}") for i in range(3)),
            ("messages", "too_long"),
            id="too-many-parts",
        ),
        pytest.param(
            lambda p: p["conversation_parts"]["conversation_parts"].append(part("long", "<p>" + "x" * 51 + "</p>")),
            ("messages.long.content", "string_too_long"),
            id="message-too-long",
        ),
        pytest.param(
            lambda p: p["source"]["author"].update(email="a" * 21),
            ("participants.u1.email", "string_too_long"),
            id="email-too-long",
        ),
        pytest.param(
            lambda p: p.update(tags={"type": "tag.list", "tags": [{"name": n} for n in "abc"]}),
            ("tags", "too_long"),
            id="too-many-tags",
        ),
        pytest.param(
            lambda p: p["source"].update(subject="s" * 21),
            ("subject", "string_too_long"),
            id="subject-too-long",
        ),
    ],
)
def test_a_payload_over_a_cap_is_422_naming_the_field_and_is_not_kept(
    capped: TestClient, sqlite_url: str, change: Any, expected: tuple[str, str]
) -> None:
    payload = small_payload("over", parts=[part("p1")])
    change(payload)
    assert expected in refusal(capped.post(INGEST, json=payload))
    assert count(sqlite_url, ledger) == count(sqlite_url, conversations) == 0


def test_a_batch_refuses_the_line_over_a_cap_alone(capped: TestClient, sqlite_url: str) -> None:
    over = small_payload("over", parts=[part(f"p{i}") for i in range(5)])
    lines = b"\n".join([dumps(small_payload("fine")), dumps(over)])
    response = capped.post(BATCH, content=lines, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["result"] == "created"
    assert (second["status"], second["error"]["error_code"]) == (422, "validation_error")
    assert second["error"]["details"][0]["field"] == "messages"
    assert count(sqlite_url, ledger) == count(sqlite_url, conversations) == 1  # the refused line is not kept


def test_a_signed_webhook_over_a_cap_is_422_and_not_kept(capped: TestClient, sqlite_url: str) -> None:
    item = small_payload("over", parts=[part(f"p{i}") for i in range(5)])
    body = json.dumps(envelope(item, topic="conversation.user.replied", delivery_id="n1")).encode()
    assert ("messages", "too_long") in refusal(capped.post(HOOK, content=body, headers=signed(body)))
    assert count(sqlite_url, ledger) == count(sqlite_url, conversations) == 0


def test_kbms_ingest_applies_the_caps(sqlite_url: str, tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    over = small_payload("over", parts=[part(f"p{i}") for i in range(5)])
    source.write_bytes(dumps(small_payload("fine")) + b"\n" + dumps(over) + b"\n")
    arguments = ["ingest", str(source), "--database-url", sqlite_url]
    result = CliRunner().invoke(cli, arguments, env={"KBMS_MAX_PARTS": "3"})  # the CLI's settings come from KBMS_*
    assert result.exit_code == 1, result.output
    assert "line 2: rejected: messages" in " ".join(result.output.split())
    assert count(sqlite_url, conversations) == 1


# --- JSON nesting ------------------------------------------------------------------------------------------


@pytest.fixture
def hooks(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=sqlite_url, secrets=SECRETS))) as client:
        yield client


def test_megabytes_of_nesting_are_400_on_a_push(hooks: TestClient) -> None:
    response = hooks.post(INGEST, content=DEEP, headers=JSON_HEADERS)
    assert response.status_code == 400
    assert response.json()["error_code"] == "invalid_json"
    assert "nested deeper than 200" in response.json()["message"]


def test_megabytes_of_nesting_are_a_400_line_in_a_batch(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, max_batch_bytes=8 * 1024 * 1024)
    with TestClient(create_app(settings)) as client:
        lines = DEEP + b"\n" + dumps(small_payload("fine"))
        response = client.post(BATCH, content=lines, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200
    assert [(line["status"], line["result"]) for line in response.json()["results"]] == [
        (400, "rejected"),
        (201, "created"),
    ]


def test_a_signed_deep_webhook_is_kept_rejected_and_a_later_redaction_still_works(
    hooks: TestClient, sqlite_url: str
) -> None:
    # The rejected payload is kept in the redaction's workspace, so the redaction scans it: the json module
    # recurses per level of nesting, and before the fix this 500ed the redaction's delivery.
    deep = b'{"type": "notification_event", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = hooks.post(f"{HOOK}?workspace=app1", content=deep, headers=signed(deep))
    assert (response.status_code, response.json()["error_code"]) == (400, "invalid_json")
    original = small_payload("c9", updated_at=1_700_000_200, parts=[part("p1", "<p>secret</p>")])
    body = json.dumps(envelope(original, topic="conversation.user.replied", delivery_id="n1")).encode()
    assert hooks.post(HOOK, content=body, headers=signed(body)).status_code == 200
    redacted = part("p1", "<p><i>This message was deleted</i></p>", updated_at=1_700_000_300, redacted=True)
    item = small_payload("c9", updated_at=1_700_000_300, parts=[redacted])
    body = json.dumps(envelope(item, topic="conversation_part.redacted", delivery_id="n2")).encode()
    response = hooks.post(HOOK, content=body, headers=signed(body))
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "updated"


def test_kbms_ingest_reads_a_file_whose_first_line_is_too_deep(sqlite_url: str, tmp_path: Path) -> None:
    source = tmp_path / "deep.ndjson"
    source.write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + dumps(small_payload("fine")) + b"\n")
    result = CliRunner().invoke(cli, ["ingest", str(source), "--database-url", sqlite_url])
    assert result.exit_code == 1, result.output  # line 1 rejected, line 2 stored; no traceback
    assert "line 1: rejected: JSON nested deeper than 200 levels" in " ".join(result.output.split())
    assert count(sqlite_url, conversations) == 1


def test_kbms_ingest_refuses_a_too_deep_json_array_file_as_unreadable(sqlite_url: str, tmp_path: Path) -> None:
    source = tmp_path / "deep.json"
    source.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    result = CliRunner().invoke(cli, ["ingest", str(source), "--database-url", sqlite_url])
    assert result.exit_code == 2, result.output
    assert "starts like a JSON array but is not one" in " ".join(result.output.split())


# --- bodies without a declared length ----------------------------------------------------------------------


def send_until_answered(sock: socket.socket, chunk: bytes, budget: int) -> tuple[bytes, int]:
    """Send ``chunk`` again and again until the server answers (or ``budget`` bytes are sent); the answer, whole."""
    answer, sent = b"", 0
    while sent < budget:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
            if b"}" in answer:  # the error body's end
                break
        elif writable:
            try:
                sent += sock.send(chunk)
            except OSError:  # closed after answering: read what came
                sock.settimeout(10)
                return answer + sock.recv(65536), sent
    return answer, sent


@pytest.mark.slow
def test_a_chunked_body_that_never_ends_is_413_while_it_is_still_being_sent(sqlite_url: str, tmp_path: Path) -> None:
    limit = 64 * 1024
    server = start_server(sqlite_url, tmp_path / "server.log", env={"KBMS_MAX_BODY_BYTES": str(limit)})
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST {INGEST} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                "transfer-encoding: chunked\r\n\r\n".encode()
            )
            chunk = b"4000\r\n" + b"[" * 0x4000 + b"\r\n"  # 16 KiB chunks, forever: no length is ever declared
            answer, sent = send_until_answered(sock, chunk, budget=100 * limit)
    finally:
        server.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(body)["error_code"] == "payload_too_large"
    assert sent < 100 * limit  # answered long before the client stopped sending


# --- page sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/internal/conversations?limit=501",
        "/internal/conversations?limit=0",
        "/internal/conversations?q=a&limit=501",
        "/internal/changes?limit=1001",
        "/internal/changes?limit=0",
        "/internal/conversations?cursor=" + "x" * 257,
        "/internal/changes?cursor=" + "x" * 257,
        "/internal/conversations?q=" + "a" * 513,
    ],
)
def test_every_list_caps_its_page_and_parameters(hooks: TestClient, path: str) -> None:
    response = hooks.get(path)
    assert response.status_code == 422
    assert response.json()["error_code"] == "validation_error"
