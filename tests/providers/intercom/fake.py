"""A fake Intercom REST API (2.16), written from Intercom's OpenAPI description
(``/work/shared/reference/intercom/api.intercom.io.2.16.yaml``, "SPEC"), for the pull client's tests.

What it serves, with the shapes the SPEC gives:
- ``GET /me``: an ``admin`` with its ``app`` (``id_code``: the workspace; SPEC L13-56);
- ``POST /conversations/search``: a ``conversation.list`` of list items (no parts), ``pages`` with
  ``next.starting_after`` while more follow; filters on ``id``/``created_at``/``updated_at`` with ``= != > < IN NIN``
  nested in AND/OR; ``sort`` honoured when asked (``honour_sort``); ``per_page`` default 20, at most 150;
- ``GET /conversations/{id}``: the ``conversation`` with ``conversation_parts`` = its 500 newest parts and their
  ``total_count``; ``404 not_found`` for one it does not hold;
- errors as ``error.list``: 401 ``unauthorized`` for a wrong token (without rate-limit headers, as Intercom),
  429 ``rate_limit_exceeded`` past ``limit`` requests in a 10-second window, 400 ``parameter_invalid``.

Every authenticated answer carries ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (a unix time, the end of the
window) and a ``Date``, on the clock it is given (a test's ``VirtualClock``). What a test can do: put, update and
delete conversations, spend budget as another client would (``spend``), inject faults (``inject``: once each, in
order; ``outage``: every request) and count what was asked and answered (``hits``, ``windows``). ``app`` is a plain
ASGI app: ``fake.transport()`` serves it in process (with the faults a network makes: timeouts, resets), and it can
be served by uvicorn as it is.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import canary

PART_CAP = 500  # "we will return the 500 most recent conversation parts" (SPEC L10994)
NETWORK_FAULTS = {"timeout": httpx2.ReadTimeout, "reset": httpx2.RemoteProtocolError, "refused": httpx2.ConnectError}
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Hit:
    at: float
    method: str
    path: str
    status: int  # 0: a network fault, no answer


@dataclass(slots=True)
class Window:
    served: int = 0  # requests counted against the budget
    limited: int = 0  # 429s


def conversation(
    conversation_id: str, *, updated_at: int, created_at: int | None = None, parts: int = 1
) -> dict[str, Any]:
    """A 2.16 conversation as a retrieve gives it (``conversation`` schema), with ``parts`` comment parts."""
    created = created_at if created_at is not None else updated_at
    return {
        "type": "conversation",
        "id": conversation_id,
        "created_at": created,
        "updated_at": updated_at,
        "source": {
            "type": "conversation",
            "id": f"{conversation_id}-m0",
            "delivered_as": "customer_initiated",
            "subject": "",
            "body": "<p>Hello</p>",
            "author": {"type": "user", "id": "u1", "name": "Ana", "email": "ana@example.com"},
            "attachments": [],
            "url": None,
            "redacted": False,
        },
        "contacts": {"type": "contact.list", "contacts": [{"type": "contact", "id": "u1", "external_id": None}]},
        "open": True,
        "state": "open",
        "tags": {"type": "tag.list", "tags": []},
        "statistics": {"type": "conversation_statistics", "count_conversation_parts": parts + 1},
        "conversation_parts": {
            "type": "conversation_part.list",
            "conversation_parts": [_part(conversation_id, i, created + i) for i in range(1, parts + 1)],
            "total_count": parts,
        },
    }


def _part(conversation_id: str, number: int, at: int) -> dict[str, Any]:
    return {
        "type": "conversation_part",
        "id": f"{conversation_id}-p{number}",
        "part_type": "comment",
        "body": f"<p>Reply {number}</p>",
        "created_at": at,
        "updated_at": at,
        "notified_at": at,
        "author": {"type": "admin", "id": "a1", "name": "Ben", "email": "ben@example.com"},
        "attachments": [],
        "redacted": False,
    }


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "error.list", "request_id": "fake-request", "errors": [{"code": code, "message": message}]}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class FakeIntercom:
    clock: Callable[[], float] = time.time
    token: str = f"fake-intercom-token-{canary.TAG}"  # a canary: the suite fails if a log line shows it
    app_id: str = "fakeapp"
    limit: int = 167  # requests per window: Intercom's example, 1,000 a minute
    window: float = 10.0
    honour_sort: bool = True
    gt_inclusive: bool = False  # ">" as "greater or equal", as documented; False: the stricter reading
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    windows: dict[int, Window] = field(default_factory=dict)
    faults: deque[str] = field(default_factory=deque)
    outage: str | None = None  # a fault every request meets, until cleared
    hang_seconds: float = 60.0  # how late a "hang" answers (real time: for a fake served by uvicorn)
    app: Starlette = field(init=False)

    def __post_init__(self) -> None:
        self.app = fake_app(self)

    def put(self, item: dict[str, Any]) -> None:
        self.conversations[str(item["id"])] = item

    def add(self, conversation_id: str, *, updated_at: int, parts: int = 1, created_at: int | None = None) -> None:
        self.put(conversation(conversation_id, updated_at=updated_at, created_at=created_at, parts=parts))

    def update(self, conversation_id: str, *, updated_at: int, new_parts: int = 1) -> None:
        """A reply: ``new_parts`` more parts, and ``updated_at`` moves."""
        item = self.conversations[conversation_id]
        parts = item["conversation_parts"]
        for _ in range(new_parts):
            parts["conversation_parts"].append(_part(conversation_id, len(parts["conversation_parts"]) + 1, updated_at))
        parts["total_count"] = len(parts["conversation_parts"])
        item["statistics"]["count_conversation_parts"] = parts["total_count"] + 1
        item["updated_at"] = updated_at

    def delete(self, conversation_id: str) -> None:
        del self.conversations[conversation_id]

    def inject(self, *faults: str) -> None:
        """Faults the next requests meet, one each: "500", "503" (any 5xx), "garbage" (a 200 of HTML), "wrong"
        (a 200 of JSON that is not the API's), "hang" (an answer ``hang_seconds`` late: a read timeout when served
        by uvicorn), and, through ``transport()``, the network's "timeout", "reset", "refused"."""
        self.faults.extend(faults)

    def spend(self, requests: int) -> None:
        """Another client of the same app uses ``requests`` of the current window."""
        self.current_window().served += requests

    def transport(self) -> httpx2.AsyncBaseTransport:
        return _Network(self)

    def window_of(self, at: float) -> int:
        return math.floor(at / self.window)

    def current_window(self) -> Window:
        return self.windows.setdefault(self.window_of(self.clock()), Window())

    def next_fault(self) -> str | None:
        return self.faults.popleft() if self.faults else self.outage

    def retrieved(self) -> Counter[str]:
        """How many times each conversation was retrieved (``GET /conversations/{id}``)."""
        paths = [hit.path for hit in self.hits if hit.method == "GET" and "/conversations/" in hit.path]
        return Counter(path.rsplit("/", 1)[1] for path in paths)

    def messages(self) -> dict[str, int]:
        """Each conversation's messages as kbms stores them: the opening one and a comment per part."""
        items = self.conversations.items()
        return {key: 1 + len(item["conversation_parts"]["conversation_parts"]) for key, item in items}

    def webhook(self, conversation_id: str, notification_id: str) -> bytes:
        """A ``conversation.admin.replied`` about it, carrying only its newest part, as Intercom sends them."""
        item = json.loads(json.dumps(self.conversations[conversation_id]))
        parts = item["conversation_parts"]
        parts["conversation_parts"] = parts["conversation_parts"][-1:]
        parts["total_count"] = len(parts["conversation_parts"])  # a webhook counts the parts it carries
        notification = {
            "type": "notification_event",
            "app_id": self.app_id,
            "id": notification_id,
            "topic": "conversation.admin.replied",
            "data": {"type": "notification_event_data", "item": item},
        }
        return json.dumps(notification).encode()


