"""The fake Zendesk's routes (``fake.py`` holds its state and says which documented behaviour each one copies)."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from tests.providers.zendesk.fake import FakeZendesk

EXPORT = "/api/v2/incremental/tickets/cursor"
EXPORT_LIMIT = 10  # requests per minute to the incremental exports ("Rate limits" on the reference page)
WINDOW = 60.0
MAX_EXPORT_PAGE = 1000
MAX_COMMENT_PAGE = 100
RECENT = 60  # "start_time ... must be at least one minute in the past"
UNAUTHENTICATED = {"error": "Couldn't authenticate you"}
NOT_ADMIN = {
    "error": "Forbidden",
    "description": "You do not have access to this page. Please contact the account owner of this help desk.",
}
NOT_FOUND = {"error": "RecordNotFound", "description": "Not found"}
ANONYMOUS = {"id": None, "name": "Anonymous user", "email": None, "role": "end-user"}

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Hit:
    """A request the fake received: when, where, with what query, and how it authenticated (None: it did not)."""

    at: float
    path: str
    query: dict[str, str]
    auth: str | None


@dataclass(frozen=True)
class Fault:
    """An answer to give instead of the real one: a status (5xx, or 429 with ``retry_after``) or a body that is
    not Zendesk's JSON."""

    status: int = 503
    body: bytes = b'{"error":"ServiceUnavailable"}'
    content_type: str = "application/json"
    retry_after: float | None = None


def encode_cursor(generated: int, ticket_id: int) -> str:
    return base64.b64encode(f"{generated}.0||{ticket_id}|".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, int]:
    generated, _, rest = base64.b64decode(cursor, validate=True).decode().partition("||")
    return int(float(generated)), int(rest.rstrip("|"))


