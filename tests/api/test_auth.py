"""API keys: every operation of the OpenAPI document against every kind of caller, and workspace-limited keys.

The matrix is built from the OpenAPI document itself: an operation added without a row here fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kbms.api import create_app
from kbms.api.auth import required_scope
from kbms.auth import Keyring, KeyringError, digest, key_config, new_key
from kbms.cli import app as cli
from kbms.providers import REGISTRY
from kbms.settings import Settings
from tests.providers import SAMPLES
from tests.support import canary
from tests.support.helpers import dumps, intercom_payload, zendesk_pushes

ADMIN, READER, INGESTER, READER_B, INGESTER_B, REVOKED = (new_key() for _ in range(6))
# Well-formed, never configured, and a canary (tests/support/canary.py): the whole suite fails if a log line shows it.
UNKNOWN = "kbms_" + (canary.TAG + "-unknown-key-" * 4)[:43]
KEYS = [
    {"name": "admin", "sha256": digest(ADMIN), "scopes": ["admin"]},
    {"name": "reader", "sha256": digest(READER), "scopes": ["read"]},
    {"name": "ingester", "sha256": digest(INGESTER), "scopes": ["ingest"]},
    {"name": "reader-b", "sha256": digest(READER_B), "scopes": ["read"], "workspaces": ["ws-b"]},
    {"name": "ingester-b", "sha256": digest(INGESTER_B), "scopes": ["ingest"], "workspaces": ["ws-b"]},
    {"name": "gone", "sha256": digest(REVOKED), "scopes": ["admin"], "revoked": True},
]
CALLERS = ("none", "malformed", "unknown", "revoked", "wrong scope", "other workspace", "valid")
MALFORMED = ("Basic YWxpY2U6c2VjcmV0", "Bearer", f"Bearer {canary.TOKEN}", f"Bearer {ADMIN} extra", f"bearer{ADMIN}")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, str]
    body: bytes | None = None
    content_type: str = "application/json"


# A configured source, so that /internal/sources/... have one to be about. Its API is a closed local port: the sync
# service's passes fail (and are recorded so) without leaving the machine; a long interval keeps it to the first.
SOURCE = {"provider": "intercom", "workspace": "ws-a", "token": "tok-auth-test", "base_url": "http://127.0.0.1:9"}


def keyed_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url, api_keys=json.dumps(KEYS), sources=json.dumps([SOURCE]), sync_interval=3600
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings(database_url))) as client:
        yield client


def seed(client: TestClient) -> dict[str, str]:
    """One conversation in ws-a and one in ws-b; their ids."""
    ids = {}
    for workspace in ("ws-a", "ws-b"):
        answer = client.post(
            "/integrations/intercom/conversations",
            params={"workspace": workspace},
            content=dumps(intercom_payload(f"seed-{workspace}")),
            headers={**bearer(ADMIN), "Content-Type": "application/json"},
        )
        assert answer.status_code == 201, answer.text
        ids[workspace] = answer.json()["id"]
    return ids


def call_for(method: str, template: str, ids: dict[str, str], n: int) -> Call:
    """A well-formed request for an operation, about workspace ws-a (the one the limited keys do not have)."""
    path = template.replace("{conversation_id}", ids["ws-a"])
    path = path.replace("{provider}", SOURCE["provider"]).replace("{workspace}", SOURCE["workspace"])
    if template.startswith("/integrations/"):
        samples = SAMPLES[template.split("/")[2]]  # /integrations/{provider}/...
        if template.endswith("/batch"):
            lines = b"\n".join(samples.push(f"batch-{n}-{i}") for i in range(2))
            return Call(method, path, {"workspace": "ws-a"}, lines, "application/x-ndjson")
        return Call(method, path, {"workspace": "ws-a"}, samples.push(f"push-{n}"))
    if template.startswith("/webhooks/") and method == "POST":
        return Call(method, path, {}, dumps({"type": "notification_event", "id": f"n{n}"}))
    if template in ("/internal/conversations", "/internal/exports/conversations.ndjson"):
        return Call(method, path, {"workspace": "ws-a"})
    return Call(method, path, {})


def expected_valid(call: Call) -> set[int]:
    if call.path.startswith("/webhooks/") and call.method == "POST":
        return {401}  # unsigned: providers authenticate webhooks, API keys change nothing
    return {200, 201, 202}


def headers_for(caller: str, scope: str | None, attempt: int) -> dict[str, str]:
    right = {"read": READER, "ingest": INGESTER, "admin": ADMIN, None: ADMIN}[scope]
    wrong = {"read": INGESTER, "ingest": READER, "admin": READER, None: READER}[scope]
    limited = {"read": READER_B, "ingest": INGESTER_B, "admin": READER_B, None: READER_B}[scope]
    return {
        "none": {},
        "malformed": {"Authorization": MALFORMED[attempt % len(MALFORMED)]},
        "unknown": bearer(UNKNOWN),
        "revoked": bearer(REVOKED),
        "wrong scope": bearer(wrong),
        "other workspace": bearer(limited),
        "valid": bearer(right),
    }[caller]


def expected(caller: str, scope: str | None, call: Call) -> set[int]:
    if scope is None:
        return expected_valid(call)  # an open operation answers the same, whoever calls
    if caller in ("none", "malformed", "unknown", "revoked"):
        return {401}
    if caller == "wrong scope":
        return {403}
    if caller == "other workspace":
        if scope == "admin":
            return {403}  # a read key, limited or not, is not admin
        if call.path.startswith("/internal/conversations/"):
            return {404}  # another workspace's conversation does not exist for this key
        if call.path.startswith("/internal/changes"):
            return {200}  # the feed of the key's own workspaces (checked below: nothing of ws-a)
        return {403}  # asked for ws-a explicitly, to read or to write
    return expected_valid(call)


def test_every_operation_answers_every_caller_as_specified(keyed: TestClient) -> None:
    ids = seed(keyed)
    document = keyed.get("/openapi.json").json()
    operations = [
        (method.upper(), template)
        for template, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete", "head")
    ]
    assert len(operations) >= 10
    tally: Counter[str] = Counter()
    failures = []
    for n, (method, template) in enumerate(operations):
        scope = required_scope(template)
        documented = document["paths"][template][method.lower()]
        assert ("security" in documented) == (scope is not None), template
        for attempt, caller in enumerate(CALLERS):
            call = call_for(method, template, ids, n * 100 + attempt)
            headers = headers_for(caller, scope, attempt)
            if call.body is not None:
                headers["Content-Type"] = call.content_type
            answer = keyed.request(call.method, call.path, params=call.params, content=call.body, headers=headers)
            want = expected(caller, scope, call)
            ok = answer.status_code in want
            if ok and scope is not None and answer.status_code in (401, 403):
                body = answer.json()
                ok = body["error_code"] == ("unauthorized" if answer.status_code == 401 else "forbidden")
                ok = ok and str(answer.status_code) in documented["responses"]
                if answer.status_code == 401:
                    challenge = answer.headers.get("www-authenticate", "")
                    ok = ok and challenge.startswith("Bearer")
                    ok = ok and (("invalid_token" in challenge) == (caller != "none"))
            if ok and caller == "other workspace" and answer.status_code == 200:
                ok = "ws-a" not in answer.text and ids["ws-a"] not in answer.text
            tally["as specified" if ok else "wrong"] += 1
            if not ok:
                failures.append((method, template, caller, answer.status_code, answer.text[:200]))
    assert failures == []
    assert tally["as specified"] == len(operations) * len(CALLERS)


@pytest.mark.parametrize("provider", list(REGISTRY))
def test_a_push_is_authorized_before_it_is_validated(keyed: TestClient, provider: str) -> None:
    # A body no provider can read ({}: no id, no ticket): who may push is decided first, then what was pushed.
    path = f"/integrations/{provider}/conversations"
    json_body = {"Content-Type": "application/json"}
    for key, status in ((None, 401), (UNKNOWN, 401), (READER, 403), (INGESTER_B, 403), (INGESTER, 422)):
        headers = {**json_body, **(bearer(key) if key else {})}
        answer = keyed.post(path, params={"workspace": "ws-a"}, content=b"{}", headers=headers)
        assert answer.status_code == status, (key, answer.text)
    assert keyed.get("/internal/conversations", headers=bearer(READER)).json()["items"] == []


def test_a_limited_key_sees_only_its_workspaces(keyed: TestClient) -> None:
    ids = seed(keyed)
    for i in range(3):
        keyed.post(
            "/integrations/intercom/conversations",
            params={"workspace": "ws-a"},
            content=dumps(intercom_payload(f"more-{i}")),
            headers={**bearer(INGESTER), "Content-Type": "application/json"},
        )
    as_b = bearer(READER_B)
    listed = keyed.get("/internal/conversations", headers=as_b).json()["items"]
    assert [item["id"] for item in listed] == [ids["ws-b"]]
    assert keyed.get("/internal/conversations", params={"workspace": "ws-b"}, headers=as_b).status_code == 200
    found = keyed.get("/internal/conversations", params={"q": "hello"}, headers=as_b).json()["items"]
    assert [item["id"] for item in found] == [ids["ws-b"]]
    changes = keyed.get("/internal/changes", headers=as_b).json()["items"]
    assert {change["conversation_id"] for change in changes} == {ids["ws-b"]}
    export = keyed.get("/internal/exports/conversations.ndjson", headers=as_b)
    assert [json.loads(line)["id"] for line in export.text.splitlines()] == [ids["ws-b"]]
    assert export.headers["x-kbms-count"] == "1"
    assert keyed.get(f"/internal/conversations/{ids['ws-b']}", headers=as_b).status_code == 200
    # An unlimited reader sees everything.
    assert len(keyed.get("/internal/conversations", headers=bearer(READER)).json()["items"]) == 5


def test_a_limited_ingest_key_writes_only_its_workspaces(keyed: TestClient) -> None:
    as_b = {**bearer(INGESTER_B), "Content-Type": "application/json"}
    payload = dumps(intercom_payload("limited"))
    refused = keyed.post(
        "/integrations/intercom/conversations", params={"workspace": "ws-a"}, content=payload, headers=as_b
    )
    assert (refused.status_code, refused.json()["error_code"]) == (403, "forbidden")
    # Without a workspace the conversation goes to the default one, which this key does not have either.
    assert keyed.post("/integrations/intercom/conversations", content=payload, headers=as_b).status_code == 403
    assert keyed.get("/internal/conversations", headers=bearer(READER)).json()["items"] == []
    stored = keyed.post(
        "/integrations/intercom/conversations", params={"workspace": "ws-b"}, content=payload, headers=as_b
    )
    assert stored.status_code == 201
    # The same body pushed by an unlimited key to the default workspace, then by the limited key: the limited key
    # must not learn the other conversation's id from the redelivery shortcut.
    keyed.post(
        "/integrations/intercom/conversations",
        content=dumps(intercom_payload("elsewhere")),
        headers={**bearer(INGESTER), "Content-Type": "application/json"},
    )
    again = keyed.post(
        "/integrations/intercom/conversations", content=dumps(intercom_payload("elsewhere")), headers=as_b
    )
    assert again.status_code == 403
    # A batch of Zendesk tickets, whose URLs name their accounts: the line of another workspace is refused alone.
    case, push = next(zendesk_pushes())
    url = push["ticket"]["url"]
    lines = [
        {**push, "ticket": {**push["ticket"], "url": re.sub(r"//[^.]+\.", f"//{account}.", url)}}
        for account in ("ws-b", "ws-a")
    ]
    batch = keyed.post(
        "/integrations/zendesk/conversations/batch",
        content=b"\n".join(dumps(line) for line in lines),
        headers={**bearer(INGESTER_B), "Content-Type": "application/x-ndjson"},
    )
    assert batch.status_code == 200, batch.text
    assert [line["status"] for line in batch.json()["results"]] == [201, 403], case
    listed = keyed.get("/internal/conversations", params={"provider": "zendesk"}, headers=bearer(READER)).json()
    assert [item["workspace"] for item in listed["items"]] == ["ws-b"]


def test_each_refused_key_is_told_apart_without_being_echoed(keyed: TestClient) -> None:
    # What a newcomer needs to fix: the header, the copy of the key, or the server's key list.
    cases = [
        ("Basic YWxpY2U6c2VjcmV0", "Malformed Authorization header: expected Bearer <key>"),
        ("Bearer", "Malformed Authorization header: expected Bearer <key>"),
        (f"Bearer {ADMIN} extra", "Malformed Authorization header: expected Bearer <key>"),
        (f"Bearer {canary.TOKEN}", "Malformed API key: a kbms key is kbms_ followed by 43 letters, digits, - or _"),
        (f"Bearer {ADMIN[:-1]}", "Malformed API key: a kbms key is kbms_ followed by 43 letters, digits, - or _"),
        (f"Bearer {UNKNOWN}", "Unknown API key: this server has no such key (KBMS_API_KEYS)"),
        (f"Bearer {new_key()}", "Unknown API key: this server has no such key (KBMS_API_KEYS)"),
        (f"Bearer {REVOKED}", "Revoked API key"),
    ]
    for header, message in cases:
        answer = keyed.get("/internal/conversations", headers={"Authorization": header})
        assert answer.status_code == 401
        assert answer.json()["message"].startswith(message), header
        sent = header.split()[1:]  # whatever stood where the key goes
        assert not any(word in answer.text or word in str(answer.headers) for word in sent), header


def test_open_paths_need_no_key(keyed: TestClient) -> None:
    for path in ("/health", "/ready", "/openapi.json"):
        assert keyed.get(path).status_code == 200
    assert keyed.head("/webhooks/intercom").status_code == 200


def test_without_keys_auth_is_off(client: TestClient) -> None:
    assert client.get("/internal/conversations").status_code == 200
    assert client.get("/internal/conversations", headers=bearer(UNKNOWN)).status_code == 200


def test_key_configuration_errors_are_clear(tmp_path: Path) -> None:
    token = new_key()
    entry = json.loads(key_config(token, name="fe", scopes=["read"], workspaces=["acme"]))
    assert entry == {"name": "fe", "sha256": digest(token), "scopes": ["read"], "workspaces": ["acme"]}
    assert token not in json.dumps(entry)
    keyring = Keyring.configured(json.dumps([entry]), None)
    found = keyring.lookup(token)
    assert found is not None
    assert (found.name, found.workspaces) == ("fe", frozenset({"acme"}))
    bad: list[Any] = [
        [{"name": "x", "sha256": "nothex", "scopes": ["read"]}],
        [{"name": "x", "sha256": digest(token), "scopes": []}],
        [{"name": "x", "sha256": digest(token), "scopes": ["root"]}],
        [entry, {**entry, "name": "copy"}],
        [entry, {**entry, "sha256": digest(new_key())}],
        {"not": "a list"},
    ]
    for config in bad:
        with pytest.raises(KeyringError) as raised:
            Keyring.configured(json.dumps(config), None)
        assert token not in str(raised.value)
    with pytest.raises(KeyringError, match="cannot be read"):
        Keyring.configured("", tmp_path / "missing.json")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([entry]))
    assert len(Keyring.configured("", keys_file)) == 1


def test_serve_refuses_an_open_non_loopback_bind_without_keys(sqlite_url: str) -> None:
    command = [sys.executable, "-m", "kbms", "serve", "--host", "0.0.0.0", "--database-url", sqlite_url]  # noqa: S104
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KBMS_API_KEYS")}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert refused.returncode == 2
    assert "--insecure" in refused.stderr
    bad_keys = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**environment, "KBMS_API_KEYS": "[{}]"}
    )
    assert (bad_keys.returncode, "not a valid list of API keys" in bad_keys.stderr) == (2, True)


def test_keys_create_prints_a_key_and_an_entry_that_admits_it() -> None:
    made = CliRunner().invoke(cli, ["keys", "create", "--name", "fe", "--scope", "read", "--workspace", "acme"])
    assert made.exit_code == 0, made.output
    token = next(line for line in made.stdout.splitlines() if line.startswith("kbms_"))
    entry = next(line for line in made.stdout.splitlines() if line.startswith("{"))
    assert token not in entry
    found = Keyring.configured(f"[{entry}]", None).lookup(token)
    assert found is not None
    assert (found.name, found.scopes, found.workspaces) == ("fe", frozenset({"read"}), frozenset({"acme"}))
    refused = CliRunner().invoke(cli, ["keys", "create", "--name", "fe", "--scope", "root"])
    assert refused.exit_code == 2