class _Network(httpx2.AsyncBaseTransport):
    """The fake served in process, plus the faults of a network between: a timeout, a reset, a refusal."""

    def __init__(self, fake: FakeIntercom) -> None:
        self.fake = fake
        self.asgi = httpx2.ASGITransport(app=fake.app)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        fault = self.fake.faults[0] if self.fake.faults else self.fake.outage
        if fault in NETWORK_FAULTS:
            self.fake.next_fault()
            self.fake.hits.append(Hit(self.fake.clock(), request.method, request.url.path, 0))
            raise NETWORK_FAULTS[fault](f"fake {fault}", request=request)
        return await self.asgi.handle_async_request(request)


def fake_app(fake: FakeIntercom) -> Starlette:
    """The ASGI app answering for ``fake``."""

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            response = await _guard(fake, request, handler)
            fake.hits.append(Hit(fake.clock(), request.method, request.url.path, response.status_code))
            return response

        return endpoint

    return Starlette(
        routes=[
            Route("/me", guarded(lambda request: _me(fake)), methods=["GET"]),
            Route("/conversations/search", guarded(lambda request: _search(fake, request)), methods=["POST"]),
            Route(
                "/conversations/{conversation_id}", guarded(lambda request: _retrieve(fake, request)), methods=["GET"]
            ),
        ]
    )


