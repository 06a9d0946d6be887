"""The HTTP application. ``create_app(settings)`` builds everything; importing this module builds nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kbms import __version__
from kbms.api import conversations, health, integrations
from kbms.api.errors import install_error_handlers
from kbms.api.openapi import install_openapi
from kbms.providers import REGISTRY
from kbms.settings import Settings
from kbms.storage import Store, open_store

DESCRIPTION = """\
Ingests conversations from support tools, normalizes them into one stable model, stores them durably and serves
them to internal consumers. Every error body is `{error_code, message, details}`.
"""


def create_app(settings: Settings, *, store: Store | None = None) -> FastAPI:
    """The app. With ``store`` given the caller owns it; otherwise the app opens one at startup and closes it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store if store is not None else open_store(settings.database_url)
        try:
            yield
        finally:
            if store is None:
                await app.state.store.close()

    app = FastAPI(title="kbms", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(integrations.router(REGISTRY.values()))
    app.include_router(conversations.router)
    install_openapi(app, (provider.push_schema for provider in REGISTRY.values()))
    return app


__all__ = ["create_app"]
