"""``GET /metrics`` (Prometheus text), and the ``Metrics`` kbms counts into.

One ``Metrics`` per app (``app.state.metrics``), built by ``create_app``: no global registry, so apps built in one
process (tests) never share counts. Under ``kbms serve --workers N`` each worker counts into memory-mapped files in
a directory the serve command creates for the run and removes after it (``kbms/workers.py``), and a scrape, whichever
worker answers it, adds up every worker's files: prometheus-client's multiprocess mode, chosen by
``PROMETHEUS_MULTIPROC_DIR`` as that library requires. Gauges of the database pools are summed over live workers;
each worker samples its own every second, and a scrape drops the samples of workers that died.

Labels are bounded whatever clients send: routes are templates (``/internal/conversations/{conversation_id}``, and
``unmatched`` for paths no route knows), methods a fixed set, providers the registry's, statuses HTTP's.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
from collections.abc import AsyncIterator, Iterable
from typing import Literal, cast

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from kbms.api.sync_metrics import SyncCollector
from kbms.errors import ClientDisconnected, InputError, InvalidSignature, StorageUnavailable
from kbms.storage.base import Store

Channel = Literal["push", "batch", "webhook"]
Outcome = Literal["created", "updated", "unchanged", "ignored", "rejected"]
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# From a redelivery answered from the ledger (well under a millisecond) to a big batch or a slow database.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAMPLE_SECONDS = 1.0


class Metrics:
    """The collectors of one app. The per-request methods cost about a microsecond: label children are cached."""

    def __init__(self, providers: Iterable[str], *, multiprocess_dir: str | None = None) -> None:
        # Without this, every counter and histogram also exports a `_created` gauge per series (the time it was
        # first used): twice the series for Prometheus to store, and nothing kbms's dashboards need. A process-wide
        # switch of the library, set to the same value by every app.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        # In multiprocess mode the values live in the files; the registry of a scrape reads them (render).
        into = None if multiprocess_dir else self.registry
        self._requests = Counter(
            "kbms_http_requests", "HTTP requests answered", ("method", "route", "status"), registry=into
        )
        self._latency = Histogram(
            "kbms_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=into,
        )
        self._ingested = Counter(
            "kbms_ingest_results",
            "Payloads ingested, by outcome: each push, each batch line, each signed webhook",
            ("provider", "channel", "outcome"),
            registry=into,
        )
        self._signature_failures = Counter(
            "kbms_webhook_signature_failures",
            "Webhooks refused for a missing or wrong signature",
            ("provider",),
            registry=into,
        )
        self._ledger_rejects = Counter(
            "kbms_ledger_rejects",
            "Refused payloads kept in the ledger as rejected (kbms reprocess may re-derive them)",
            ("provider", "channel"),
            registry=into,
        )
        pool = ("pool",)
        self._pool_in_use = Gauge(
            "kbms_db_pool_in_use", "Database connections in use", pool, multiprocess_mode="livesum", registry=into
        )
        self._pool_size = Gauge(
            "kbms_db_pool_size",
            "Database connections the pools may hold",
            pool,
            multiprocess_mode="livesum",
            registry=into,
        )
        self._pool_waiting = Gauge(
            "kbms_db_pool_waiting",
            "Callers waiting for a connection (SQLite writer: writes queued for the next commit)",
            pool,
            multiprocess_mode="livesum",
            registry=into,
        )
        # The sync state: read from the database at each scrape (see kbms.api.sync_metrics), not summed per worker.
        self.sync = SyncCollector()
        if into is not None:
            into.register(self.sync)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._ingest_children: dict[tuple[str, Channel, Outcome], Counter] = {}
        for provider in providers:  # every series exists from the start, at 0: rate() needs a first sample
            channels: tuple[tuple[Channel, tuple[Outcome, ...]], ...] = (
                ("push", PUSHED),
                ("batch", PUSHED),
                ("webhook", DELIVERED),
            )
            for channel, outcomes in channels:
                for outcome in outcomes:
                    self.ingested(provider, channel, outcome, 0)
                self._ledger_rejects.labels(provider, channel)
            self._signature_failures.labels(provider)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._request_children.get((method, route, status))
        if children is None:
            children = (self._requests.labels(method, route, str(status)), self._latency.labels(method, route))
            self._request_children[(method, route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def ingested(self, provider: str, channel: Channel, outcome: Outcome, count: int = 1) -> None:
        child = self._ingest_children.get((provider, channel, outcome))
        if child is None:
            child = self._ingest_children[(provider, channel, outcome)] = self._ingested.labels(
                provider, channel, outcome
            )
        child.inc(count)

    def refused(self, provider: str, channel: Channel, exc: InputError, *, kept: bool = False) -> None:
        """Count a payload kbms refused: a forged webhook, or a rejection (``kept`` in the ledger or not)."""
        if isinstance(exc, InvalidSignature):
            self._signature_failures.labels(provider).inc()
        elif not isinstance(exc, ClientDisconnected):  # nobody is left to hear the answer: not a payload's fate
            self.ingested(provider, channel, "rejected")
            if kept:
                self.kept(provider, channel)

    def kept(self, provider: str, channel: Channel, count: int = 1) -> None:
        """Count refused payloads that were kept in the ledger as rejected."""
        if count:
            self._ledger_rejects.labels(provider, channel).inc(count)

    def sample(self, store: Store) -> None:
        for usage in store.pool_usage():
            self._pool_in_use.labels(usage.pool).set(usage.in_use)
            self._pool_size.labels(usage.pool).set(usage.size)
            self._pool_waiting.labels(usage.pool).set(usage.waiting)

    @contextlib.asynccontextmanager
    async def sampling(self, store: Store) -> AsyncIterator[None]:
        """While the app runs. In multiprocess mode a scrape reads every worker's files, not this worker's pool:
        each worker writes its pool gauges there every second."""
        if self.multiprocess_dir is None:
            yield
            return
        directory = self.multiprocess_dir

        async def sample_forever() -> None:
            while True:
                self.sample(store)
                await asyncio.sleep(SAMPLE_SECONDS)

        task = asyncio.create_task(sample_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]  # its gauges leave the sums

    def render(self) -> bytes:
        """The exposition text (blocking: in multiprocess mode it reads every worker's files)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        _forget_dead_workers(self.multiprocess_dir)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self.sync)
        return generate_latest(registry)


PUSHED: tuple[Outcome, ...] = ("created", "updated", "unchanged", "rejected")
DELIVERED: tuple[Outcome, ...] = ("created", "updated", "unchanged", "ignored", "rejected")


def _forget_dead_workers(directory: str) -> None:
    """Remove the gauge samples of workers that are gone (killed, or replaced by uvicorn): counters stay."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = os.path.basename(path).rsplit("_", 1)[-1].removesuffix(".db")
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def metrics_of(request: Request) -> Metrics:
    return cast(Metrics, request.app.state.metrics)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when ``kbms serve --workers N`` set one up for this process."""
    return os.environ.get(MULTIPROCESS_DIR) or None


# Who may read the metrics: a key with the `admin` scope, checked with every other path in kbms.api.auth.
router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests by route and status, latencies, ingest results, signature failures, ledger rejects, "
    "database pool use and each source's sync state, in the Prometheus text format; summed over all worker processes.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    collected = metrics_of(request)
    store = cast(Store, request.app.state.store)
    collected.sample(store)
    # While the database is down the sync series stay as last read: the others (the pools above all) matter most then.
    with contextlib.suppress(StorageUnavailable):
        collected.sync.update(await store.sync_states())
    body = await anyio.to_thread.run_sync(collected.render)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
