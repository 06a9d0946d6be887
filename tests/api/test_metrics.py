"""``/metrics``: what is counted, with bounded labels, per app; and right across the workers of ``kbms serve``."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from kbms.api import create_app
from kbms.ingest import ingest_push
from kbms.providers import get_provider
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from kbms.storage import open_store
from kbms.storage.base import ALL
from tests.conftest import start_server
from tests.support import canary
from tests.support.helpers import INTERCOM, dumps, intercom_payload, part

PUSH = "/integrations/intercom/conversations"
BATCH = "/integrations/intercom/conversations/batch"
HOOK = "/webhooks/intercom"
SECRET = canary.secret("metrics")
NDJSON = {"content-type": "application/x-ndjson"}


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def scrape(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def ingested(text: str, channel: str, outcome: str) -> float:
    return samples(text, "kbms_ingest_results_total", provider="intercom", channel=channel, outcome=outcome)


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    for path in ("/internal/conversations/a", "/internal/conversations/b", "/nope", "/nope/deeper?x=1", "/a/b/c"):
        client.get(path)
    client.request("PROPFIND", "/health")
    text = scrape(client)
    detail = {"route": "/internal/conversations/{conversation_id}"}
    assert samples(text, "kbms_http_requests_total", method="GET", status="404", **detail) == 2
    assert samples(text, "kbms_http_requests_total", method="GET", route="unmatched", status="404") == 3
    assert samples(text, "kbms_http_requests_total", method="OTHER", route="/health", status="405") == 1
    assert samples(text, "kbms_http_request_duration_seconds_count", method="GET", **detail) == 2
    assert samples(text, "kbms_http_request_duration_seconds_bucket", method="GET", le="+Inf", **detail) == 2
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "route" in sample.labels
    }
    assert routes == {"/internal/conversations/{conversation_id}", "unmatched", "/health"}  # no raw path


def test_ingest_results_by_channel_and_outcome(client: TestClient) -> None:
    first = intercom_payload("c1")
    assert client.post(PUSH, json=first).status_code == 201
    assert client.post(PUSH, json=first).status_code == 200  # unchanged
    assert (
        client.post(PUSH, json=intercom_payload("c1", updated_at=1_800_000_000, parts=[part("p1")])).status_code == 200
    )
    assert client.post(PUSH, json={"id": "bad"}).status_code == 422  # kept in the ledger as rejected
    assert client.post(PUSH, content=b"{not json").status_code == 400  # nothing kept
    assert client.post(PUSH, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    batch = b"\n".join([dumps(intercom_payload("c2")), dumps(first), b'{"id": "bad"}', b"{not json"])
    assert client.post(BATCH, content=batch, headers=NDJSON).status_code == 200
    text = scrape(client)
    assert [ingested(text, "push", o) for o in ("created", "updated", "unchanged", "rejected")] == [1, 1, 1, 3]
    assert [ingested(text, "batch", o) for o in ("created", "updated", "unchanged", "rejected")] == [1, 0, 1, 2]
    assert samples(text, "kbms_ledger_rejects_total", provider="intercom", channel="push") == 1
    assert samples(text, "kbms_ledger_rejects_total", provider="intercom", channel="batch") == 1
    assert samples(text, "kbms_ingest_results_total", provider="zendesk") == 0  # every series exists, at 0


@pytest.fixture
def hooks(database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def deliver(client: TestClient, body: bytes, *, secret: str = SECRET) -> int:
    response = client.post(HOOK, content=body, headers={"x-hub-signature": sign(body, secret)})
    return response.status_code


def test_webhook_outcomes_and_signature_failures(hooks: TestClient) -> None:
    replied = (INTERCOM / "13_webhook_conversation_operator_replied_2026_zulip.json").read_bytes()
    ping = (INTERCOM / "19_webhook_ping_zulip.json").read_bytes()
    broken = json.loads(replied)
    broken["data"]["item"]["created_at"] = "yesterday"
    assert [deliver(hooks, body) for body in (replied, replied, ping, dumps(broken), b"{")] == [200, 200, 200, 422, 400]
    assert deliver(hooks, replied, secret=canary.secret("wrong")) == 401
    assert hooks.post(HOOK, content=replied).status_code == 401  # unsigned
    text = scrape(hooks)
    outcomes = ("created", "updated", "unchanged", "ignored", "rejected")
    assert [ingested(text, "webhook", o) for o in outcomes] == [1, 0, 1, 1, 2]
    assert samples(text, "kbms_webhook_signature_failures_total", provider="intercom") == 2
    assert samples(text, "kbms_ledger_rejects_total", provider="intercom", channel="webhook") == 2  # both signed


@pytest.mark.anyio
async def test_pool_use_counts_a_held_connection(database_url: str) -> None:
    settings = Settings(database_url=database_url, db_pool_size=3)
    store = open_store(settings)
    try:
        await ingest_push(store, get_provider("intercom"), dumps(intercom_payload()), workspace=None)
        idle = {usage.pool: usage for usage in store.pool_usage()}
        batches = store.export(ALL)
        await batches.__anext__()  # the export's snapshot holds a connection until it is closed
        busy = {usage.pool: usage for usage in store.pool_usage()}
        await batches.aclose()
        after = {usage.pool: usage for usage in store.pool_usage()}
    finally:
        await store.close()
    pool = "postgresql" if "postgresql" in idle else "sqlite_reader"
    assert (idle[pool].in_use, busy[pool].in_use, after[pool].in_use) == (0, 1, 0)
    if pool == "postgresql":
        assert busy[pool].size == 3


@pytest.mark.anyio
async def test_sqlite_reports_writes_queued_behind_the_writer(sqlite_url: str, tmp_path: Path) -> None:
    store = open_store(Settings(database_url=sqlite_url))
    lock = os.open(tmp_path / "kbms.db.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing: the store's commits wait for this lock
        async with anyio.create_task_group() as group:
            for number in range(3):
                body = dumps(intercom_payload(f"q{number}"))
                group.start_soon(partial(ingest_push, store, get_provider("intercom"), body, workspace=None))
            with anyio.fail_after(10):
                while store.pool_usage()[0].waiting < 3:  # noqa: ASYNC110 (nothing signals the queue: polled)
                    await anyio.sleep(0.01)
            [writer, _reader] = store.pool_usage()
            fcntl.flock(lock, fcntl.LOCK_UN)
        [drained, _reader] = store.pool_usage()
    finally:
        os.close(lock)
        await store.close()
    assert (writer.pool, writer.in_use, writer.waiting) == ("sqlite_writer", 1, 3)
    assert (drained.in_use, drained.waiting) == (0, 0)


def test_apps_in_one_process_do_not_share_counts(sqlite_url: str) -> None:
    with TestClient(create_app(Settings(database_url=sqlite_url))) as one:
        one.get("/health")
        one.get("/health")
        with TestClient(create_app(Settings(database_url=sqlite_url))) as other:
            other.get("/health")
            assert samples(scrape(other), "kbms_http_requests_total", route="/health") == 1
        assert samples(scrape(one), "kbms_http_requests_total", route="/health") == 2


def test_the_endpoint_speaks_prometheus_text_and_is_documented(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE kbms_http_requests_total counter" in response.text
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]


# Several workers: each counts into files of the run's directory; any scrape adds them all up.


def per_worker_pushes(directory: Path) -> dict[int, float]:
    """Pushes answered 201, by worker pid, read from each worker's own file."""
    counts: dict[int, float] = {}
    for path in glob.glob(str(directory / "counter_*.db")):
        pid = int(Path(path).stem.rsplit("_", 1)[1])
        counts[pid] = sum(
            sample.value
            for metric in MultiProcessCollector.merge([path], accumulate=False)  # type: ignore[no-untyped-call]
            for sample in metric.samples
            if sample.name == "kbms_http_requests_total" and sample.labels.get("status") == "201"
        )
    return counts


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_every_scrape_adds_up_all_workers(database_url: str, tmp_path: Path) -> None:
    # TMPDIR: the run's metrics directory is created under it, where the test can look.
    server = start_server(database_url, tmp_path / "server.log", env={"TMPDIR": str(tmp_path)}, args=("--workers", "2"))
    try:
        [directory] = [Path(p) for p in glob.glob(str(tmp_path / "kbms-metrics-*"))]
        wait_for(lambda: len(per_worker_pushes(directory)) == 2, "both workers")
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while min(per_worker_pushes(directory).values()) == 0 and sent < 400:  # until both have answered
                bodies = [intercom_payload(f"w{sent + i}") for i in range(40)]
                # A new connection for each request, so that both workers take some.
                statuses = list(
                    pool.map(lambda body: httpx2.post(f"{server.url}{PUSH}", json=body).status_code, bodies)
                )
                assert statuses == [201] * len(bodies)
                sent += len(bodies)
        assert min(per_worker_pushes(directory).values()) > 0
        for _ in range(6):  # whichever worker answers the scrape
            text = httpx2.get(f"{server.url}/metrics", headers={"connection": "close"}).text
            assert samples(text, "kbms_http_requests_total", route=PUSH, status="201") == sent
            assert samples(text, "kbms_ingest_results_total", channel="push", outcome="created") == sent
        pool_name = "postgresql" if database_url.startswith("postgres") else "sqlite_writer"
        one_worker = 10 if pool_name == "postgresql" else 1  # KBMS_DB_POOL_SIZE's default; SQLite: one writer
        assert samples(text, "kbms_db_pool_size", pool=pool_name) == 2 * one_worker

        # A worker killed: uvicorn starts another; the dead one's counts stay, its pool leaves the sums.
        victim = min(per_worker_pushes(directory))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(per_worker_pushes(directory)) == 3, "a replacement worker")
        time.sleep(1.5)  # a sampling period of the new worker
        text = httpx2.get(f"{server.url}/metrics", headers={"connection": "close"}).text
        assert samples(text, "kbms_ingest_results_total", channel="push", outcome="created") == sent
        assert samples(text, "kbms_db_pool_size", pool=pool_name) == 2 * one_worker
    finally:
        server.stop()
    assert not directory.exists()  # removed with the run
