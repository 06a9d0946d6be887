"""Pulling from Zendesk's Support API (``kbms sync``): the incremental ticket export lists what changed, and each
listed ticket's comments (with their users) are fetched and assembled into what a push of it would be.

- Authentication: an API token as ``{email}/token:{token}`` basic auth when the source names an email, else the
  token as an OAuth ``Bearer`` token.
- Listing: ``GET /api/v2/incremental/tickets/cursor`` from ``start_time`` (the first time) or the cursor it last
  gave. Its ``after_cursor`` is the listing's position, kept at ``end_of_stream`` too: it is where the next
  incremental run starts. ``start_time`` may not be within the last minute (Zendesk refuses it), so a recent
  ``since`` starts earlier; what is listed twice is stored once. The export is "Allowed For: Admins".
- Pacing: the export takes 10 requests a minute, and tells of it only by a 429 (the account's ``X-Rate-Limit``
  headers describe every other endpoint), so the client paces it itself, on top of the source's ceiling.
- Fetching: ``GET /api/v2/tickets/{id}/comments?include=users``, cursor-paged (100 a page, the most allowed); the
  ticket is the export's own copy. A deleted ticket (``status: "deleted"`` in the export, or a 404 since it was
  listed) is fetched as a deletion, without its comments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2

from kbms.providers.http import WALL_CLOCK, Api, Budget, Pacer
from kbms.providers.pull import (
    ClientStats,
    Fetched,
    Listed,
    ListPage,
    ProviderRefused,
    ProviderUnreachable,
    SourceConfig,
    Timing,
)
from kbms.providers.zendesk.pages import (
    CommentPage,
    NotZendesk,
    assemble,
    dumps,
    is_deleted,
    read_comments,
    read_export,
)

EXPORT = "/api/v2/incremental/tickets/cursor.json"
ME = "/api/v2/users/me.json"
EXPORT_PER_MINUTE = 10  # "You can make up to 10 requests per minute to these endpoints" (Incremental Exports)
# start_time "must be at least one minute in the past": half a minute more for the skew between our clock and
# Zendesk's. Listing from a little earlier costs only duplicates.
RECENT = 90
COMMENT_PAGE = 100  # page[size]: "most endpoints limit this to a maximum of 100"
# Zendesk keeps at most 5,000 comments a ticket (50 pages): far more pages means a cursor going round in circles.
MAX_COMMENT_PAGES = 500
DEFAULT_PER_MINUTE = 100  # well under the smallest plan's 200 requests a minute (Zendesk's rate limits page)
ADMIN_HINT = "the incremental ticket export is for admins: use an admin's API token or OAuth token"


class ZendeskPuller:
    def default_base_url(self, workspace: str) -> str:
        return f"https://{workspace}.zendesk.com"

    def client(
        self, source: SourceConfig, *, transport: httpx2.AsyncBaseTransport | None = None, timing: Timing = WALL_CLOCK
    ) -> ZendeskClient:
        return ZendeskClient(
            source,
            base_url=source.base_url or self.default_base_url(source.workspace),
            transport=transport,
            timing=timing,
        )


class ZendeskClient:
    """One Zendesk account's API, for one source."""

    def __init__(
        self,
        source: SourceConfig,
        *,
        base_url: str,
        transport: httpx2.AsyncBaseTransport | None = None,
        timing: Timing = WALL_CLOCK,
    ) -> None:
        ceiling = source.ceiling(DEFAULT_PER_MINUTE)
        auth: httpx2.Auth | None = None
        headers: dict[str, str] = {"Accept": "application/json"}
        if source.email:
            auth = httpx2.BasicAuth(f"{source.email}/token", source.token)
        else:
            headers["Authorization"] = f"Bearer {source.token}"
        self.api = Api(
            base_url=base_url,
            max_requests_per_minute=ceiling,
            headers=headers,
            auth=auth,
            secrets=(source.token,),
            budget=read_budget,
            transport=transport,
            timing=timing,
        )
        self.stats: ClientStats = self.api.stats
        self._timing = timing
        self._export = Pacer(max_per_minute=EXPORT_PER_MINUTE, timing=timing, stats=self.stats)

    async def aclose(self) -> None:
        await self.api.aclose()

    async def check(self) -> None:
        """``users/me`` answers anyone ("allowed for anonymous users"): credentials it does not take give the
        anonymous user, with no id, where other endpoints would answer 401."""
        reply = await self.api.request("GET", ME, expect=lambda data: isinstance(data, dict) and "user" in data)
        user: Any = reply.data["user"]
        if not isinstance(user, dict) or user.get("id") is None:
            raise ProviderRefused(f"{self.api.host} did not recognise the credentials (users/me: anonymous)")
        if user.get("role") != "admin":
            raise ProviderRefused(f"{self.api.host}: the token's user is not an admin; {ADMIN_HINT}")

    async def list_changed(self, *, since: int | None, position: str | None) -> ListPage:
        if position:
            params = {"cursor": position}
        else:
            start = 0 if since is None else since // 1_000_000
            params = {"start_time": str(max(0, min(start, int(self._timing.now()) - RECENT)))}
        reply = await self.api.request(
            "GET", EXPORT, params=params, expect=_has("tickets"), allow=(403, 422), pacer=self._export
        )
        if reply.status == 403:  # the credentials work (else 401), but not for the export
            raise ProviderRefused(f"{self.api.host} refused the ticket export (HTTP 403): {ADMIN_HINT}")
        if reply.status == 422:
            # "Too recent start_time": nothing to list yet (our clock runs ahead of Zendesk's); from the same
            # start next time.
            if "too recent" not in str(_field(reply.data, "description")).lower():
                raise ProviderUnreachable(f"{self.api.host} answered HTTP 422 to GET {EXPORT}")
            return ListPage(items=(), position=None, done=True)
        try:
            page = read_export(reply.data)
        except NotZendesk as exc:
            raise ProviderUnreachable(f"{self.api.host} answered something that is not its API: {exc}") from None
        return ListPage(items=page.items, position=page.after_cursor or position, done=page.end_of_stream)

    def _gone(self, ticket_id: str, data: object, content: bytes) -> Fetched:
        # A tombstone is for good: only Zendesk's own "no such record" makes one, not any 404 (a proxy's, a path
        # prefix gone wrong in a base URL).
        if not _not_found(data):
            raise ProviderUnreachable(f"{self.api.host} answered 404 without Zendesk's RecordNotFound")
        return Fetched(external_id=ticket_id, body=content, deleted=True)

    async def fetch(self, listed: Listed) -> Fetched:
        ticket_id = listed.external_id
        if not (ticket_id.isascii() and ticket_id.isdigit()):
            raise ValueError(f"not a Zendesk ticket id: {ticket_id!r}")
        ticket = listed.prefetched
        if ticket is None:
            path = f"/api/v2/tickets/{ticket_id}.json"
            reply = await self.api.request("GET", path, expect=_has("ticket"), allow=(404,))
            if reply.status == 404:
                return self._gone(ticket_id, reply.data, reply.content)
            ticket = dumps(reply.data["ticket"])
        if is_deleted(ticket):
            return Fetched(external_id=ticket_id, body=ticket, deleted=True)
        pages: list[CommentPage] = []
        after: str | None = None
        path = f"/api/v2/tickets/{ticket_id}/comments.json"
        while len(pages) < MAX_COMMENT_PAGES:
            params = {"page[size]": str(COMMENT_PAGE), "include": "users"}
            if after is not None:
                params["page[after]"] = after
            reply = await self.api.request("GET", path, params=params, expect=_has("comments"), allow=(404,))
            if reply.status == 404:  # deleted since it was listed: the next export says so too
                return self._gone(ticket_id, reply.data, reply.content)
            try:
                page = read_comments(reply.data)
            except NotZendesk as exc:
                raise ProviderUnreachable(f"{self.api.host} answered something that is not its API: {exc}") from None
            pages.append(page)
            if not page.has_more:
                return Fetched(external_id=ticket_id, body=assemble(ticket, pages))
            if page.after_cursor == after:
                break
            after = page.after_cursor
        raise ProviderUnreachable(f"{self.api.host} kept paging the comments of ticket {ticket_id} in a circle")


def read_budget(response: httpx2.Response, now: float) -> Budget | None:
    """The account's budget for the current minute (``X-Rate-Limit``, ``X-Rate-Limit-Remaining``), and when it
    refills where an endpoint says (``ratelimit-reset``, in seconds, on list endpoints)."""
    remaining = _number(response.headers.get("x-rate-limit-remaining"))
    if remaining is None:
        return None
    reset = _number(response.headers.get("ratelimit-reset"))
    return Budget(_number(response.headers.get("x-rate-limit")), remaining, None if reset is None else now + reset)


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isascii() and value.strip().isdigit() else None


def _not_found(data: object) -> bool:
    """Zendesk's own answer for a record it does not have (``{"error": "RecordNotFound", ...}``)."""
    return _field(data, "error") == "RecordNotFound"


def _has(key: str) -> Callable[[Any], bool]:
    return lambda data: isinstance(data, dict) and key in data


def _field(data: object, key: str) -> object:
    return data.get(key) if isinstance(data, dict) else None
