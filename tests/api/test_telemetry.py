"""Request ids, the access line, and what log lines are made of."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
import pytest
import structlog
from fastapi.testclient import TestClient
from starlette.staticfiles import StaticFiles

from kbms.api import create_app
from kbms.auth import digest, new_key
from kbms.logs import configure_logging, describe_exception
from kbms.settings import Settings
from tests.support import canary

GENERATED = re.compile(r"[0-9a-f]{32}")
ACCESS_FIELDS = {"event", "method", "route", "status", "duration_ms", "request_id", "level", "logger", "timestamp"}


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    with canary.WATCH.copying_to(buffer):
        yield buffer


def lines(buffer: io.StringIO, **match: Any) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in buffer.getvalue().splitlines()]
    return [line for line in parsed if match.items() <= line.items()]


@pytest.fixture
def app_client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
        yield client


def test_a_request_id_is_made_echoed_and_logged(app_client: TestClient, logged: io.StringIO) -> None:
    response = app_client.get("/internal/conversations/unknown?limit=5&secret=x")
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    [access] = lines(logged, logger="kbms.access")
    assert set(access) == ACCESS_FIELDS
    assert access["request_id"] == request_id
    assert (access["method"], access["route"], access["status"]) == (
        "GET",
        "/internal/conversations/{conversation_id}",
        404,
    )
    assert isinstance(access["duration_ms"], float)
    assert "secret" not in json.dumps(access)  # neither the path nor its query string


def test_every_line_logged_while_handling_carries_the_request_id(sqlite_url: str, logged: io.StringIO) -> None:
    app = create_app(Settings(database_url=sqlite_url))

    @app.get("/chatty")
    async def chatty() -> None:
        logging.getLogger("kbms.somewhere").info("on the event loop")
        structlog.get_logger("kbms.elsewhere").warning("through structlog")
        await anyio.to_thread.run_sync(lambda: logging.getLogger("kbms.thread").info("in a worker thread"))

    with TestClient(app) as client:
        request_id = client.get("/chatty").headers["x-request-id"]
        client.get("/health")
    events = {"on the event loop", "through structlog", "in a worker thread", "request"}
    handled = [line for line in lines(logged) if line["event"] in events and line.get("route", "/chatty") == "/chatty"]
    assert len(handled) == 4
    assert {line["request_id"] for line in handled} == {request_id}
    startup = lines(logged, logger="kbms.api")  # the app's startup warnings belong to no request
    assert startup
    assert all("request_id" not in line for line in startup)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("5f0e1d2c-3b4a-4958-8776-655443322110", True),
        ("trace:1.2_3", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("a@b.example", False),
        ('quote"d', False),
        ("-starts-with-a-dash", False),
    ],
)
def test_an_incoming_request_id_is_kept_only_when_sane(
    app_client: TestClient, logged: io.StringIO, sent: str, kept: bool
) -> None:
    response = app_client.get("/health", headers={"X-Request-ID": sent})
    echoed = response.headers["x-request-id"]
    assert (echoed == sent) is kept
    if not kept:
        assert GENERATED.fullmatch(echoed)
    [access] = lines(logged, logger="kbms.access")
    assert access["request_id"] == echoed


def test_the_access_line_follows_the_level(sqlite_url: str) -> None:
    buffer = io.StringIO()
    try:
        configure_logging("warning", stream=buffer)
        with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
            client.get("/health")
        assert lines(buffer, logger="kbms.access") == []
        configure_logging("info", stream=buffer)
        with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
            client.get("/health")
        assert len(lines(buffer, logger="kbms.access")) == 1
    finally:
        canary.WATCH.install_logging()


def test_loggers_that_print_data_stay_quiet_at_debug() -> None:
    try:
        configure_logging("debug", stream=io.StringIO())
        for name in ("sqlalchemy.engine.Engine", "uvicorn.access", "httpx", "httpx2"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger("kbms.anything").isEnabledFor(logging.DEBUG)
    finally:
        canary.WATCH.install_logging()


def test_exceptions_are_described_by_type_and_stack_only() -> None:
    def fail() -> None:
        try:
            raise psycopg.errors.UniqueViolation(f"Key (email)=({canary.EMAIL}) already exists")
        except psycopg.Error as exc:
            raise ExceptionGroup("several", [ValueError(canary.TEXT), exc]) from exc

    with pytest.raises(ExceptionGroup) as caught:
        fail()
    text = describe_exception(caught.value)
    assert canary.TAG not in text
    assert "psycopg.errors.UniqueViolation [SQLSTATE 23505] (message withheld" in text
    assert "ValueError (message withheld" in text
    assert "ExceptionGroup: member 2 of 2" in text
    assert "The above exception was the direct cause" in text
    assert 'in fail\n    raise ExceptionGroup("several"' in text  # the stack, with its source lines


def test_a_500_answer_carries_the_request_id(sqlite_url: str, logged: io.StringIO) -> None:
    app = create_app(Settings(database_url=sqlite_url))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "support-ticket-42"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "support-ticket-42"
    [error] = lines(logged, level="error")
    assert error["request_id"] == "support-ticket-42"
    assert error["event"] == "unhandled error on GET /boom"
    [access] = lines(logged, logger="kbms.access")
    assert (access["status"], access["request_id"]) == (500, "support-ticket-42")


def test_refusals_and_documentation_pages_are_labelled_with_their_route(
    sqlite_url: str, tmp_path: Path, logged: io.StringIO
) -> None:
    # Refused by the API-key middleware before any route runs, answered by Starlette routes that do not record
    # themselves (the documentation) or by a mount: each still labelled with its template, in the access line and
    # in the metrics alike; a path no route knows stays "unmatched" (it is client input).
    reader, ingester = new_key(), new_key()
    keys = [
        {"name": "reader", "sha256": digest(reader), "scopes": ["read"]},
        {"name": "ingester", "sha256": digest(ingester), "scopes": ["ingest"]},
    ]
    app = create_app(Settings(database_url=sqlite_url, api_keys=json.dumps(keys)))
    (tmp_path / "app.css").write_text("body {}")
    app.mount("/test-static", StaticFiles(directory=tmp_path))
    detail = "/internal/conversations/{conversation_id}"
    calls = [
        ("GET", f"/internal/conversations/{canary.EMAIL}", {}, (detail, 401)),
        ("GET", f"/internal/conversations/{uuid.uuid4()}", {"Authorization": f"Bearer {ingester}"}, (detail, 403)),
        ("GET", "/internal/conversations", {"Authorization": f"Bearer {new_key()}"}, ("/internal/conversations", 401)),
        ("PUT", "/internal/changes", {}, ("/internal/changes", 401)),
        ("PUT", "/internal/changes", {"Authorization": f"Bearer {reader}"}, ("/internal/changes", 405)),
        ("POST", "/integrations/intercom/conversations", {}, ("/integrations/intercom/conversations", 401)),
        ("GET", "/metrics", {"Authorization": f"Bearer {reader}"}, ("/metrics", 403)),
        ("GET", "/docs", {}, ("/docs", 200)),
        ("GET", "/docs/oauth2-redirect", {}, ("/docs/oauth2-redirect", 200)),
        ("GET", "/openapi.json", {}, ("/openapi.json", 200)),
        ("GET", "/test-static/app.css", {}, ("/test-static/{path}", 200)),
        ("GET", "/test-static/missing.css", {}, ("/test-static/{path}", 404)),
        ("GET", f"/internal/{canary.EMAIL}", {}, ("unmatched", 401)),
        ("GET", f"/{canary.EMAIL}", {}, ("unmatched", 404)),
    ]
    with TestClient(app) as client:
        for method, path, headers, (_route, status) in calls:
            assert client.request(method, path, headers=headers).status_code == status, (method, path)
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {new_key()}"})  # refused: 401
        text = app.state.metrics.render().decode()
    assert scraped.status_code == 401
    logged_calls = [(line["method"], line["route"], line["status"]) for line in lines(logged, logger="kbms.access")]
    expected = [(method, route, status) for method, _path, _headers, (route, status) in calls]
    assert logged_calls == [*expected, ("GET", "/metrics", 401)]
    for method, route, status in expected:
        count = sum(1 for call in expected if call == (method, route, status))
        assert f'kbms_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {count}.0' in text
    assert canary.TAG not in text


def test_every_operation_is_labelled_with_its_own_template_whoever_answers(
    sqlite_url: str, logged: io.StringIO
) -> None:
    # Built from the OpenAPI document: a router the labels do not know of fails here. Without a key, every
    # protected operation is refused before routing; the others are answered by their route.
    keys = [{"name": "reader", "sha256": digest(new_key()), "scopes": ["read"]}]
    with TestClient(create_app(Settings(database_url=sqlite_url, api_keys=json.dumps(keys)))) as client:
        document = client.get("/openapi.json").json()
        operations = [(m.upper(), t) for t, item in document["paths"].items() for m in item]
        assert len(operations) >= 10
        for method, template in operations:
            client.request(method, template.replace("{conversation_id}", str(uuid.uuid4())))
    labelled = [(line["method"], line["route"]) for line in lines(logged, logger="kbms.access")]
    assert labelled == [("GET", "/openapi.json"), *operations]
