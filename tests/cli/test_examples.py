"""examples/: the files the README's quick start uses are accepted whole, and nothing in them is lost on the way.

The counts below are read from the files with the rules the README states (a part or comment with a body is a
message; ``note`` parts and private comments are internal), not from kbms, so a line that kbms drops or a
message it misses fails here. SQLite is enough: what the files exercise is the mapping, which does not depend on
the engine (the contract suite covers both engines).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from kbms.api import create_app
from kbms.cli import app
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations, ledger, messages
from tests.support import canary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WORKSPACE = "acme"
SECRET = canary.secret("examples")  # never to be logged (tests/support/canary.py)


def lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines() if line]


def intercom_expected() -> dict[str, Counter[str]]:
    """Per conversation: its public and internal messages (the opening message, then every part with a body)."""
    expected: dict[str, Counter[str]] = {}
    for conversation in lines("intercom.ndjson"):
        counts = Counter({"public": 1})
        for part in conversation["conversation_parts"]["conversation_parts"]:
            if part["body"]:
                counts["internal" if part["part_type"].startswith("note") else "public"] += 1
        expected[conversation["id"]] = counts
    return expected


def zendesk_expected() -> dict[str, Counter[str]]:
    return {
        str(push["ticket"]["id"]): Counter("public" if c["public"] else "internal" for c in push["comments"])
        for push in lines("zendesk.ndjson")
    }


def ingest(provider: str, name: str, database_url: str) -> None:
    args = ["ingest", str(EXAMPLES / name), "--provider", provider, "--workspace", WORKSPACE]
    result = CliRunner().invoke(app, [*args, "--database-url", database_url])
    # Exit code 1 means a rejected line, 3 a database failure: only 0 is a clean ingest.
    assert result.exit_code == 0, result.output


def stored(database_url: str, provider: str) -> dict[str, Counter[str]]:
    """Per stored conversation of the provider: its messages by visibility."""
    query = (
        select(conversations.c.external_id, messages.c.visibility, func.count())
        .join(messages, messages.c.conversation_pk == conversations.c.pk)
        .where(conversations.c.provider == provider, conversations.c.workspace == WORKSPACE)
        .group_by(conversations.c.external_id, messages.c.visibility)
    )
    found: dict[str, Counter[str]] = {}
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            for external_id, visibility, count in conn.execute(query):
                found.setdefault(external_id, Counter())[visibility] = count
            rejects = select(func.count()).select_from(ledger).where(ledger.c.outcome == "rejected")
            rejected = conn.execute(rejects).scalar_one()
    finally:
        engine.dispose()
    assert rejected == 0
    return found


@pytest.fixture
def hooks(sqlite_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=sqlite_url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    with TestClient(create_app(settings)) as client:
        yield client


def test_every_intercom_line_is_stored_with_every_message(sqlite_url: str) -> None:
    ingest("intercom", "intercom.ndjson", sqlite_url)
    expected = intercom_expected()
    assert len(expected) == 8
    assert stored(sqlite_url, "intercom") == expected


def test_every_zendesk_line_is_stored_with_every_comment(sqlite_url: str) -> None:
    ingest("zendesk", "zendesk.ndjson", sqlite_url)
    expected = zendesk_expected()
    assert len(expected) == 5
    assert stored(sqlite_url, "zendesk") == expected


def test_the_single_conversation_is_the_first_line_of_the_batch() -> None:
    # The quick start pushes it, then the batch: the batch's first line must be "unchanged", as the README says.
    single = json.loads((EXAMPLES / "intercom-conversation.json").read_text(encoding="utf-8"))
    assert single == lines("intercom.ndjson")[0]


def test_the_webhook_adds_its_reply_to_a_pushed_conversation(sqlite_url: str, hooks: TestClient) -> None:
    ingest("intercom", "intercom.ndjson", sqlite_url)
    body = (EXAMPLES / "intercom-webhook.json").read_bytes()
    envelope = json.loads(body)
    external_id = envelope["data"]["item"]["id"]
    before = stored(sqlite_url, "intercom")[external_id]

    headers = {"content-type": "application/json", "x-hub-signature": sign(body, SECRET)}
    response = hooks.post("/webhooks/intercom", content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert (response.json()["result"], response.json()["external_id"]) == ("updated", external_id)
    assert envelope["app_id"] == WORKSPACE
    assert stored(sqlite_url, "intercom")[external_id] == before + Counter({"public": 1})


def emails(document: Any) -> Iterator[str]:
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "email" and isinstance(value, str):
                yield value
            else:
                yield from emails(value)
    elif isinstance(document, list):
        for item in document:
            yield from emails(item)


def test_every_person_is_made_up() -> None:
    documents = [*lines("intercom.ndjson"), *lines("zendesk.ndjson")]
    documents += [json.loads((EXAMPLES / n).read_text(encoding="utf-8")) for n in ("intercom-webhook.json",)]
    addresses = {address for document in documents for address in emails(document)}
    assert len(addresses) > 10
    assert {address for address in addresses if not address.endswith("@example.com")} == set()
