"""Who is looking at a console page, and the headers every console response carries.

A plain ASGI middleware over ``/console`` (like ``kbms.api.auth``'s): it reads the session cookie, asks the
keyring whether its key still exists unrevoked, and hands the page a ``Viewer``, with the key set where the API's
workspace rules read it (``kbms.api.auth.visible_workspaces``), so the console sees exactly what the API shows
that key. A page asked for without a session is a 303 to the sign-in form. With no keys configured (auth off),
every visitor is an anonymous admin with a session of its own, which its forms' CSRF tokens are tied to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, cast
from urllib.parse import quote

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbms.api.auth import STATE_KEY
from kbms.api.console.session import SESSION_COOKIE, Session, Signer
from kbms.auth import ApiKey, Keyring

PREFIX = "/console"
VIEWER = "kbms.console.viewer"
OPEN = ("/console/login", "/console/static/")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class Viewer:
    name: str | None  # the key's; None: auth is off
    key: ApiKey | None
    session: Session
    csrf: str

    @property
    def may_act(self) -> bool:
        return self.key is None or self.key.allows("admin")

    @property
    def workspaces(self) -> frozenset[str] | None:
        return self.key.workspaces if self.key is not None else None


def viewer_of(connection: HTTPConnection) -> Viewer | None:
    state = cast(dict[str, Any], connection.scope.get("state") or {})
    return cast(Viewer | None, state.get(VIEWER))


def session_cookie(value: str, *, scope: Scope, max_age: int, name: str = SESSION_COOKIE) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, only for /console, Secure over https."""
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = PREFIX
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    morsel["max-age"] = max_age
    if scope.get("scheme") == "https":
        morsel["secure"] = True
    return morsel.OutputString()


def is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class ConsoleGuard:
    def __init__(self, app: ASGIApp, *, signer: Signer, keyring: Keyring, ttl: int) -> None:
        self.app = app
        self.signer = signer
        self.keyring = keyring
        self.ttl = ttl

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_console(scope["path"]):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        page = not path.startswith("/console/static/")
        new_cookie: str | None = None
        now = int(time.time())
        session = self.signer.read_session(HTTPConnection(scope).cookies.get(SESSION_COOKIE), now=now)
        viewer: Viewer | None = None
        if not self.keyring:
            if session is None:
                session, value = self.signer.new_session(None, now=now, ttl=self.ttl)
                new_cookie = session_cookie(value, scope=scope, max_age=self.ttl)
            viewer = Viewer(None, None, session, self.signer.csrf(session.sid))
        elif session is not None and session.key_name is not None:
            key = self.keyring.named(session.key_name)
            if key is not None and not key.revoked and key.allows("read"):
                viewer = Viewer(key.name, key, session, self.signer.csrf(session.sid))
        state = scope.setdefault("state", {})
        state[VIEWER] = viewer
        if viewer is not None and viewer.key is not None:
            state[STATE_KEY] = viewer.key

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if page:
                    headers["Cache-Control"] = "no-store"
                if new_cookie is not None and page:
                    headers.append("Set-Cookie", new_cookie)
            await send(message)

        if viewer is None and not path.startswith(OPEN):
            target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
            location = "/console/login?next=" + quote(target, safe="")
            await send_with_headers(
                {"type": "http.response.start", "status": 303, "headers": [(b"location", location.encode())]}
            )
            await send_with_headers({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send_with_headers)
