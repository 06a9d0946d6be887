"""The HTTP application. ``create_app(settings)`` builds everything; importing this module builds nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from kbms import __version__
from kbms.api import conversations, health, integrations, metrics, sources, webhooks
from kbms.api.admission import Admission
from kbms.api.auth import ApiKeyMiddleware, required_scope
from kbms.api.console import install_console
from kbms.api.console import router as console_router
from kbms.api.docs import install_docs
from kbms.api.errors import install_error_handlers
from kbms.api.openapi import install_openapi
from kbms.api.telemetry import RequestTelemetry
from kbms.auth import Keyring
from kbms.limits import PayloadLimits
from kbms.process import tune_garbage_collection
from kbms.providers import REGISTRY, Provider
from kbms.settings import Settings
from kbms.storage import Store, database_file, open_store, parse_database_url
from kbms.sync.service import SyncService
from kbms.sync.sources import sources_of

log = logging.getLogger(__name__)

DESCRIPTION = """\
Ingests conversations from support tools, normalizes them into one stable model, stores them durably and serves
them to internal consumers.

Every error has the body `{error_code, message, details}`:

| status | error_code | when |
|---|---|---|
| 400 | invalid_json | the body is not JSON, or not UTF-8, or holds NaN or Infinity (not JSON numbers) |
| 401 | invalid_signature | a webhook without a valid signature (nothing of it is kept) |
| 401 | unauthorized | no API key, or a malformed, unknown or revoked one (with `WWW-Authenticate: Bearer`) |
| 403 | forbidden | the API key lacks the scope, or the workspace, the request needs |
| 404 | not_found | unknown conversation, path or provider |
| 405 | method_not_allowed | a method the path does not have (with an `Allow` header) |
| 408 | request_timeout | the headers or body did not arrive in time (a slow client; the connection is closed) |
| 413 | payload_too_large | the body exceeds the configured limit |
| 415 | unsupported_media_type | a body that is not JSON, or is compressed |
| 431 | headers_too_large | the request line and headers exceed the configured limit |
| 422 | validation_error | details: `[{field, issue, message}]` with dotted field paths |
| 500 | internal_error | a bug (the trace is logged, never returned) |
| 503 | unavailable | the database cannot be used right now, or the service is at capacity; retry after `Retry-After` |
"""


NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Callable[[], datetime] | None = None,
    providers: Mapping[str, Provider] | None = None,
) -> FastAPI:
    """The app. With ``store`` given the caller owns it; otherwise the app opens one at startup and closes it.

    ``clock``: the time webhook signatures are checked against (tests pin it); the system clock by default.
    ``providers``: the providers the app serves, by name (their ingestion and webhook routes, metrics labels,
    payload schemas and the provider filter); the registry (``kbms.providers.REGISTRY``) by default. A test can
    serve a provider of its own with it.
    """
    providers = REGISTRY if providers is None else providers

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warn_about_webhooks(settings, providers)
        app.state.store = store if store is not None else open_store(settings)
        tune_garbage_collection()
        sync = None
        if settings.sync == "on" and app.state.sources:
            # On SQLite one process syncs: the one holding a lock on a file beside the database. On PostgreSQL
            # every worker does, each keeping to its part of each source's ceiling.
            database = database_file(parse_database_url(settings.database_url))
            exclusive = database.with_name(database.name + ".sync-lock") if database is not None else None
            share = 1 if exclusive is not None else settings.workers
            sources = [replace(source, share=share) for source in app.state.sources]
            sync = SyncService(
                app.state.store, sources, providers, interval=settings.sync_interval, exclusive=exclusive
            )
        app.state.sync = sync
        try:
            async with app.state.metrics.sampling(app.state.store), sync.running() if sync else nullcontext():
                yield
        finally:
            app.state.sync = None
            if store is None:
                await app.state.store.close()

    # The documentation pages are kbms's own (kbms.api.docs): FastAPI's load their assets from a public CDN.
    app = FastAPI(
        title="kbms",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # kbms's telemetry is its own (the access log, /metrics): FastAPI's OpenTelemetry hooks, which look for
        # providers on every request and wrap each endpoint in operation spans, are off.
        telemetry=NO_OPENTELEMETRY,
    )
    app.state.settings = settings
    app.state.limits = PayloadLimits.of(settings)
    app.state.clock = clock or (lambda: datetime.now(UTC))
    app.state.provider_filter = conversations.provider_filter(providers)
    # The sources kbms pulls from (KBMS_SOURCES): refused here if unusable (kbms serve checks them first, to say so
    # in one line); synced by the lifespan's SyncService unless KBMS_SYNC=off.
    app.state.sources = sources_of(settings, providers=providers)
    app.state.sync = None
    app.state.metrics = metrics.Metrics(providers, multiprocess_dir=metrics.multiprocess_dir())
    # The last added is the outermost: telemetry sees (and counts, with a request id) what auth refuses.
    keyring = Keyring.configured(settings.api_keys, settings.api_keys_file)
    # The operator console at /console: its own sign-in (a session cookie for an API key) and its own guard; its
    # routes are included last (see below).
    install_console(app, settings, keyring=keyring, providers=providers)
    if keyring:
        app.add_middleware(ApiKeyMiddleware, keyring=keyring)
    # Admission sits inside telemetry (whose cost is small) so that overload refusals are counted and carry a
    # request id, and outside the key check: a refused request costs no key lookup, and nothing but /health and
    # /ready gets past it when the process is full.
    app.add_middleware(
        Admission, capacity=settings.max_in_flight, queued=settings.max_queued, wait=settings.queue_timeout
    )
    ingestion, reads = integrations.router(providers.values()), conversations.router(providers)
    routers = (health.router, metrics.router, ingestion, webhooks.router(providers.values()), reads, sources.router)
    # What no route answered (a refused key, a 503) is labelled with the template its path matches, among the app's
    # own routes (the documentation pages, mounts) and the routers' (read on first need, when all are in place). The
    # routers are listed apart because this FastAPI keeps each included router as one entry of app.routes.
    app.add_middleware(
        RequestTelemetry,
        metrics=app.state.metrics,
        routes=lambda: [*app.routes, *(route for router in routers for route in router.routes)],
    )
    install_error_handlers(app)
    # A request is matched against the routes in order, and this FastAPI tries every route of an included router
    # before the next one, whatever its prefix: the busiest routers go first and the console's (14 routes) last.
    # Matching a detail read went from 36 to 4 us, an ingestion from 24 to 9 (the console had come first).
    # The document still lists the paths in ``routers``' order.
    busiest = (reads, ingestion)
    for router in (*busiest, *(router for router in routers if router not in busiest)):
        app.include_router(router)
    install_docs(app)
    app.include_router(console_router())
    install_openapi(
        app,
        (provider.push_schema for provider in providers.values()),
        protected=required_scope,
        order=routers,
    )
    return app


def _warn_about_webhooks(settings: Settings, providers: Mapping[str, Provider]) -> None:
    if settings.allow_unsigned_webhooks:
        log.warning("KBMS_ALLOW_UNSIGNED_WEBHOOKS is on: webhooks are accepted WITHOUT signatures. Local testing only.")
        return
    for provider in providers.values():
        if provider.webhooks is not None and not settings.secret(provider.webhooks.secret_variable):
            log.warning(
                "%s is not set: every %s webhook will be refused (401)",
                provider.webhooks.secret_variable,
                provider.name,
            )


def create_app_from_environment() -> FastAPI:
    """For ``kbms serve --workers N``: each worker process builds its app from the ``KBMS_*`` variables."""
    from kbms.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


__all__ = ["create_app", "create_app_from_environment"]
