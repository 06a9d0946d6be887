"""schemathesis against the app's own OpenAPI document: every operation, every check, zero failures.

The run is schemathesis's own engine (what ``schemathesis run`` does), in-process over ASGI, on a fresh SQLite
store: its examples, coverage, fuzzing (positive and negative data, ``EXAMPLES_PER_OPERATION`` each) and stateful
phases, the last following the document's links (ingest -> detail, list -> next page, changes -> next cursor).

Webhooks are signed: ``signing`` puts the provider's signature on the exact bytes each request carries, as the
provider would, so the fuzzer reaches what a webhook does with a payload. Unsigned deliveries (401, nothing kept)
are covered by tests/providers/intercom/test_webhooks.py and tests/providers/zendesk/test_api.py.

Every request carries an admin API key (``AUTH_HEADERS``, the one place credentials are set); schemathesis also
sends none or a bad one where the document asks for a key, and expects a 401.

Where a check cannot hold for a documented reason, ``EXCUSES`` names the exact failures it lets through, and why.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.core.failures import AcceptedNegativeData, Failure
from schemathesis.core.parameters import ParameterLocation
from schemathesis.engine import StopReason, events, from_schema
from schemathesis.engine.recorder import CheckFailureInfo
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.python.asgi import shutdown_lifespans

from kbms.api import create_app
from kbms.api.body import NDJSON_TYPES
from kbms.api.conversations import MAX_LIMIT
from kbms.auth import key_config
from kbms.ingest import ingest_batch
from kbms.providers import DEFAULT_PROVIDER, REGISTRY, get_provider
from kbms.settings import Settings
from kbms.storage import open_store
from tests.conftest import migrated_sqlite_url
from tests.providers import SAMPLES

EXAMPLES_PER_OPERATION = 200
# Each provider's webhook secret, by provider name (for those that send webhooks).
SECRETS = {name: f"fuzz-{name}-webhook-secret" for name, provider in REGISTRY.items() if provider.webhooks}
# The one place the caller's credentials are set: an admin key (every scope, every workspace), configured in the
# app below and carried by every request. schemathesis then also checks that missing or invalid ones get 401.
API_KEY = "kbms_fuzz-0123456789-abcdefghijklmnopqrstuvwxyz0"
AUTH_HEADERS = {"Authorization": f"Bearer {API_KEY}"}

CONFIG: dict[str, Any] = {
    "headers": AUTH_HEADERS,
    "generation": {"mode": "all", "max-examples": EXAMPLES_PER_OPERATION},
    # Every check; max_response_time is left out on purpose: timings are not asserted in tests.
    "checks": {"enabled": True},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        # More scenarios than the default: with it, a run often followed 3 or 4 of the links it can reach; with
        # 500, all 6 (the summary printed with -s lists them), for a few seconds of CPU more.
        "stateful": {"enabled": True, "generation": {"max-examples": 500}},
    },
}

Case = schemathesis.Case[Any]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def signing(app: ASGIApp) -> ASGIApp:
    """The app behind a provider's signer: a webhook delivery gets its signature on the bytes it carries."""

    async def signed(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith("/webhooks/"):
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = [*scope["headers"], *_signature(path, body)]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app({**scope, "headers": headers}, replay, send)

    return signed


def _signature(path: str, body: bytes) -> list[tuple[bytes, bytes]]:
    name = path.removeprefix("/webhooks/")
    if name not in SECRETS:
        return []
    headers = SAMPLES[name].sign(body, SECRETS[name], datetime.now(UTC))
    return [(header.lower().encode(), value.encode()) for header, value in headers.items()]


@dataclass(frozen=True)
class Excuse:
    """Failures of one check on some operations that a documented rule explains."""

    reason: str
    failure: type[Failure]
    operations: frozenset[str]
    applies: Callable[[Case, schemathesis.Response], bool]

    def covers(self, failure: Failure, case: Case, response: schemathesis.Response) -> bool:
        return (
            isinstance(failure, self.failure)
            and case.operation.label in self.operations
            and self.applies(case, response)
        )


def _issue(response: schemathesis.Response) -> tuple[str, str] | None:
    """(field, issue) of a 422's first detail."""
    if response.status_code != 422:
        return None
    details = (response.json() or {}).get("details") or []
    return (details[0]["field"], details[0]["issue"]) if details else None


def _negative_body(case: Case) -> bool:
    return case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)


