"""The log canary, focused: error paths driven with canaries in every input they take (payload fields, malformed
bodies, signatures, bearer tokens, paths, query strings, exception messages), then the log lines and the error bodies
searched for them. And proof that the session-wide check (``tests/support/canary.py``) fails a run when a log line or an
error body carries one."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kbms.api import create_app
from kbms.errors import StorageUnavailable
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from tests.support import canary
from tests.support.helpers import ExplodingStore, dumps, intercom_payload, part, zendesk_pushes

ROOT = Path(__file__).resolve().parents[2]
INTERCOM_SECRET = canary.secret("intercom-canary")
ZENDESK_SECRET = canary.secret("zendesk-canary")
Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """Every line logged during the test, parsed (each must be JSON); the session watch sees them too."""
    buffer = io.StringIO()
    with canary.WATCH.copying_to(buffer):
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    secrets = {"KBMS_INTERCOM_CLIENT_SECRET": INTERCOM_SECRET, "KBMS_ZENDESK_WEBHOOK_SECRET": ZENDESK_SECRET}
    app = create_app(Settings(database_url=sqlite_url, secrets=secrets))
    with TestClient(app, headers={"Authorization": f"Bearer {canary.TOKEN}"}) as test_client:
        yield test_client


def assert_no_canary(lines: Lines, *bodies: str) -> None:
    logged = lines()
    assert logged, "nothing was logged: the check would prove nothing"
    for line in logged:
        assert canary.TAG not in json.dumps(line), line
    for body in bodies:
        assert canary.TAG not in body, body


def leaves(document: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value in a JSON document, containers included."""
    if path:
        yield path
    if isinstance(document, dict):
        for key, value in document.items():
            yield from leaves(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from leaves(value, (*path, index))


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(document)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


WRONG_VALUES = [canary.TEXT, {canary.EMAIL: canary.TEXT}, [canary.EMAIL], 10**400, -1, None, True]


def zendesk_with_canaries() -> dict[str, Any]:
    push = copy.deepcopy(dict(zendesk_pushes())["01_02_docs_ticket_with_comment"])
    push["comments"][0]["body"] = canary.TEXT
    push["users"] = [{"id": push["comments"][0]["author_id"], "name": canary.NAME, "email": canary.EMAIL}]
    return push


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/integrations/intercom/conversations", intercom_payload("c1", parts=[part("p1")])),
        ("/integrations/zendesk/conversations", zendesk_with_canaries()),
    ],
    ids=["intercom", "zendesk"],
)
def test_validation_errors_never_quote_the_payload(
    client: TestClient, log_lines: Lines, path: str, payload: dict[str, Any]
) -> None:
    assert canary.TAG in json.dumps(payload)
    bodies = []
    for where in leaves(payload):
        for value in WRONG_VALUES:
            response = client.post(path, content=json.dumps(replaced(payload, where, value)))
            assert response.status_code < 500, (where, value, response.text)
            if response.status_code >= 400:
                bodies.append(response.text)
    assert len(bodies) > 50  # the mutations did reach the validators' error messages
    assert_no_canary(log_lines, *bodies)


def test_malformed_bodies_and_batch_lines(client: TestClient, log_lines: Lines) -> None:
    text = json.dumps(intercom_payload(parts=[part("p1")]))
    bodies = [
        text[:-7].encode(),  # truncated
        text.encode() + b"}",  # trailing garbage
        text.encode().replace(b"Hi,", b"\xff\xfe"),  # not UTF-8
        f'{{"id": "{canary.EMAIL}", "source": {"[" * 5000}'.encode(),  # nested too deep
        f'["{canary.TEXT}"]'.encode(),  # not an object
    ]
    answers = [client.post("/integrations/intercom/conversations", content=body) for body in bodies]
    assert {response.status_code for response in answers} == {400, 422}
    batch = b"\n".join([*bodies, json.dumps({"id": canary.EMAIL}).encode()])
    lines = client.post(
        "/integrations/intercom/conversations/batch",
        content=batch,
        headers={"content-type": "application/x-ndjson"},
    )
    assert {line["status"] for line in lines.json()["results"]} == {400, 422}
    assert_no_canary(log_lines, lines.text, *(response.text for response in answers))


def test_refused_signatures_leave_no_secret_token_or_payload(client: TestClient, log_lines: Lines) -> None:
    body = dumps(
        {
            "type": "notification_event",
            "app_id": "app1",
            "id": "n1",
            "topic": "conversation.user.replied",
            "data": {"type": "notification_event_data", "item": intercom_payload(parts=[part("p1")])},
        }
    )
    forged = [
        {"x-hub-signature": f"sha1={canary.TAG}{canary.TAG}"},
        {"x-hub-signature": sign(body, canary.secret("wrong"))},
        {"x-hub-signature": canary.TOKEN},
        {},
    ]
    answers = [client.post("/webhooks/intercom", content=body, headers=headers) for headers in forged]
    answers.append(
        client.post(
            "/webhooks/zendesk?workspace=acme",
            content=body,
            headers={
                "x-zendesk-webhook-signature": canary.TOKEN,
                "x-zendesk-webhook-signature-timestamp": "2026-11-26T12:00:00Z",
            },
        )
    )
    assert {response.status_code for response in answers} == {401}
    accepted = client.post("/webhooks/intercom", content=body, headers={"x-hub-signature": sign(body, INTERCOM_SECRET)})
    assert accepted.status_code == 200
    assert_no_canary(log_lines, *(response.text for response in answers))


