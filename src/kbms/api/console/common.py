"""What every console route shares: the console's parts, the viewer, a page's context, errors as pages, forms,
and the one-time outcome message an action leaves for the page it redirects to."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl

from fastapi import Request, Response
from jinja2 import Environment

from kbms.api.console.guard import Viewer, session_cookie, viewer_of
from kbms.api.console.session import FLASH_COOKIE, Signer
from kbms.api.console.tally import Tally
from kbms.api.console.views import render
from kbms.api.errors import status_of
from kbms.auth import Keyring
from kbms.errors import Forbidden, KbmsError, ValidationFailed
from kbms.providers import Provider

MAX_FORM_BYTES = 16 * 1024
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Console:
    env: Environment
    signer: Signer
    keyring: Keyring
    ttl: int
    providers: Mapping[str, Provider]
    static: Mapping[str, tuple[bytes, str]]  # file name: (content, media type)
    # The overview's aggregates, kept by the workspaces a viewer may see (tally.py).
    tally: Tally = field(default_factory=Tally)


def console_of(request: Request) -> Console:
    return cast(Console, request.app.state.console)


def viewer(request: Request) -> Viewer:
    """The signed-in viewer (the guard let no page through without one)."""
    who = viewer_of(request)
    if who is None:
        raise Forbidden("Sign in first")
    return who


def base_context(request: Request, title: str, *, active: str | None = None) -> dict[str, Any]:
    return {
        "title": title,
        "heading": title,
        "active": active,
        "viewer": viewer_of(request),
        "has_sources": bool(request.app.state.sources),
        "outcome": None,
    }


def forbidden_workspace(workspace: str) -> Forbidden:
    return Forbidden(f"This API key cannot read workspace {workspace!r}")


def error_page(request: Request, exc: KbmsError) -> Response:
    status, _code = status_of(exc)
    context = base_context(request, "Not found" if status == 404 else "Error" if status >= 500 else "Refused")
    context.update(
        message=exc.message if hasattr(exc, "message") else str(exc),
        issues=exc.issues if isinstance(exc, ValidationFailed) else [],
        back=request.url.path if request.method == "POST" else "/console",
    )
    return render(console_of(request).env, "error.html", context, status=status)


def page(endpoint: Endpoint) -> Endpoint:
    """A console route whose refusals (a bad filter, an unknown conversation, a missing scope) are pages."""

    @functools.wraps(endpoint)
    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except KbmsError as exc:
            return error_page(request, exc)

    return handle


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form body (small: the console's forms hold a token and a few fields); the first of each."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


def checked(request: Request, form: Mapping[str, str], *, act: bool = True) -> Viewer:
    """The viewer, when the form carries its session's CSRF token (and, with ``act``, it may act)."""
    who = viewer(request)
    if not console_of(request).signer.check(who.csrf, form.get("csrf")):
        raise Forbidden("This form has expired or did not come from this console: reload the page and try again")
    if act and not who.may_act:
        raise Forbidden(f"API key {who.name!r} may only look: acting needs the admin scope")
    return who


def set_flash(request: Request, response: Response, text: str) -> Response:
    value = console_of(request).signer.sign(text[:1000])
    response.headers.append("Set-Cookie", session_cookie(value, scope=request.scope, max_age=60, name=FLASH_COOKIE))
    return response


def take_flash(request: Request) -> str | None:
    return console_of(request).signer.unsign(request.cookies.get(FLASH_COOKIE))


def with_flash_taken(request: Request, response: Response) -> Response:
    if FLASH_COOKIE in request.cookies:
        response.headers.append("Set-Cookie", session_cookie("", scope=request.scope, max_age=0, name=FLASH_COOKIE))
    return response