PROVIDER_BODIES = frozenset(
    f"POST {path}"
    for provider in REGISTRY
    for path in (
        f"/integrations/{provider}/conversations",
        f"/integrations/{provider}/conversations/batch",
        f"/webhooks/{provider}",
    )
)
EXCUSES = [
    Excuse(
        "A cursor is opaque: only one the API issued is valid, and any other is a documented 422 (invalid_cursor). "
        "No schema can describe 'issued by the server'; the stateful phase sends real ones.",
        RejectedPositiveData,
        frozenset({"GET /internal/conversations", "GET /internal/changes"}),
        lambda case, response: _issue(response) == ("cursor", "invalid_cursor"),
    ),
    Excuse(
        "A search needs a word, and what makes a word is Unicode's business (letters and digits once accents are "
        "folded): a documented 422 (no_words) that a portable JSON Schema pattern cannot state.",
        RejectedPositiveData,
        frozenset({"GET /internal/conversations"}),
        lambda case, response: _issue(response) == ("q", "no_words"),
    ),
    Excuse(
        "Provider payloads are read tolerantly (DESIGN.md: provider schemas are tolerant; ids as strings or "
        "integers, timestamps as unix seconds or ISO-8601, unknown fields ignored): the documented body is what is "
        "guaranteed to be accepted, not the limit of what is. Negative query parameters are still checked.",
        AcceptedNegativeData,
        PROVIDER_BODIES,
        lambda case, response: _negative_body(case),
    ),
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    url = migrated_sqlite_url(Path(tmp_path_factory.mktemp("fuzz")))
    _store_conversations(url, MAX_LIMIT + 1)
    settings = Settings(
        database_url=url,
        api_keys=key_config(API_KEY, name="fuzz", scopes=["admin"], workspaces=None).join("[]"),
        secrets={_secret_variable(name): secret for name, secret in SECRETS.items()},
    )
    # Batches are NDJSON text: sent as the generated string, like text/plain.
    schemathesis.serializer.alias(sorted(NDJSON_TYPES), "text/plain")
    # A failure is replayed with the seed it reports (the example database also replays it, on the same machine).
    seed = os.environ.get("KBMS_FUZZ_SEED")
    config = schemathesis.Config.from_dict({**CONFIG, **({"seed": int(seed)} if seed else {})})
    app = signing(create_app(settings))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=AUTH_HEADERS)

    def filter_failure(context: Any, failure: Failure, case: Case, response: schemathesis.Response) -> bool:
        return not any(excuse.covers(failure, case, response) for excuse in EXCUSES)

    schema.hook("filter_failure")(filter_failure)
    yield schema
    shutdown_lifespans()  # the app's lifespan (and its store) was started by schemathesis's ASGI transport


def _secret_variable(name: str) -> str:
    webhooks = REGISTRY[name].webhooks
    assert webhooks is not None
    return webhooks.secret_variable


def _store_conversations(url: str, count: int) -> None:
    """More conversations than the largest page: every unfiltered page then has a next one, so the stateful phase
    can follow the ``Next`` link whatever limit it draws (with only what it pushed itself, it sometimes could not)."""

    async def store_them() -> None:
        store = open_store(Settings(database_url=url))
        try:
            bodies = [SAMPLES[DEFAULT_PROVIDER].push(f"fuzz-seed-{number}") for number in range(count)]
            await ingest_batch(store, get_provider(DEFAULT_PROVIDER), bodies, workspace=None)
        finally:
            await store.close()

    asyncio.run(store_them())


@dataclass
class Run:
    """What one schemathesis run did: the failures it reports, and how much it tested."""

    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)
    cases: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    links: set[str] = field(default_factory=set)  # the document's links the stateful phase followed
    stop_reason: StopReason | None = None

    def record(self, event: events.EngineEvent) -> None:
        if isinstance(event, events.ScenarioFinished):
            self.cases[event.recorder.label][event.phase.value] += len(event.recorder.cases)
            self.links |= {
                node.transition.id
                for node in event.recorder.cases.values()
                if node.transition is not None and node.is_transition_applied and not node.transition.is_inferred
            }
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        key = (event.recorder.label, check.name, check.failure_info.failure.title)
                        self.failures.setdefault(key, _describe(event, case_id, check.failure_info))
        elif isinstance(event, events.NonFatalError):
            self.failures.setdefault((event.label, "error", ""), f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            self.failures.setdefault(("engine", "fatal", ""), f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            self.stop_reason = event.stop_reason

    def summary(self) -> str:
        phases = ("examples", "coverage", "fuzzing", "stateful")
        rows = [f"{label}: " + ", ".join(f"{p} {n[p]}" for p in phases if p in n) for label, n in self.cases.items()]
        followed = [f"{len(self.links)} links followed:", *sorted(self.links)]
        return "\n".join([*followed, "cases per operation and phase:", *sorted(rows)])


def _describe(event: events.ScenarioFinished, case_id: str, info: CheckFailureInfo) -> str:
    interaction = event.recorder.interactions.get(case_id)
    answer = interaction.response if interaction is not None else None
    received = f"{answer.status_code} {answer.content[:500]!r}" if answer is not None else "no response"
    return (
        f"{event.recorder.label} ({event.phase.value}): {info.failure.title}\n{info.failure.message}\n"
        f"{info.code_sample}\nreceived: {received}"
    )


@pytest.mark.timeout(900)  # about 70 s of CPU, alone; allow for a busy shared machine
def test_every_operation_keeps_its_documented_promises(api_schema: Any) -> None:
    run = Run()
    for event in from_schema(api_schema).execute():
        run.record(event)
    print(run.summary())
    seed = f"replay with KBMS_FUZZ_SEED={api_schema.config.seed}"
    assert not run.failures, "\n\n".join([*run.failures.values(), seed])
    assert run.stop_reason == StopReason.COMPLETED
    # The stateful phase followed the document's links: an ingest answer to its conversation, a page to the next.
    # (It never starts from an Intercom push or a webhook: its dependency analysis reads admin_assignee_id, app_id
    # and account_id as references to resources no operation returns. A batch leads on only when a generated
    # string happens to be a valid conversation.)
    assert any(link.startswith("POST ") for link in run.links), f"{run.summary()}\n{seed}"
    assert any("] Next" in link for link in run.links), f"{run.summary()}\n{seed}"
    with_inputs = [
        f"{method.upper()} {path}"
        for path, operations in api_schema.raw_schema["paths"].items()
        for method, operation in operations.items()
        if operation.get("parameters") or operation.get("requestBody")
    ]
    assert all(run.cases[label]["fuzzing"] >= EXAMPLES_PER_OPERATION for label in with_inputs), run.summary()