def test_paths_query_strings_and_headers(client: TestClient, log_lines: Lines) -> None:
    client.post("/integrations/intercom/conversations", json=intercom_payload(parts=[part("p1")]))
    answers = [
        client.get("/internal/conversations", params={"q": canary.TEXT, "workspace": canary.EMAIL}),
        client.get("/internal/conversations", params={"cursor": canary.TOKEN, "tag": canary.TEXT}),
        client.get("/internal/conversations", params={"updated_after": canary.EMAIL, "limit": canary.TAG}),
        client.get("/internal/changes", params={"cursor": canary.TOKEN}),
        client.get(f"/internal/conversations/{canary.EMAIL}"),
        client.delete(f"/internal/conversations/{canary.EMAIL}"),
        client.get(f"/{canary.EMAIL}", params={"email": canary.EMAIL}),
        client.post(f"/integrations/{canary.TAG}/conversations", json=intercom_payload()),
        client.post("/integrations/intercom/conversations", params={"workspace": f"{canary.EMAIL} x"}, json={}),
        client.get("/health", headers={"X-Request-ID": canary.EMAIL, "Cookie": f"session={canary.TOKEN}"}),
    ]
    assert all(response.status_code < 500 for response in answers)
    # A request id that could be personal data (it has an "@") is not taken: one is made instead.
    assert canary.TAG not in answers[-1].headers["x-request-id"]
    searched = client.get("/internal/conversations", params={"q": canary.TAG})
    assert searched.status_code == 200
    assert len(searched.json()["items"]) == 1  # the canary is in the data: it is just never logged
    assert_no_canary(log_lines, *(response.text for response in answers if response.status_code >= 400))


def test_a_500_is_logged_as_types_and_stack_with_the_request_id(sqlite_url: str, log_lines: Lines) -> None:
    try:
        try:
            raise KeyError(canary.EMAIL)
        except KeyError as cause:
            raise RuntimeError(f"could not store {canary.TEXT}") from cause
    except RuntimeError as exc:
        failure = exc
    app = create_app(Settings(database_url=sqlite_url), store=ExplodingStore(failure))  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.post(
            "/integrations/intercom/conversations?workspace=canary-workspace", json=intercom_payload()
        )
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    errors = [line for line in log_lines() if line["level"] == "error"]
    assert len(errors) == 1
    [error] = errors
    assert error["request_id"] == request_id
    assert error["event"] == "unhandled error on POST /integrations/intercom/conversations"
    assert "KeyError (message withheld" in error["exception"]
    assert "RuntimeError (message withheld" in error["exception"]
    assert "direct cause" in error["exception"]
    [access] = [line for line in log_lines() if line["logger"] == "kbms.access"]
    assert (access["status"], access["request_id"]) == (500, request_id)
    assert_no_canary(log_lines, response.text)


def test_a_503_is_logged_with_the_request_id_and_without_data(sqlite_url: str, log_lines: Lines) -> None:
    store = ExplodingStore(StorageUnavailable("Database unavailable (OperationalError)"))
    app = create_app(Settings(database_url=sqlite_url), store=store)  # type: ignore[arg-type]
    with TestClient(app) as test_client:
        response = test_client.post("/integrations/intercom/conversations", json=intercom_payload())
    assert response.status_code == 503
    [warning] = [line for line in log_lines() if line["level"] == "warning" and line["logger"] == "kbms.api.errors"]
    assert warning["request_id"] == response.headers["x-request-id"]
    assert_no_canary(log_lines, response.text)


# The session-wide check must be able to fail: pytest runs of a tiny project that uses it, in a fresh process.

CONFTEST = """
from tests.support import canary

def pytest_configure(config):
    config.pluginmanager.register(canary.WATCH, "kbms-log-canary")
"""
LEAKY_LOG = """
import logging
from tests.support.helpers import dumps, intercom_payload

def test_a_payload_in_a_log_line():
    logging.getLogger("kbms.ingest").debug("received %s", dumps(intercom_payload()).decode())
"""
LEAKY_BODY = """
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from tests.support import canary

def test_a_payload_in_an_error_body():
    app = FastAPI()

    @app.post("/echo")
    async def echo() -> JSONResponse:
        body = {"error_code": "validation_error", "message": f"bad email {canary.EMAIL}", "details": None}
        return JSONResponse(body, status_code=422)

    with TestClient(app) as client:
        assert client.post("/echo").status_code == 422
"""
LEAKY_SERVER_LOG = """
from pathlib import Path
from tests.support import canary

def test_a_server_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text('{"event": "request body", "body": "' + canary.TEXT + '"}\\n')
    canary.WATCH.check_file(log)
"""
CLEAN = """
import logging
from fastapi.testclient import TestClient
from kbms.api import create_app
from kbms.settings import Settings
from tests.conftest import migrated_sqlite_url
from tests.support.helpers import intercom_payload

def test_nothing_personal(tmp_path):
    with TestClient(create_app(Settings(database_url=migrated_sqlite_url(tmp_path)))) as client:
        assert client.post("/integrations/intercom/conversations", json=intercom_payload()).status_code == 201
        assert client.post("/integrations/intercom/conversations", json={"id": 1}).status_code == 422
"""


def run_pytest(tmp_path: Path, test: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_case.py").write_text(textwrap.dedent(test))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_case.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("test", [LEAKY_LOG, LEAKY_BODY, LEAKY_SERVER_LOG], ids=["log", "error-body", "server-log"])
def test_the_session_check_fails_a_run_that_leaks(tmp_path: Path, test: str) -> None:
    run = run_pytest(tmp_path, test)
    assert "1 passed" in run.stdout, run.stdout + run.stderr  # the test itself passes...
    assert run.returncode == 1, run.stdout + run.stderr  # ...and the run fails
    assert "1 canary sightings" in run.stdout


def test_the_session_check_passes_a_run_that_does_not(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, CLEAN)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "log canary: 0 sightings in" in run.stdout
