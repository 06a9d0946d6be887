"""A fake Zendesk Support API, written from Zendesk's documentation, for testing the pull client without a network.

``build_app(FakeZendesk(clock))`` is a Starlette app; a test serves it through ``httpx2.ASGITransport`` and keeps
the ``FakeZendesk`` to change tickets between passes, inject faults and read what the client did. Its time is the
test's ``VirtualClock``, the one the client paces itself by.

What it serves, and the page each rule comes from (developer.zendesk.com):

- ``GET /api/v2/incremental/tickets/cursor.json`` (Incremental Exports reference): ``start_time`` on the first
  request, ``cursor`` after it; ``tickets``, ``after_cursor``, ``after_url``, ``before_cursor``, ``before_url``,
  ``end_of_stream``; ``per_page`` up to 1000 (the default); ordered by (``generated_timestamp``, id), as the
  documented cursor ``MTU3NjYxMzUzOS4wfHw0Njd8`` (``1576613539.0||467|``) shows; nothing from the most recent
  minute, and a ``start_time`` within it refused (422 "Too recent start_time", as clients in the wild handle it);
  deleted tickets in the stream with ``status: "deleted"`` unless ``exclude_deleted=true``; "Allowed For: Admins"
  (403 otherwise); at most 10 requests a minute, else 429 with ``Retry-After``;
- ``GET /api/v2/tickets/{id}/comments.json`` (Ticket Comments; Pagination): cursor pagination with ``page[size]``
  (at most 100) and ``page[after]``, answered with ``meta.has_more``/``after_cursor``/``before_cursor`` and
  ``links.next``/``prev``; offset pagination without ``page[size]``; ``include=users`` side-loads the users the
  page's comments name; oldest first;
- ``GET /api/v2/tickets/{id}.json`` (Tickets, Show Ticket): ``{"ticket": ...}``; 404 once deleted;
- ``GET /api/v2/users/me.json`` (Users, Show Self): "allowed for anonymous users", so no credentials give an
  anonymous user with no id rather than a 401;
- authentication by ``{email}/token:{api_token}`` basic auth or an OAuth ``Bearer`` token; anything else is 401
  ``{"error": "Couldn't authenticate you"}``; every authenticated answer carries the account's per-minute
  ``X-Rate-Limit`` and ``X-Rate-Limit-Remaining`` (Rate limits), which are not the export's limit.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request

from tests.providers.zendesk.fake_api import WINDOW, Fault, Hit, routes
from tests.support import canary
from tests.support.clock import VirtualClock

GARBAGE = Fault(200, b"<html><body>Down for maintenance</body></html>", "text/html")
WRONG_SHAPE = Fault(200, b'{"results": []}')  # JSON, but not what any of these endpoints answers
# What a start_time within the last minute gets: for a client whose clock runs ahead of Zendesk's.
TOO_RECENT = Fault(
    422, b'{"error":"InvalidValue","description":"Too recent start_time. Use a start_time older than 1 minute"}'
)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeZendesk:
    clock: VirtualClock
    subdomain: str = "acme"
    email: str = "owner@acme.example"
    api_token: str = f"zd-api-token-{canary.TAG}"  # canaries: the suite fails if a log line shows one
    oauth_token: str = f"zd-oauth-token-{canary.TAG}"
    role: str = "admin"  # the token owner's: an agent's token is refused the export
    owner_id: int = 900
    account_limit: int = 700  # X-Rate-Limit: the account's requests per minute
    tickets: dict[int, dict[str, Any]] = field(default_factory=dict)
    comments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: list[tuple[str, Fault]] = field(default_factory=list)
    # What the client did: every request (time, path, query, how it authenticated), the export requests answered, and
    # the 429s the export's own limit gave.
    requests: list[Hit] = field(default_factory=list)
    export_times: list[float] = field(default_factory=list)
    export_limited: int = 0
    _next_comment: int = 10_000

    def __post_init__(self) -> None:
        self.add_user(self.owner_id, "Account Owner", self.role, email=self.email)

    def add_user(self, user_id: int, name: str, role: str, *, email: str | None = None) -> dict[str, Any]:
        self.users[user_id] = {
            "id": user_id,
            "name": name,
            "email": email,
            "role": role,
            "url": self._url("users", user_id),
        }
        return self.users[user_id]

    def put_ticket(self, ticket_id: int, **fields: Any) -> dict[str, Any]:
        """Create or update a ticket: it moves to the end of the export stream, as any change does."""
        now = self.clock.now()
        ticket = self.tickets.setdefault(
            ticket_id,
            {"url": self._url("tickets", ticket_id), "id": ticket_id, "created_at": iso(now), "status": "new"},
        )
        ticket.update(fields, updated_at=iso(now), generated_timestamp=int(now))
        self.comments.setdefault(ticket_id, [])
        return ticket

    def delete_ticket(self, ticket_id: int) -> None:
        self.put_ticket(ticket_id, status="deleted")

    def add_comment(self, ticket_id: int, author_id: int, body: str, *, public: bool = True) -> dict[str, Any]:
        self._next_comment += 1
        now = self.clock.now()
        comment = {
            "id": self._next_comment,
            "type": "Comment",
            "author_id": author_id,
            "body": body,
            "html_body": f"<p>{body}</p>",
            "plain_body": body,
            "public": public,
            "attachments": [],
            "created_at": iso(now),
        }
        self.comments[ticket_id].append(comment)
        self.put_ticket(ticket_id)
        return comment

    def edit_comment(self, ticket_id: int, comment_id: int, body: str) -> None:
        for comment in self.comments[ticket_id]:
            if comment["id"] == comment_id:
                comment.update(body=body, plain_body=body, html_body=f"<p>{body}</p>")
        self.put_ticket(ticket_id)

    def delete_comment(self, ticket_id: int, comment_id: int) -> None:
        self.comments[ticket_id] = [c for c in self.comments[ticket_id] if c["id"] != comment_id]
        self.put_ticket(ticket_id)

    def fail(self, *faults: Fault, path: str = "/api/v2/") -> None:
        """Answer the next requests under ``path`` with ``faults``, one each, in order."""
        self.faults.extend((path, fault) for fault in faults)

    def spend_exports(self, count: int) -> None:
        """Another client of the account asks the export ``count`` times now (its limit is the account's)."""
        self.export_times.extend([self.clock.now()] * count)

    def hits(self, path: str) -> list[Hit]:
        return [hit for hit in self.requests if hit.path.removesuffix(".json") == path]

    def max_exports_per_minute(self) -> int:
        """The most export requests answered in any 60 seconds (a sliding window: stricter than Zendesk's)."""
        times = self.export_times
        return max((sum(1 for t in times if start <= t < start + WINDOW) for start in times), default=0)

    def _url(self, kind: str, item_id: int) -> str:
        return f"https://{self.subdomain}.zendesk.com/api/v2/{kind}/{item_id}.json"

    def authenticate(self, request: Request) -> str | None:
        """How the request authenticated ("basic", "bearer", "anonymous"), or None when it failed."""
        header = request.headers.get("authorization")
        if header is None:
            return "anonymous"
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":
            return "bearer" if credentials == self.oauth_token else None
        if scheme.lower() == "basic":
            try:
                user, _, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            email, _, kind = user.partition("/")
            if kind == "token" and email.lower() == self.email.lower() and secret == self.api_token:
                return "basic"
        return None

    def account_used(self) -> int:
        minute = math.floor(self.clock.now() / WINDOW)
        return sum(
            1 for hit in self.requests if hit.auth in ("basic", "bearer") and math.floor(hit.at / WINDOW) == minute
        )


def build_app(zendesk: FakeZendesk) -> Starlette:
    return Starlette(routes=routes(zendesk))
