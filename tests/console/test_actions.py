"""The console's actions, on every engine: reprocessing one reject or all since a time (admins only, with the
session's CSRF token), and a source's levers."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from tests.console.support import (
    ADMIN,
    ADMIN_B,
    READER,
    console,
    csrf_of,
    record_old_rejection,
    settings_for,
    signed_in,
    store_both,
)
from tests.support.helpers import intercom_payload, part

ROW = re.compile(r'<input type="hidden" name="delivery" value="(\d+)">')
OUTCOME = re.compile(r'<p role="status" id="outcome" class="outcome">(.*?)</p>', re.S)
SOURCE = {"provider": "intercom", "workspace": "ws-a", "token": "tok-console-test", "base_url": "http://127.0.0.1:9"}


def rows(client: TestClient) -> list[str]:
    return ROW.findall(client.get("/console/rejects").text)


def outcome_after(client: TestClient, response: object, page: str = "/console/rejects") -> str:
    assert getattr(response, "status_code", None) == 303
    assert getattr(response, "headers", {})["location"] == page
    shown = client.get(page)
    found = OUTCOME.search(shown.text)
    assert found is not None, shown.text
    again = client.get(page)  # shown once
    assert OUTCOME.search(again.text) is None
    return found.group(1)


def test_reprocess_a_fixed_reject_then_an_unfixable_one(database_url: str) -> None:
    record_old_rejection(database_url, intercom_payload("fixed", title="Back from the ledger"), workspace="ws-a")
    with console(settings_for(database_url)) as client:
        page = signed_in(client, ADMIN).get("/console/rejects")
        (fixed,) = ROW.findall(page.text)
        token = csrf_of(page)
        response = client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": fixed})
        assert outcome_after(client, response) == "1 delivery reprocessed: accepted (created)"
        assert rows(client) == []
        listed = client.get("/console/conversations").text
        assert "Back from the ledger" in listed
        store_both(client)
        broken = rows(client)[0]
        response = client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": broken})
        assert outcome_after(client, response).startswith("1 delivery reprocessed: still rejected: ")
        assert broken in rows(client)


def test_reprocess_all_since(database_url: str) -> None:
    record_old_rejection(database_url, intercom_payload("again", parts=[part("p1")]), workspace="ws-a")
    with console(settings_for(database_url)) as client:
        page = signed_in(client, ADMIN).get("/console/rejects")
        assert '<button type="submit">Reprocess all</button>' in page.text
        since = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")  # a datetime-local's form
        response = client.post("/console/rejects/reprocess-all", data={"csrf": csrf_of(page), "since": since})
        message = outcome_after(client, response)
        assert message.startswith("Reprocessed deliveries since ")
        assert "1 conversations re-derived" in message
        assert message.endswith("0 still rejected")
        assert rows(client) == []
        bad = client.post("/console/rejects/reprocess-all", data={"csrf": csrf_of(page), "since": "later"})
        assert bad.status_code == 422
        assert "since" in bad.text


def test_a_read_key_cannot_act(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        store_both(signed_in(client, ADMIN))
    with console(settings_for(database_url)) as client:
        page = signed_in(client, READER).get("/console/rejects")
        assert "Reprocess</button>" not in page.text
        assert "Reprocess all" not in page.text
        assert ROW.findall(page.text) == []
        token = csrf_of(page)  # its sign-out form's
        response = client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": "1"})
        assert response.status_code == 403
        assert "admin scope" in response.text
        response = client.post("/console/rejects/reprocess-all", data={"csrf": token, "since": "2020-01-01"})
        assert response.status_code == 403


@pytest.mark.parametrize(
    "path", ["/console/rejects/reprocess", "/console/rejects/reprocess-all", "/console/sources/intercom/ws-a/sync"]
)
def test_actions_need_the_session_csrf_token(database_url: str, path: str) -> None:
    settings = settings_for(database_url, sources=json.dumps([SOURCE]))
    with console(settings) as client:
        page = signed_in(client, ADMIN).get("/console/rejects")
        for form in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": csrf_of(page) + "0"}):
            response = client.post(path, data={**form, "delivery": "1", "since": "2020-01-01"})
            assert response.status_code == 403, form
            assert '<p role="alert">' in response.text
        # JSON is no form: no token can be read from it.
        response = client.post(path, json={"csrf": csrf_of(page), "delivery": "1"})
        assert response.status_code == 403
    with console(settings) as other:  # another session's token
        foreign = csrf_of(signed_in(other, ADMIN).get("/console/rejects"))
    with console(settings) as client:
        signed_in(client, ADMIN)
        assert client.post(path, data={"csrf": foreign, "delivery": "1", "since": "2020-01-01"}).status_code == 403


def test_a_workspace_limited_admin_acts_only_on_its_workspace(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        store_both(signed_in(client, ADMIN))
        every = rows(client)
    with console(settings_for(database_url)) as client:
        page = signed_in(client, ADMIN_B).get("/console/rejects")
        mine = ROW.findall(page.text)
        assert len(mine) == 1
        (other,) = set(every) - set(mine)
        token = csrf_of(page)
        assert client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": other}).status_code == 404
        for bad in ("", "x", "²", "9" * 19, "-1"):
            response = client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": bad})
            assert response.status_code == 422, bad
        assert "Reprocess all" not in page.text
        response = client.post("/console/rejects/reprocess-all", data={"csrf": token, "since": "2020-01-01"})
        assert response.status_code == 403
        response = client.post("/console/rejects/reprocess", data={"csrf": token, "delivery": mine[0]})
        assert response.status_code == 303


def test_sources_page_and_its_levers(database_url: str) -> None:
    settings = settings_for(database_url, sources=json.dumps([SOURCE]))
    with console(settings) as client:
        page = signed_in(client, ADMIN).get("/console/sources")
        assert page.status_code == 200
        assert re.findall(r"<h1>(.*?)</h1>", page.text) == ["Sources"]
        assert '<a href="/console/sources" aria-current="page">Sources</a>' in page.text
        table = re.search(r'<table id="sources">(.*?)</table>', page.text, re.S)
        assert table is not None
        assert "<td>ws-a</td>" in table.group(1)
        assert "never_synced" in table.group(1)
        assert "tok-console-test" not in page.text
        assert '<table id="sources">' in client.get("/console").text
        token = csrf_of(page)
        response = client.post("/console/sources/intercom/ws-a/sync", data={"csrf": token})
        assert "syncing is off in this process" in outcome_after(client, response, "/console/sources")
        response = client.post("/console/sources/intercom/ws-a/retry", data={"csrf": token})
        assert outcome_after(client, response, "/console/sources") == "intercom/ws-a: 0 dead letters queued again"
        assert client.post("/console/sources/intercom/nowhere/retry", data={"csrf": token}).status_code == 404
    with console(settings) as client:
        page = signed_in(client, READER).get("/console/sources")
        assert "Sync now" not in page.text
        assert client.post("/console/sources/intercom/ws-a/retry", data={"csrf": csrf_of(page)}).status_code == 403
    with console(settings_for(database_url)) as client:
        page = signed_in(client, ADMIN).get("/console")
        assert "/console/sources" not in page.text
        assert client.get("/console/sources").status_code == 404
