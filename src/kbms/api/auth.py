"""API keys at the HTTP edge: which paths need which scope, and who the caller is.

A plain ASGI middleware rather than a FastAPI dependency: it guards every route under a prefix, including ones
added later and unknown paths under it (a 404 would tell a stranger which paths exist), and it costs a dict
lookup per request on the hot routes. With no keys configured it is not installed at all (auth is off).
"""

from __future__ import annotations

import re
from typing import Any, cast

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kbms.api.errors import kbms_error_response
from kbms.auth import KEY_PATTERN, ApiKey, Keyring
from kbms.auth import Scope as KeyScope
from kbms.errors import Forbidden, KbmsError, Unauthenticated

# Longest prefix first. Everything else (/health, /ready, /webhooks/* which providers sign, the OpenAPI document
# and its pages) is open.
PROTECTED: tuple[tuple[str, KeyScope], ...] = (
    ("/internal/sources", "admin"),  # before /internal/: the sync state and its levers are the operator's
    ("/internal/", "read"),
    ("/integrations/", "ingest"),
    ("/metrics", "admin"),
)
BEARER = re.compile(r"^Bearer +(\S+) *$", re.IGNORECASE)
VALID_KEY = re.compile(KEY_PATTERN)
STATE_KEY = "kbms.api_key"
MALFORMED_KEY = "Malformed API key: a kbms key is kbms_ followed by 43 letters, digits, - or _ (kbms keys create)"


def required_scope(path: str) -> KeyScope | None:
    for prefix, scope in PROTECTED:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return scope
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keyring: Keyring) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        try:
            key = self._authorize(scope, needed)
        except KbmsError as exc:
            await kbms_error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = key
        await self.app(scope, receive, send)

    def _authorize(self, scope: Scope, needed: KeyScope) -> ApiKey:
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        if not headers:
            raise Unauthenticated("This endpoint needs an API key: Authorization: Bearer <key>", presented=False)
        # Never echo or log what was sent: it may be a real key pasted in the wrong place.
        # Each refusal says which of these it is, so a newcomer knows whether to fix the header, the copy of the
        # key, or the server's key list: a key that is well-formed but unknown was most likely made for another
        # server, or its entry is missing from KBMS_API_KEYS.
        match = BEARER.match(headers[0].decode("latin-1")) if len(headers) == 1 else None
        if match is None:
            raise Unauthenticated("Malformed Authorization header: expected Bearer <key>", presented=True)
        if VALID_KEY.match(match.group(1)) is None:
            raise Unauthenticated(MALFORMED_KEY, presented=True)
        key = self.keyring.lookup(match.group(1))
        if key is None:
            raise Unauthenticated("Unknown API key: this server has no such key (KBMS_API_KEYS)", presented=True)
        if key.revoked:
            raise Unauthenticated("Revoked API key", presented=True)
        if not key.allows(needed):
            raise Forbidden(f"API key {key.name!r} lacks the {needed!r} scope this endpoint needs")
        return key


def api_key_of(request: Request) -> ApiKey | None:
    """The caller's key; None when auth is off."""
    state = cast(dict[str, Any], request.scope.get("state") or {})
    return cast(ApiKey | None, state.get(STATE_KEY))


def visible_workspaces(request: Request) -> frozenset[str] | None:
    """The workspaces the caller may read or write; None: all of them."""
    key = api_key_of(request)
    return key.workspaces if key is not None else None
