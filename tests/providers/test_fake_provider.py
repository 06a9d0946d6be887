"""A provider of the test's own, served through ``create_app(settings, providers=...)``: the app's routes, metrics,
OpenAPI document and provider filter come from the mapping it is given, not from the registry.

The fake is what the Provider protocol asks for and nothing more: a tolerant pydantic schema of its own, a pure
mapper to a ``ConversationSnapshot``, no webhooks and no redactor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

from kbms.api import create_app
from kbms.model import ConversationHeader, ConversationSnapshot, Message, ParticipantObservation, utc_from_timestamp
from kbms.providers import REGISTRY, Provider
from kbms.providers.base import validate_json
from kbms.settings import Settings

PUSH = "/integrations/fake/conversations"
BATCH = "/integrations/fake/conversations/batch"
NDJSON = {"content-type": "application/x-ndjson"}


class FakeNote(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    author: str
    text: str
    at: int  # unix seconds


class FakeThread(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    title: str | None = None
    changed: int  # unix seconds: the version of the payload
    notes: list[FakeNote] = []


def to_snapshot(thread: FakeThread, *, workspace: str) -> ConversationSnapshot:
    """Pure: a fake thread, as kbms's model."""
    version = utc_from_timestamp(thread.changed)
    return ConversationSnapshot(
        provider=FakeProvider.name,
        workspace=workspace,
        external_id=thread.id,
        created_at=min((utc_from_timestamp(note.at) for note in thread.notes), default=version),
        version=version,
        header=ConversationHeader(subject=thread.title),
        participants=tuple(
            ParticipantObservation(id=author, role="customer", seen_at=version)
            for author in sorted({note.author for note in thread.notes})
        ),
        messages=tuple(
            Message(
                id=note.id, author_participant_id=note.author, sent_at=utc_from_timestamp(note.at), content=note.text
            )
            for note in thread.notes
        ),
    )


class FakeProvider:
    name = "fake"
    push_schema = FakeThread
    workspace_description = "The fake account; default: KBMS_DEFAULT_WORKSPACE"
    puller = None
    webhooks = None
    redactor = None

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        return to_snapshot(validate_json(FakeThread, body), workspace=workspace or default_workspace)


FAKE: Provider = FakeProvider()


def thread(external_id: str, *, changed: int, notes: list[tuple[str, str]], title: str = "Fake") -> dict[str, Any]:
    return {
        "id": external_id,
        "title": title,
        "changed": changed,
        "notes": [
            {"id": note_id, "author": "ann", "text": text, "at": 1_700_000_000 + i}
            for i, (note_id, text) in enumerate(notes)
        ],
        "ignored": {"a vendor field": True},  # the schema is tolerant
    }


@pytest.fixture
def fake_client(database_url: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=database_url), providers={FAKE.name: FAKE})
    with TestClient(app) as client:
        yield client


def ingested(text: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "kbms_ingest_results_total" and labels.items() <= sample.labels.items()
    )


def test_a_fake_provider_ingests_and_reads_back(fake_client: TestClient) -> None:
    first = thread("t1", changed=1_700_000_100, notes=[("n1", "the pineapple arrived bruised")])
    created = fake_client.post(PUSH, json=first)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["provider"], body["external_id"], body["result"], body["deduplicated"]) == (
        "fake",
        "t1",
        "created",
        False,
    )
    t1 = body["id"]

    again = fake_client.post(PUSH, json=first)
    assert again.status_code == 200
    assert again.json() == {**body, "result": "unchanged", "deduplicated": True}

    newer = thread("t1", changed=1_700_000_200, notes=[("n1", "the pineapple arrived bruised"), ("n2", "refunded")])
    lines = [
        thread("t2", changed=1_700_000_300, notes=[("m1", "where is my parcel")], title="Parcel"),
        newer,
        first,  # older than what is stored now: adds nothing
        {"id": "t3", "changed": "not a time"},  # breaks the fake's own schema
    ]
    batch = fake_client.post(BATCH, content="\n".join(json.dumps(line) for line in lines) + "\n", headers=NDJSON)
    assert batch.status_code == 200, batch.text
    answer = batch.json()
    assert {k: answer[k] for k in ("provider", "lines", "created", "updated", "unchanged", "rejected")} == {
        "provider": "fake",
        "lines": 4,
        "created": 1,
        "updated": 1,
        "unchanged": 1,
        "rejected": 1,
    }
    assert [(r["line"], r["status"], r["result"]) for r in answer["results"]] == [
        (1, 201, "created"),
        (2, 200, "updated"),
        (3, 200, "unchanged"),
        (4, 422, "rejected"),
    ]
    assert answer["results"][1]["id"] == t1
    assert [issue["field"] for issue in answer["results"][3]["error"]["details"]] == ["changed"]
    t2 = answer["results"][0]["id"]

    detail = fake_client.get(f"/internal/conversations/{t1}")
    assert detail.status_code == 200
    got = detail.json()
    assert (got["provider"], got["external_id"], got["workspace"], got["subject"]) == ("fake", "t1", "default", "Fake")
    assert [(m["id"], m["content"]) for m in got["messages"]] == [
        ("n1", "the pineapple arrived bruised"),
        ("n2", "refunded"),
    ]
    assert [p["id"] for p in got["participants"]] == ["ann"]

    listed = fake_client.get("/internal/conversations", params={"provider": "fake"})
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [t2, t1]  # newest-updated first
    found = fake_client.get("/internal/conversations", params={"q": "pineapple", "provider": "fake"})
    assert found.status_code == 200
    assert [item["id"] for item in found.json()["items"]] == [t1]

    # The app serves the providers it was given, and only those: the registry's are unknown to it.
    assert fake_client.get("/internal/conversations", params={"provider": "intercom"}).status_code == 422
    assert fake_client.post("/integrations/intercom/conversations", json=first).status_code == 404

    metrics = fake_client.get("/metrics").text
    assert ingested(metrics, provider="fake", channel="push", outcome="created") == 1
    assert ingested(metrics, provider="fake", channel="push", outcome="unchanged") == 1
    assert ingested(metrics, provider="fake", channel="batch", outcome="rejected") == 1
    assert ingested(metrics, provider="intercom") == 0


def test_the_openapi_document_lists_the_fake_provider_and_no_other(fake_client: TestClient) -> None:
    document = fake_client.get("/openapi.json").json()
    paths = document["paths"]
    assert {PUSH, BATCH} <= set(paths)
    assert not [path for path in paths if any(f"/{name}" in path for name in REGISTRY)]
    schema = paths[PUSH]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/FakeThread"}
    assert {"FakeThread", "FakeNote"} <= set(document["components"]["schemas"])
    listing = {p["name"]: p for p in paths["/internal/conversations"]["get"]["parameters"]}
    # The provider filter's schema is its validator's: one allowed value is a JSON Schema "const".
    assert listing["provider"]["schema"] == {"const": "fake", "type": "string"}


def test_without_providers_the_app_serves_the_registry(database_url: str) -> None:
    with TestClient(create_app(Settings(database_url=database_url))) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {f"/integrations/{name}/conversations" for name in REGISTRY} <= set(paths)
    assert PUSH not in paths
