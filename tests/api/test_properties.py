"""Whatever a client sends, the answer is never a 5xx; a 4xx always carries the error body and stores nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kbms.api import create_app
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations
from tests.conftest import ENGINES, engine_url
from tests.support.helpers import JSON_HEADERS, intercom_payload, part

INGEST = "/integrations/intercom/conversations"
ERROR_KEYS = {"error_code", "message", "details"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module", params=ENGINES)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, str]]:
    # One app for all examples: Hypothesis runs hundreds of them and each must see the same, still-serving server.
    with (
        engine_url(request.param, Path(tmp_path_factory.mktemp("properties"))) as url,
        TestClient(create_app(Settings(database_url=url))) as test_client,
    ):
        yield test_client, url


def conversation_count(url: str) -> int:
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(conversations)).scalar_one())
    finally:
        engine.dispose()


def check(client: TestClient, url: str, body: bytes) -> None:
    before = conversation_count(url)
    response = client.post(INGEST, content=body, headers=JSON_HEADERS)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == ERROR_KEYS
        assert conversation_count(url) == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512))
def test_arbitrary_bytes(shared: tuple[TestClient, str], body: bytes) -> None:
    check(*shared, body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_arbitrary_json(shared: tuple[TestClient, str], value: Any) -> None:
    check(*shared, json.dumps(value).encode())


def _corrupt(payload: Any, path: list[int], value: Any) -> Any:
    """Replace one node of the payload (chosen by ``path``) with an arbitrary JSON value."""
    if not path or not isinstance(payload, dict | list) or not payload:
        return value
    keys = list(payload) if isinstance(payload, dict) else list(range(len(payload)))
    key = keys[path[0] % len(keys)]
    copy: Any = dict(payload) if isinstance(payload, dict) else list(payload)
    copy[key] = _corrupt(payload[key], path[1:], value)
    return copy


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 20), max_size=6), json_values, st.integers(0, 10**6))
def test_almost_valid_payloads(shared: tuple[TestClient, str], path: list[int], value: Any, n: int) -> None:
    # Arbitrary JSON rarely looks like a conversation; corrupting one node of a valid one probes the validators.
    valid = intercom_payload(f"p{n}", parts=[part("1"), part("2", None)], tags={"tags": [{"name": "x"}]})
    check(*shared, json.dumps(_corrupt(valid, path, value)).encode())