def routes(zendesk: FakeZendesk) -> list[Route]:
    def guarded(handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def serve(request: Request) -> Response:
            how = zendesk.authenticate(request)
            zendesk.requests.append(Hit(zendesk.clock.now(), request.url.path, dict(request.query_params), how))
            if how is None:
                return JSONResponse(UNAUTHENTICATED, status_code=401)
            if how != "anonymous" and zendesk.account_used() > zendesk.account_limit:
                wait = math.ceil(WINDOW - zendesk.clock.now() % WINDOW)
                return answer(zendesk, {"error": "TooManyRequests"}, 429, {"Retry-After": str(wait)})
            for index, (prefix, fault) in enumerate(zendesk.faults):
                if request.url.path.startswith(prefix):
                    del zendesk.faults[index]
                    return injected(zendesk, fault)
            return await handler(request, how)

        return serve

    async def export(request: Request, how: str) -> Response:
        if how == "anonymous":
            return JSONResponse(UNAUTHENTICATED, status_code=401)
        if zendesk.role != "admin":
            return answer(zendesk, NOT_ADMIN, 403)
        now = zendesk.clock.now()
        recent = [t for t in zendesk.export_times if t > now - WINDOW]
        if len(recent) >= EXPORT_LIMIT:
            zendesk.export_limited += 1
            wait = math.ceil(min(recent) + WINDOW - now)
            return answer(zendesk, {"error": "APIRateLimitExceeded"}, 429, {"Retry-After": str(max(1, wait))})
        zendesk.export_times.append(now)
        return export_page(zendesk, request)

    async def comments(request: Request, how: str) -> Response:
        if how == "anonymous":
            return JSONResponse(UNAUTHENTICATED, status_code=401)
        ticket = zendesk.tickets.get(request.path_params["ticket_id"])
        if ticket is None or ticket["status"] == "deleted":
            return answer(zendesk, NOT_FOUND, 404)
        return comment_page(zendesk, request, ticket["id"])

    async def show(request: Request, how: str) -> Response:
        if how == "anonymous":
            return JSONResponse(UNAUTHENTICATED, status_code=401)
        ticket = zendesk.tickets.get(request.path_params["ticket_id"])
        if ticket is None or ticket["status"] == "deleted":  # deleted tickets are under /deleted_tickets
            return answer(zendesk, NOT_FOUND, 404)
        return answer(zendesk, {"ticket": {k: v for k, v in ticket.items() if k != "generated_timestamp"}})

    async def me(request: Request, how: str) -> Response:
        user = ANONYMOUS if how == "anonymous" else zendesk.users[zendesk.owner_id]
        return answer(zendesk, {"user": user})

    return [
        Route(path, guarded(endpoint), methods=["GET"])
        for base, endpoint in (
            (EXPORT, export),
            ("/api/v2/tickets/{ticket_id:int}/comments", comments),
            ("/api/v2/tickets/{ticket_id:int}", show),
            ("/api/v2/users/me", me),
        )
        for path in (base, f"{base}.json")  # ".json" is optional throughout the API
    ]


def export_page(zendesk: FakeZendesk, request: Request) -> Response:
    params = request.query_params
    now = zendesk.clock.now()
    first = "cursor" not in params
    try:
        if not first:
            position = decode_cursor(params["cursor"])
        else:
            start = int(params["start_time"])
            if start > now - RECENT:
                description = "Too recent start_time. Use a start_time older than 1 minute"
                return answer(zendesk, {"error": "InvalidValue", "description": description}, 422)
            position = (start, 0)  # ids are positive: every ticket generated at start_time or later
        size = min(int(params.get("per_page", MAX_EXPORT_PAGE)), MAX_EXPORT_PAGE)
    except (KeyError, ValueError, binascii.Error, UnicodeDecodeError):
        return answer(zendesk, {"error": "InvalidValue", "description": "start_time or cursor is invalid"}, 400)
    horizon = int(now) - RECENT  # nothing from the most recent minute
    skip_deleted = params.get("exclude_deleted") == "true"
    stream = sorted(
        (ticket["generated_timestamp"], ticket["id"])
        for ticket in zendesk.tickets.values()
        if ticket["generated_timestamp"] <= horizon and not (skip_deleted and ticket["status"] == "deleted")
    )
    rest = [key for key in stream if key > position]
    page = rest[: max(size, 1)]
    after = encode_cursor(*(page[-1] if page else position))
    before = None if first or not page else encode_cursor(*page[0])
    url = f"{request.base_url}{EXPORT.lstrip('/')}.json?"
    body = {
        "tickets": [zendesk.tickets[ticket_id] for _, ticket_id in page],
        "after_url": url + urlencode({"cursor": after}),
        "after_cursor": after,
        "before_url": None if before is None else url + urlencode({"cursor": before}),
        "before_cursor": before,
        "end_of_stream": len(rest) <= len(page),
    }
    return answer(zendesk, body)


def comment_page(zendesk: FakeZendesk, request: Request, ticket_id: int) -> Response:
    params = request.query_params
    items = zendesk.comments[ticket_id]
    cursor_paged = "page[size]" in params
    try:
        if cursor_paged:
            size = int(params["page[size]"])
            after = int(base64.b64decode(params["page[after]"], validate=True)) if "page[after]" in params else 0
        else:
            number = int(params.get("page", "1"))
    except (ValueError, binascii.Error):
        return answer(zendesk, {"error": "InvalidPaginationParameter", "description": "Invalid page"}, 400)
    url = f"{request.base_url}api/v2/tickets/{ticket_id}/comments.json?"
    include = params.get("include", "")
    if not cursor_paged:  # offset pagination, 100 a page: what a client gets when it asks for no page size
        page = items[(number - 1) * MAX_COMMENT_PAGE : number * MAX_COMMENT_PAGE]
        more = len(items) > number * MAX_COMMENT_PAGE
        body: dict[str, Any] = {
            "comments": page,
            "next_page": url + urlencode({"page": number + 1}) if more else None,
            "previous_page": url + urlencode({"page": number - 1}) if number > 1 else None,
            "count": len(items),
        }
    elif not 0 < size <= MAX_COMMENT_PAGE:
        description = f"page[size] must be between 1 and {MAX_COMMENT_PAGE}"
        return answer(zendesk, {"error": "InvalidPaginationParameter", "description": description}, 400)
    else:
        rest = [comment for comment in items if comment["id"] > after]
        page = rest[:size]
        more = len(rest) > size
        last = base64.b64encode(str(page[-1]["id"]).encode()).decode() if page else None
        first = base64.b64encode(str(page[0]["id"]).encode()).decode() if page else None
        keep = {"page[size]": size, **({"include": include} if include else {})}
        body = {
            "comments": page,
            "meta": {"has_more": more, "after_cursor": last, "before_cursor": first},
            "links": {
                "next": url + urlencode({**keep, "page[after]": last}) if more and last else None,
                "prev": url + urlencode({**keep, "page[before]": first}) if first else None,
            },
        }
    if "users" in include.split(","):
        authors = dict.fromkeys(comment["author_id"] for comment in page)
        body["users"] = [zendesk.users[author] for author in authors if author in zendesk.users]
    return answer(zendesk, body)


def injected(zendesk: FakeZendesk, fault: Fault) -> Response:
    headers = limits(zendesk) | ({} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"})
    return Response(fault.body, status_code=fault.status, media_type=fault.content_type, headers=headers)


def answer(zendesk: FakeZendesk, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=limits(zendesk) | (headers or {}))


def limits(zendesk: FakeZendesk) -> dict[str, str]:
    """The account's budget for the current minute, on every authenticated answer."""
    remaining = max(0, zendesk.account_limit - zendesk.account_used())
    return {"X-Rate-Limit": str(zendesk.account_limit), "X-Rate-Limit-Remaining": str(remaining)}
