"""What the console tests share: keys, an app with them, signing in, storing conversations and rejects."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from fastapi.testclient import TestClient
from httpx2 import Response

from kbms.api import create_app
from kbms.auth import digest, new_key
from kbms.errors import FieldIssue
from kbms.settings import Settings
from kbms.storage import open_store
from tests.storage.test_contract import delivery
from tests.support.helpers import dumps, intercom_payload, part

ADMIN, READER, INGESTER, ADMIN_B, READER_B, REVOKED = (new_key() for _ in range(6))
SECRET = "console-test-secret-" + "x" * 24
KEYS: list[dict[str, Any]] = [
    {"name": "admin", "sha256": digest(ADMIN), "scopes": ["admin"]},
    {"name": "reader", "sha256": digest(READER), "scopes": ["read"]},
    {"name": "ingester", "sha256": digest(INGESTER), "scopes": ["ingest"]},
    {"name": "admin-b", "sha256": digest(ADMIN_B), "scopes": ["admin"], "workspaces": ["ws-b"]},
    {"name": "reader-b", "sha256": digest(READER_B), "scopes": ["read"], "workspaces": ["ws-b"]},
    {"name": "gone", "sha256": digest(REVOKED), "scopes": ["admin"], "revoked": True},
]
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
PAGES = ("/console", "/console/conversations", "/console/rejects")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def settings_for(database_url: str, keys: list[dict[str, Any]] | None = KEYS, **more: Any) -> Settings:
    return Settings(
        database_url=database_url,
        api_keys=json.dumps(keys) if keys else "",
        console_secret=SECRET,
        sync="off",
        **more,
    )


@contextmanager
def console(settings: Settings, **kwargs: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings), follow_redirects=False, **kwargs) as client:
        yield client


def csrf_of(page: Response) -> str:
    found = CSRF.search(page.text)
    assert found is not None, "no csrf field on the page"
    return found.group(1)


def sign_in(client: TestClient, key: str, *, next_: str = "/console") -> Response:
    form = client.get("/console/login")
    return client.post("/console/login", data={"key": key, "csrf": csrf_of(form), "next": next_})


def signed_in(client: TestClient, key: str) -> TestClient:
    response = sign_in(client, key)
    assert response.status_code == 303, response.text
    return client


def ingest(client: TestClient, payload: dict[str, Any], *, workspace: str) -> str:
    response = client.post(
        f"/integrations/intercom/conversations?workspace={workspace}",
        content=dumps(payload),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def batch(client: TestClient, lines: bytes, *, workspace: str) -> None:
    """Push NDJSON lines in one batch (the admin key's), each accepted or refused as it may."""
    response = client.post(
        f"/integrations/intercom/conversations/batch?workspace={workspace}",
        content=lines,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text


def refuse(client: TestClient, body: bytes, *, workspace: str) -> None:
    response = client.post(
        f"/integrations/intercom/conversations?workspace={workspace}",
        content=body,
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


@dataclass(frozen=True)
class Stored:
    a: str  # a conversation of ws-a
    b: str  # a conversation of ws-b


def store_both(client: TestClient) -> Stored:
    a = ingest(client, intercom_payload("conv-a", title="Printer on fire", parts=[part("a1")]), workspace="ws-a")
    b = ingest(client, intercom_payload("conv-b", title="Billing question", parts=[part("b1")]), workspace="ws-b")
    refuse(client, b'{"type": "conversation", "id": "reject-a"}', workspace="ws-a")
    refuse(client, b'{"type": "conversation", "id": "reject-b"}', workspace="ws-b")
    return Stored(a, b)


def record_old_rejection(database_url: str, payload: dict[str, Any], *, workspace: str) -> None:
    """A delivery an older mapper refused, which today's reads fine: what a mapper fix leaves in the ledger."""

    async def run() -> None:
        store = open_store(Settings(database_url=database_url))
        try:
            item = replace(delivery(dumps(payload), workspace=workspace), received_at=datetime.now(UTC))
            await store.reject(item, [FieldIssue("source", "missing", "Field required (an older mapper)")])
        finally:
            await store.close()

    asyncio.run(run())
