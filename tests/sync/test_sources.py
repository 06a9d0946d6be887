"""KBMS_SOURCES and KBMS_SOURCES_FILE: what is accepted, what is refused and how, and that no token is ever shown."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2
import pytest

from kbms.providers import REGISTRY, Provider
from kbms.providers.intercom import IntercomProvider
from kbms.providers.pull import PullClient, SourceConfig, Timing
from kbms.providers.zendesk import ZendeskProvider
from kbms.settings import Settings
from kbms.sync.sources import SourcesError, configured_sources, sources_of
from tests.support import canary

TOKEN = f"tok_{canary.TAG}"  # never to be shown (tests/support/canary.py)
TIMING = Timing()


class StubPuller:
    def default_base_url(self, workspace: str) -> str:
        return f"https://{workspace}.example.invalid"

    def client(
        self, source: SourceConfig, *, transport: httpx2.AsyncBaseTransport | None = None, timing: Timing = TIMING
    ) -> PullClient:
        raise NotImplementedError


class PullableIntercom(IntercomProvider):
    puller = StubPuller()  # type: ignore[assignment]


class PullableZendesk(ZendeskProvider):
    puller = StubPuller()  # type: ignore[assignment]


class PushOnlyIntercom(IntercomProvider):
    puller = None  # type: ignore[assignment]


PROVIDERS: Mapping[str, Provider] = {"intercom": PullableIntercom(), "zendesk": PullableZendesk()}


def entry(**fields: Any) -> dict[str, Any]:
    return {"provider": "intercom", "workspace": "abc123", "token": TOKEN, **fields}


def parse(entries: Any, providers: Mapping[str, Provider] = PROVIDERS) -> list[SourceConfig]:
    return configured_sources(json.dumps(entries), None, providers=providers)


def refusal(entries: Any, providers: Mapping[str, Provider] = PROVIDERS) -> str:
    with pytest.raises(SourcesError) as caught:
        configured_sources(entries if isinstance(entries, str) else json.dumps(entries), None, providers=providers)
    message = str(caught.value)
    assert canary.TAG not in message
    return message


def test_entries_become_source_configs() -> None:
    full = {
        "provider": "zendesk",
        "workspace": "acme",
        "token": TOKEN,
        "email": "ops@acme.example",
        "base_url": "http://127.0.0.1:8080/",
        "max_requests_per_minute": 120,
    }
    sources = parse([entry(), full])
    assert sources == [
        SourceConfig("intercom", "abc123", TOKEN),
        SourceConfig("zendesk", "acme", TOKEN, "ops@acme.example", "http://127.0.0.1:8080", 120),
    ]
    assert all(TOKEN not in repr(source) for source in sources)
    assert configured_sources("", None) == configured_sources("  \n", None) == []
    assert parse([]) == []


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([entry(), entry(tokn="x")], "entry 1, field tokn: Extra inputs are not permitted"),
        ([{"provider": "intercom", "workspace": "w"}], "entry 0, field token: Field required"),
        (
            [entry(provider="freshdesk")],
            "entry 0, field provider: not a provider kbms can pull from (intercom, zendesk)",
        ),
        ([entry(), entry(workspace="other"), entry()], "entry 2: the same provider and workspace as entry 0"),
        ([entry(max_requests_per_minute=0)], "entry 0, field max_requests_per_minute: Input should be greater than 0"),
        ([entry(max_requests_per_minute=-5)], "entry 0, field max_requests_per_minute: Input should be greater than 0"),
        ([entry(max_requests_per_minute=1.5)], "entry 0, field max_requests_per_minute:"),
        ([entry(workspace="has space")], "entry 0, field workspace: String should match pattern"),
        ([entry(token="")], "entry 0, field token: String should have at least 1 character"),
        ([entry(token=f"{TOKEN}\n")], "entry 0, field token: Value error, a token is printable ASCII, without spaces"),
        ([entry(email="nobody")], "entry 0, field email: Value error, not an email address"),
        ([entry(base_url="ftp://x.example")], "entry 0, field base_url: Value error, not an http:// or https:// URL"),
        ([entry(base_url=f"https://u:{TOKEN}@x.example")], "field base_url: Value error, a base URL carries no"),
        ([entry(base_url="https://x.example:99999")], "field base_url: Value error, not a URL"),
        ([entry(base_url="https://x.example/?a=1")], "field base_url: Value error, a base URL has no query"),
        ([entry(token=12345)], "entry 0, field token: Input should be a valid string"),
        ([TOKEN], "entry 0: Input should be an object"),
        ({"provider": "intercom"}, "KBMS_SOURCES is not a valid list of sources: Input should be a valid array"),
    ],
)
def test_refused_configurations_name_the_entry_and_field(entries: Any, expected: str) -> None:
    message = refusal(entries)
    assert message.startswith("KBMS_SOURCES is not a valid list of sources: ")
    assert expected in message


def test_invalid_json_is_refused_without_quoting_it() -> None:
    message = refusal(f'[{{"provider": "intercom", "workspace": "w", "token": "{TOKEN}"')
    assert "Invalid JSON" in message


def test_every_problem_is_named_at_once() -> None:
    message = refusal([entry(extra=1), entry(workspace="x", email="bad")])
    assert "entry 0, field extra" in message
    assert "entry 1, field email" in message


def test_a_provider_without_a_puller_cannot_be_a_source() -> None:
    message = refusal([entry()], providers={"intercom": PushOnlyIntercom(), "zendesk": PullableZendesk()})
    assert "field provider: not a provider kbms can pull from (zendesk)" in message


def test_the_registry_decides_what_can_be_pulled() -> None:
    pullable = sorted(name for name, provider in REGISTRY.items() if provider.puller is not None)
    for name in REGISTRY:
        if name in pullable:
            assert configured_sources(json.dumps([entry(provider=name)]), None)[0].provider == name
        else:
            assert "field provider" in refusal([entry(provider=name)], providers=REGISTRY)


def test_a_file_holds_the_same_list(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps([entry(), entry(provider="zendesk", workspace="acme")]))
    assert [s.provider for s in configured_sources("", path, providers=PROVIDERS)] == ["intercom", "zendesk"]
    path.write_text(json.dumps([entry(nope=True)]))
    with pytest.raises(SourcesError, match=r"^KBMS_SOURCES_FILE '.*sources.json' is not a valid list of sources: "):
        configured_sources("", path, providers=PROVIDERS)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourcesError, match=r"KBMS_SOURCES_FILE '.*missing.json' cannot be read: No such file"):
        configured_sources("", tmp_path / "missing.json", providers=PROVIDERS)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[]")
    with pytest.raises(SourcesError, match="cannot be read: not UTF-8 text"):
        configured_sources("", binary, providers=PROVIDERS)


def test_both_variables_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_text("[]")
    with pytest.raises(SourcesError, match="KBMS_SOURCES and KBMS_SOURCES_FILE are both set"):
        configured_sources(json.dumps([entry()]), path, providers=PROVIDERS)


def test_settings_read_the_variables_and_keep_sources_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMS_SOURCES", json.dumps([entry()]))
    monkeypatch.setenv("KBMS_SYNC", "OFF")
    monkeypatch.setenv("KBMS_SYNC_INTERVAL", "60")
    settings = Settings()
    assert (settings.sync, settings.sync_interval) == ("off", 60.0)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)
    assert [source.workspace for source in sources_of(settings, providers=PROVIDERS)] == ["abc123"]


def test_sync_defaults_and_refusals() -> None:
    settings = Settings()
    assert (settings.sources, settings.sources_file, settings.sync, settings.sync_interval) == ("", None, "on", 300.0)
    for bad in ({"sync": "maybe"}, {"sync_interval": 0}, {"sync_interval": -1}):
        with pytest.raises(ValueError, match="sync"):
            Settings.model_validate(bad)


def hand_over(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment `kbms serve --workers N` gives its workers (cli/serve.py: str() of each field's value)."""
    for name in [name for name in os.environ if name.startswith("KBMS_")]:
        monkeypatch.delenv(name)
    for name, value in settings.model_dump().items():
        if value is not None:
            monkeypatch.setenv(f"KBMS_{name.upper()}", str(value))


def test_sources_survive_the_hand_over_to_serve_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `kbms serve --workers N` hands its settings to the worker processes as environment text (cli/serve.py:
    # str(value) of each field of model_dump()): the workers must read the very same sources.
    given = Settings(sources=json.dumps([entry(), entry(provider="zendesk", email="a@b.example")]), sync_interval=12.5)
    hand_over(given, monkeypatch)
    received = Settings()
    assert received.sources == given.sources
    assert (received.sync, received.sync_interval) == ("on", 12.5)
    assert sources_of(received, providers=PROVIDERS) == sources_of(given, providers=PROVIDERS)
    assert sources_of(received, providers=PROVIDERS)[0].token == TOKEN
    path = tmp_path / "sources.json"
    path.write_text(json.dumps([entry()]))
    monkeypatch.delenv("KBMS_SOURCES")  # what the first hand-over set
    from_file = Settings(sources_file=path)
    assert from_file.sources == ""  # and handed over as KBMS_SOURCES="", which counts as not set
    hand_over(from_file, monkeypatch)
    assert sources_of(Settings(), providers=PROVIDERS) == sources_of(from_file, providers=PROVIDERS)
