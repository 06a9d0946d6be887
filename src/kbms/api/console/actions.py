"""The console's forms (POST) and sign-in: each checks the session's CSRF token, and acting needs the admin scope.
After an action, a 303 back to its page, which shows the outcome once (``common.set_flash``)."""

from __future__ import annotations

import re
import secrets
import time

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from kbms.api.auth import VALID_KEY
from kbms.api.bounds import TIME
from kbms.api.console.common import (
    base_context,
    checked,
    console_of,
    forbidden_workspace,
    form_of,
    set_flash,
    viewer,
)
from kbms.api.console.guard import session_cookie
from kbms.api.console.session import LOGIN_COOKIE, LOGIN_TTL, SESSION_COOKIE
from kbms.api.console.views import render
from kbms.api.lean import store_of
from kbms.errors import FieldIssue, Forbidden, NotFound, ValidationFailed
from kbms.lifecycle import ACCEPTED
from kbms.model import micros
from kbms.reprocess import reprocess, reprocess_delivery

# Only a console path may be where sign-in leads: anything else (another host, //host, a backslash) is an open
# redirect.
SAFE_NEXT = re.compile(r"/console(?:[/?][^\\\s]*)?")
ROW_NUMBER = re.compile(r"[0-9]{1,18}")  # a ledger row: within a BIGINT, whatever was sent
REFUSED = "That key was not accepted: it is not a key of this server, it was revoked, or it may not read."


def safe_next(value: str | None) -> str:
    return value if value and SAFE_NEXT.fullmatch(value) and not value.startswith("/console//") else "/console"


def see_other(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303)


async def login_form(request: Request) -> Response:
    console = console_of(request)
    if not console.keyring:
        return see_other("/console")
    return _login_page(request, next_=safe_next(request.query_params.get("next")))


def _login_page(request: Request, *, next_: str, refused: str | None = None, status: int = 200) -> Response:
    console = console_of(request)
    nonce = secrets.token_urlsafe(16)
    context = base_context(request, "Sign in")
    context.update(csrf=console.signer.login_csrf(nonce), next=next_, refused=refused)
    response = render(console.env, "login.html", context, status=status)
    response.headers.append(
        "Set-Cookie", session_cookie(nonce, scope=request.scope, max_age=LOGIN_TTL, name=LOGIN_COOKIE)
    )
    return response


async def login(request: Request) -> Response:
    console = console_of(request)
    form = await form_of(request)
    nonce = request.cookies.get(LOGIN_COOKIE)
    if nonce is None or not console.signer.check(console.signer.login_csrf(nonce), form.get("csrf")):
        raise Forbidden("This sign-in form has expired or did not come from this console: reload it and try again")
    next_ = safe_next(form.get("next"))
    if not console.keyring:
        return see_other(next_)
    token = form.get("key", "").strip()
    # Never echoed, logged or kept: only its hash is looked up.
    key = console.keyring.lookup(token) if VALID_KEY.match(token) else None
    if key is None or key.revoked or not key.allows("read"):
        return _login_page(request, next_=next_, refused=REFUSED, status=401)
    _session, value = console.signer.new_session(key.name, now=int(time.time()), ttl=console.ttl)
    response = see_other(next_)
    response.headers.append("Set-Cookie", session_cookie(value, scope=request.scope, max_age=console.ttl))
    response.headers.append("Set-Cookie", session_cookie("", scope=request.scope, max_age=0, name=LOGIN_COOKIE))
    return response


async def logout(request: Request) -> Response:
    checked(request, await form_of(request), act=False)
    response = see_other("/console/login" if console_of(request).keyring else "/console")
    response.headers.append("Set-Cookie", session_cookie("", scope=request.scope, max_age=0, name=SESSION_COOKIE))
    return response


async def reprocess_one(request: Request) -> Response:
    form = await form_of(request)
    who = checked(request, form)
    text = form.get("delivery", "")
    if ROW_NUMBER.fullmatch(text) is None:
        raise ValidationFailed([FieldIssue("delivery", "int_parsing", "A ledger row number")], message="Bad delivery")
    store = store_of(request)
    entry = await store.ledger_entry(int(text))
    if entry is None or (who.workspaces is not None and entry.workspace not in who.workspaces):
        raise NotFound("No such delivery")
    done = await reprocess_delivery(store, entry.pk, providers=console_of(request).providers)
    if done is None:
        raise NotFound("No such delivery")
    if done.outcome in ACCEPTED:
        message = f"1 delivery reprocessed: accepted ({done.outcome})"
    elif done.outcome == "ignored":
        message = "1 delivery reprocessed: ignored (nothing in it to store)"
    else:
        message = f"1 delivery reprocessed: still rejected: {done.error}"
    return set_flash(request, see_other("/console/rejects"), message)


async def reprocess_since(request: Request) -> Response:
    form = await form_of(request)
    who = checked(request, form)
    if who.workspaces is not None:
        # kbms reprocess re-reads every workspace's deliveries: a limited key reprocesses its own one by one.
        raise Forbidden(f"API key {who.name!r} is limited to some workspaces: reprocess its rejects one by one")
    try:
        since = TIME.validate_python(form.get("since", ""))
    except ValidationError as exc:
        issues = [FieldIssue("since", error["type"], error["msg"]) for error in exc.errors(include_url=False)]
        raise ValidationFailed(issues, message="Bad time") from None
    report = await reprocess(store_of(request), providers=console_of(request).providers, since=micros(since))
    left = await store_of(request).rejected_deliveries(since=micros(since), limit=1001)
    remaining = "over 1,000" if len(left) > 1000 else f"{len(left):,}"
    message = (
        f"Reprocessed deliveries since {since:%Y-%m-%d %H:%M:%S} UTC: {report.conversations:,} conversations "
        f"re-derived ({report.changed:,} changed), {report.deliveries_reclassified:,} deliveries reclassified; "
        f"{remaining} still rejected"
    )
    return set_flash(request, see_other("/console/rejects"), message)


def _source_of(request: Request) -> tuple[str, str]:
    provider, workspace = request.path_params["provider"], request.path_params["workspace"]
    who = viewer(request)
    if who.workspaces is not None and workspace not in who.workspaces:
        raise forbidden_workspace(workspace)
    for source in request.app.state.sources:
        if (source.provider, source.workspace) == (provider, workspace):
            return provider, workspace
    raise NotFound("No such source is configured")


async def sync_now(request: Request) -> Response:
    checked(request, await form_of(request))
    provider, workspace = _source_of(request)
    service = request.app.state.sync
    if service is None or not service.sweep(provider, workspace):
        message = f"{provider}/{workspace}: syncing is off in this process (KBMS_SYNC=off): start a pass with kbms sync"
    else:
        message = f"{provider}/{workspace}: a pass has started"
    return set_flash(request, see_other("/console/sources"), message)


async def retry(request: Request) -> Response:
    checked(request, await form_of(request))
    provider, workspace = _source_of(request)
    retried = await store_of(request).retry_dead_letters(provider, workspace)
    if retried and request.app.state.sync is not None:
        request.app.state.sync.wake(provider, workspace)
    return set_flash(
        request, see_other("/console/sources"), f"{provider}/{workspace}: {retried} dead letters queued again"
    )


async def static(request: Request) -> Response:
    found = console_of(request).static.get(request.path_params["name"])
    if found is None:
        raise NotFound("No such file")
    content, media_type = found
    return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