async def _guard(fake: FakeIntercom, request: Request, handler: Handler) -> Response:
    if request.headers.get("authorization") != f"Bearer {fake.token}":
        return _error(401, "unauthorized", "Access Token Invalid")  # no rate-limit headers: not a known app
    now = fake.clock()
    window = fake.current_window()
    reset = (fake.window_of(now) + 1) * fake.window
    headers = {"date": email.utils.formatdate(now, usegmt=True), "x-ratelimit-limit": str(fake.limit)}
    headers["x-ratelimit-reset"] = str(int(reset))
    if window.served >= fake.limit:
        window.limited += 1
        headers["x-ratelimit-remaining"] = "0"
        seconds = f"{fake.window:g}_seconds"
        return _error(429, "rate_limit_exceeded", f"Exceeded rate limit of {fake.limit} in {seconds}", headers)
    window.served += 1
    headers["x-ratelimit-remaining"] = str(fake.limit - window.served)
    fault = fake.next_fault()
    if fault is not None and fault.isdigit():
        response: Response = _error(int(fault), "server_error", "Something went wrong on our end")
    elif fault == "garbage":
        response = Response("<html><body>Welcome to the hotel network</body></html>", media_type="text/html")
    elif fault == "hang":
        await asyncio.sleep(fake.hang_seconds)
        response = await handler(request)
    elif fault == "wrong":
        response = JSONResponse({"type": "something.else", "hello": "world"})
    else:
        response = await handler(request)
    response.headers.update(headers)
    return response


async def _me(fake: FakeIntercom) -> Response:
    app = {"type": "app", "id_code": fake.app_id, "name": "Fake app", "region": "US", "timezone": "UTC"}
    return JSONResponse({"type": "admin", "id": "991267459", "email": "admin@example.com", "app": app})


async def _retrieve(fake: FakeIntercom, request: Request) -> Response:
    item = fake.conversations.get(request.path_params["conversation_id"])
    if item is None:
        return _error(404, "not_found", "Resource Not Found")
    parts = item["conversation_parts"]
    capped = {**parts, "conversation_parts": parts["conversation_parts"][-PART_CAP:]}
    return JSONResponse({**item, "conversation_parts": capped})


async def _search(fake: FakeIntercom, request: Request) -> Response:
    try:
        body = json.loads(await request.body())
        query = body["query"]
        pagination = body.get("pagination") or {}
        per_page = int(pagination.get("per_page", 20))
        after = _decode(pagination["starting_after"]) if pagination.get("starting_after") else None
        found = [item for item in fake.conversations.values() if _matches(fake, item, query)]
    except (ValueError, KeyError, TypeError):
        return _error(400, "parameter_invalid", "Invalid query")
    if not 1 <= per_page <= 150:
        return _error(400, "parameter_invalid", "per_page must be between 1 and 150")
    sort = body.get("sort") or {}
    if fake.honour_sort and sort.get("field") == "updated_at" and sort.get("order") == "ascending":
        found.sort(key=lambda item: (item["updated_at"], item["id"]))
    else:
        found.sort(key=lambda item: item["id"])  # its own order: by id
    key = _key(fake, body)
    rest = [item for item in found if after is None or key(item) > tuple(after)]
    page, more = rest[:per_page], len(rest) > per_page
    number = (len(found) - len(rest)) // per_page + 1
    pages: dict[str, Any] = {"type": "pages", "page": number, "per_page": per_page}
    pages["total_pages"] = max(1, math.ceil(len(found) / per_page))
    if more:
        pages["next"] = {"per_page": per_page, "starting_after": _encode(list(key(page[-1])))}
    items = [{k: v for k, v in item.items() if k != "conversation_parts"} for item in page]
    return JSONResponse(
        {"type": "conversation.list", "pages": pages, "total_count": len(found), "conversations": items}
    )


def _key(fake: FakeIntercom, body: dict[str, Any]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    sort = body.get("sort") or {}
    if fake.honour_sort and sort.get("field") == "updated_at" and sort.get("order") == "ascending":
        return lambda item: (item["updated_at"], item["id"])
    return lambda item: (item["id"],)


def _matches(fake: FakeIntercom, item: dict[str, Any], query: dict[str, Any]) -> bool:
    operator: str = query["operator"]
    if operator in ("AND", "OR"):
        results = [_matches(fake, item, sub) for sub in query["value"]]
        return all(results) if operator == "AND" else any(results)
    field_, value = query["field"], query["value"]
    have = item[field_]
    if field_ in ("created_at", "updated_at"):
        value = [int(v) for v in value] if isinstance(value, list) else int(value)
    else:
        value = [str(v) for v in value] if isinstance(value, list) else str(value)
    if operator == ">":
        return bool(have >= value if fake.gt_inclusive else have > value)
    if operator == "<":
        return bool(have < value)
    if operator in ("=", "!="):
        return bool(have == value) == (operator == "=")
    if operator in ("IN", "NIN"):
        return (have in value) == (operator == "IN")
    raise ValueError(operator)


def _encode(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _decode(cursor: str) -> list[Any]:
    decoded = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    if not isinstance(decoded, list):
        raise ValueError(cursor)
    return decoded
