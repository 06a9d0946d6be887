"""The operator console (issue 16): server-rendered pages at ``/console`` to watch, search and repair.

Plain HTML forms and one small script of its own (times in the viewer's timezone); every asset served from this
package, nothing from a CDN. It is an HTTP edge like the API: it reads through the ``Store`` interface and acts
through the use cases (``kbms.reprocess``, the sync service). Signed in with an API key (``guard``,
``session``); a key sees and may do in the console what it may through the API.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from fastapi import APIRouter, FastAPI

from kbms.api.console import actions, pages
from kbms.api.console.common import Console, page
from kbms.api.console.guard import ConsoleGuard
from kbms.api.console.session import Signer
from kbms.api.console.views import HERE, environment
from kbms.auth import Keyring
from kbms.providers import Provider
from kbms.settings import Settings

STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}


def router() -> APIRouter:
    routes = APIRouter(prefix="/console", include_in_schema=False)
    for path, endpoint in (
        ("", pages.overview),
        ("/conversations", pages.conversations),
        ("/conversations/{conversation_id}", pages.conversation),
        ("/rejects", pages.rejects),
        ("/sources", pages.sources),
        ("/login", actions.login_form),
        ("/static/{name}", actions.static),
    ):
        routes.add_api_route(path, page(endpoint), methods=["GET"])
    for path, endpoint in (
        ("/login", actions.login),
        ("/logout", actions.logout),
        ("/rejects/reprocess", actions.reprocess_one),
        ("/rejects/reprocess-all", actions.reprocess_since),
        ("/sources/{provider}/{workspace}/sync", actions.sync_now),
        ("/sources/{provider}/{workspace}/retry", actions.retry),
    ):
        routes.add_api_route(path, page(endpoint), methods=["POST"])
    routes.add_api_route("/{rest:path}", page(pages.unknown), methods=["GET", "POST"])
    return routes


def install_console(app: FastAPI, settings: Settings, *, keyring: Keyring, providers: Mapping[str, Provider]) -> None:
    """Make ``app`` ready to serve the console: its state, and the guard over ``/console`` (add it before the
    middleware that must see console requests first); its routes are ``router()``, to include after the others.
    Without ``KBMS_CONSOLE_SECRET``, a secret of this app's own: its sessions end with it (``kbms serve`` makes one
    secret for all its workers)."""
    secret = settings.console_secret.encode() or secrets.token_bytes(32)
    signer = Signer(secret)
    app.state.console = Console(
        env=environment(),
        signer=signer,
        keyring=keyring,
        ttl=settings.console_session_ttl,
        providers=providers,
        static={name: ((HERE / "static" / name).read_bytes(), media) for name, media in STATIC.items()},
    )
    app.state.providers = providers
    app.add_middleware(ConsoleGuard, signer=signer, keyring=keyring, ttl=settings.console_session_ttl)


__all__ = ["install_console", "router"]
