"""Every path and query parameter of every operation, taken from the OpenAPI document, against whatever text a client
can put there: NUL, invalid UTF-8 (lone surrogates arrive as ``%ED%A0%80``), 10 KB, percent signs, slashes, dots.

The answer is a 2xx (the text was a fine value) or a 4xx with the error body, never a 5xx, on both engines. Text
kbms never stores (NUL) is refused the same way on both: 404 ``not_found`` in a path id (no conversation can have
it), 422 ``validation_error`` naming the parameter in a query (no filter value can match it). An operation or a
parameter added to the document is covered without a line here; a new operation with a body needs one in
``body_for`` (the test says so).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbms.api import create_app
from kbms.model import CONVERSATION_ID, conversation_id
from kbms.settings import Settings
from tests.conftest import ENGINES, engine_url
from tests.providers import SAMPLES
from tests.support.helpers import JSON_HEADERS, dumps, intercom_payload

ERROR_KEYS = {"error_code", "message", "details"}
# What a parameter this test is not probing is set to when the operation requires it.
VALID = {"workspace": "acme", "conversation_id": str(uuid.uuid4()), "provider": "intercom"}
TEN_KB = 10 * 1024
NUL = b"\x00"
SURROGATE = "\ud800".encode("utf-8", "surrogatepass")  # b"\xed\xa0\x80": not UTF-8, as a client can still send it
# Values every parameter gets, whatever Hypothesis draws.
NASTY = (
    NUL,
    b"a\x00b",
    VALID["conversation_id"].encode() + NUL,
    b"acme\x00",
    SURROGATE,
    b"a" + SURROGATE + b"b",
    "\udfff".encode("utf-8", "surrogatepass"),
    b"\xff\xfe",
    b"%",
    b"%00",
    b"%zz",
    b"x" * TEN_KB,
    "é".encode() * (TEN_KB // 2),
    b"/",
    b".",
    b"..",
    b"?#&=+ ",
    b"-1",
    b"99999999999999999999999999",
)


@dataclass(frozen=True)
class Probe:
    method: str
    template: str
    name: str
    where: str  # "path" or "query"
    required: tuple[str, ...]  # the operation's other required parameters
    takes_body: bool = True  # whether the operation documents a request body


def probes(document: dict[str, Any]) -> list[Probe]:
    found = []
    for template, item in document["paths"].items():
        for method, operation in item.items():
            parameters = [p for p in operation.get("parameters", []) if p["in"] in ("path", "query")]
            for parameter in parameters:
                others = tuple(p["name"] for p in parameters if p.get("required") and p is not parameter)
                takes_body = "requestBody" in operation
                found.append(Probe(method.upper(), template, parameter["name"], parameter["in"], others, takes_body))
    return found


def body_for(probe: Probe) -> tuple[bytes, str] | None:
    """A small valid body for the operation, so that only the parameter is wrong."""
    if probe.method in ("GET", "HEAD") or not probe.takes_body:
        return None
    provider = probe.template.split("/")[2]
    samples = SAMPLES.get(provider)
    if samples is not None:
        one = samples.push("parameters")
        if probe.template == f"/integrations/{provider}/conversations":
            return one, "application/json"
        if probe.template == f"/integrations/{provider}/conversations/batch":
            return one + b"\n" + one, "application/x-ndjson"
        if probe.template == f"/webhooks/{provider}" and samples.webhook:
            return samples.webhook, "application/json"
    raise AssertionError(f"{probe.method} {probe.template}: add a valid body for it to body_for")


def encoded(raw: bytes, *, every_byte: bool) -> str:
    # In a path every byte is escaped: a literal "." or ".." would be resolved away by the client (RFC 3986 dot
    # segments) before the server saw it; "%2E" reaches the server, which decodes it.
    return "".join(f"%{byte:02X}" for byte in raw) if every_byte else quote_from_bytes(raw, safe="")


def send(client: TestClient, probe: Probe, raw: bytes) -> Any:
    path = probe.template
    query = [f"{name}={VALID[name]}" for name in probe.required if f"{{{name}}}" not in path]
    for name in probe.required:
        path = path.replace(f"{{{name}}}", VALID[name])
    if probe.where == "path":
        path = path.replace(f"{{{probe.name}}}", encoded(raw, every_byte=True))
    else:
        query.append(f"{probe.name}={encoded(raw, every_byte=False)}")
    url = path + ("?" + "&".join(query) if query else "")
    body = body_for(probe)
    headers = {"Content-Type": body[1]} if body else {}
    return client.request(probe.method, url, content=body[0] if body else None, headers=headers)


def check(client: TestClient, probe: Probe, raw: bytes) -> None:
    response = send(client, probe, raw)
    where = f"{probe.method} {probe.template} {probe.name}={raw[:40]!r}"
    if probe.where == "path" and (raw == b"" or raw.endswith(b"/")) and response.status_code == 307:
        # The path ends with a slash (the server decodes "%2F" to "/": ASGI paths are decoded), and the router
        # redirects to it without one, as it does any such path: no parameter is read.
        location = urlsplit(response.headers["location"]).path
        assert location.startswith(probe.template.split("{")[0].rstrip("/")), where
        assert not location.endswith("/"), where
        return
    assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500, (where, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == ERROR_KEYS, where
    if NUL in raw:  # text kbms never stores: refused, the same way on every engine
        if probe.where == "path":
            assert (response.status_code, body["error_code"]) == (404, "not_found"), where
        else:
            assert (response.status_code, body["error_code"]) == (422, "validation_error"), where
            assert [issue["field"] for issue in body["details"]] == [probe.name], where


@pytest.fixture(scope="module", params=ENGINES)
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # One app for all examples. Unsigned webhooks are let in so that a webhook's parameter is read past the
    # signature check, as with a signed delivery.
    directory = Path(tmp_path_factory.mktemp("parameters"))
    with (
        engine_url(request.param, directory) as url,
        TestClient(
            create_app(Settings(database_url=url, allow_unsigned_webhooks=True)), follow_redirects=False
        ) as client,
    ):
        # Something to find, so that searches and filters run against stored rows, not an empty index.
        seeded = client.post(
            "/integrations/intercom/conversations", content=dumps(intercom_payload("seeded")), headers=JSON_HEADERS
        )
        assert seeded.status_code == 201, seeded.text
        assert client.get("/internal/conversations", params={"q": "hello"}).json()["items"]
        yield client


@pytest.fixture(scope="module")
def document(shared: TestClient) -> dict[str, Any]:
    return dict(shared.get("/openapi.json").json())


def test_the_document_has_the_parameters_this_test_is_about(document: dict[str, Any]) -> None:
    found = {(p.template, p.name) for p in probes(document)}
    assert ("/internal/conversations/{conversation_id}", "conversation_id") in found
    expected = {"limit", "cursor", "provider", "workspace", "state", "tag", "updated_after", "updated_before", "q"}
    assert expected | {"truncated"} == {name for template, name in found if template == "/internal/conversations"}
    assert ("/webhooks/zendesk", "workspace") in found
    assert ("/integrations/intercom/conversations/batch", "workspace") in found


def test_nasty_values_in_every_parameter(shared: TestClient, document: dict[str, Any]) -> None:
    for probe in probes(document):
        for raw in NASTY:
            check(shared, probe, raw)


text = st.text(st.characters(exclude_categories=()), max_size=40).map(
    lambda t: t.encode("utf-8", "surrogatepass")  # lone surrogates included: invalid UTF-8 on the wire
)
long_text = st.tuples(text.filter(bool), st.just(TEN_KB)).map(lambda pair: pair[0] * (pair[1] // len(pair[0]) + 1))
values = st.one_of(
    text,
    st.binary(max_size=40),
    long_text,
    st.tuples(text, st.sampled_from([NUL, SURROGATE, b"%", b"/"]), text).map(b"".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_arbitrary_text_in_any_parameter(shared: TestClient, document: dict[str, Any], data: st.DataObject) -> None:
    probe = data.draw(st.sampled_from(probes(document)), label="parameter")
    check(shared, probe, data.draw(values, label="value"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_every_minted_id_is_one_the_detail_route_looks_up(provider: str, workspace: str, external_id: str) -> None:
    # The detail route answers 404 for any other shape without asking the database: it must not miss a real id.
    assert CONVERSATION_ID.fullmatch(conversation_id(provider, workspace, external_id))


def test_the_finding_as_reported(shared: TestClient) -> None:
    # PostgreSQL's driver refused these with a 500; SQLite answered 404 and 200. Now one answer on both.
    detail = shared.get("/internal/conversations/abc%00def")
    assert (detail.status_code, detail.json()["error_code"]) == (404, "not_found")
    listed = shared.get("/internal/conversations?tag=a%00b")
    assert listed.status_code == 422
    assert json.loads(listed.text)["details"] == [
        {
            "field": "tag",
            "issue": "invalid_character",
            "message": "Input should not contain NUL (U+0000) or unpaired surrogates: kbms stores no such text",
        }
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=60))
def test_any_search_text_reaches_the_engine_as_words_it_takes(shared: TestClient, q: str) -> None:
    # What a user types is read into words (kbms.search.query_terms) before FTS5 or to_tsquery sees it: whatever
    # the letters, digits and symbols of the query, the search runs (200) or the query has no word, or has NUL,
    # or is too long (422), on both engines.
    response = shared.get("/internal/conversations", params={"q": q})
    assert response.status_code in (200, 422), response.text[:300]
    if response.status_code == 422:
        [issue] = response.json()["details"]
        assert (issue["field"], issue["issue"]) in {("q", "no_words"), ("q", "invalid_character")}, issue
