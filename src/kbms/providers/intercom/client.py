"""Pulling from Intercom's REST API, version 2.16 (issue 15): what changed (``POST /conversations/search``), each
conversation in full (``GET /conversations/{id}``), and which workspace a token opens (``GET /me``).

Evidence is Intercom's OpenAPI description 2.16 (``/work/shared/reference/intercom``, "SPEC" below, with its lines)
and the recorded fixtures of ``tests/providers/intercom/fixtures``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx2

from kbms.providers.http import WALL_CLOCK, Api, Budget, Reply, ServerClock
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

BASE_URL = "https://api.intercom.io"  # the US region; the EU and AU ones are other base URLs (SPEC L35604-35610)
VERSION = "2.16"  # pinned: the spec and the fixtures kbms maps are 2.16's
# A ceiling of kbms's own, well under Intercom's default of 10,000 a minute for a private app (its headers pace
# the client to what the app is really given).
MAX_REQUESTS_PER_MINUTE = 1000
PER_PAGE = 150  # search's maximum (SPEC L11617)
MICROS = 1_000_000


class IntercomBudget:
    """Reads ``X-RateLimit-Limit`` (requests per 10-second window), ``-Remaining`` (left in it) and ``-Reset`` (the
    unix time at which it refills, on Intercom's clock: read on ours through its ``Date``). Intercom sends them on
    every answer but those to bad credentials."""

    def __init__(self) -> None:
        self.server = ServerClock()

    def __call__(self, response: httpx2.Response, now: float) -> Budget | None:
        offset = self.server.offset(response, now)
        headers = response.headers
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            reset = float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return None
        return Budget(limit=limit, remaining=remaining, reset_at=reset - offset)


def _is_list(data: Any) -> bool:
    conversations = data.get("conversations") if isinstance(data, dict) else None
    return (
        isinstance(conversations, list)
        and data.get("type") == "conversation.list"
        and all(isinstance(item, dict) and isinstance(item.get("id"), str | int) for item in conversations)
    )


def _is_conversation(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") == "conversation" and isinstance(data.get("id"), str | int)


def _is_admin(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("app"), dict)


def _is_not_found(data: Any) -> bool:
    """Intercom's own 404 (``error.list`` with ``not_found``, SPEC L11169-11180), not a proxy's page: a deletion is
    permanent in kbms, so only Intercom's word counts as one."""
    errors = data.get("errors") if isinstance(data, dict) else None
    return (
        isinstance(errors, list)
        and data.get("type") == "error.list"
        and any(isinstance(error, dict) and error.get("code") == "not_found" for error in errors)
    )


def search_query(since: int | None) -> dict[str, Any]:
    """The search for conversations updated at or after ``since`` (microseconds), or for every conversation.

    ``>`` on a date is documented as "greater (or equal) than" (SPEC L11702), but the contact search documents day
    granularity for it (L8743-8761): ``= since`` is asked for too, as Airbyte's Intercom source does. Search needs
    a query: "every conversation" is one created after the epoch."""
    if since is None:
        return {"field": "created_at", "operator": ">", "value": 0}
    seconds = since // MICROS
    return {
        "operator": "OR",
        "value": [
            {"field": "updated_at", "operator": ">", "value": seconds},
            {"field": "updated_at", "operator": "=", "value": seconds},
        ],
    }


def _listed(item: dict[str, Any]) -> Listed:
    updated_at = item.get("updated_at")
    micros = updated_at * MICROS if isinstance(updated_at, int) and not isinstance(updated_at, bool) else None
    return Listed(external_id=str(item["id"]), updated_at=micros)


def _next(data: dict[str, Any]) -> str | None:
    pages = data.get("pages")
    following = pages.get("next") if isinstance(pages, dict) else None
    cursor = following.get("starting_after") if isinstance(following, dict) else None
    return cursor if isinstance(cursor, str) and cursor else None


class IntercomClient:
    """One Intercom workspace (app), through its access token."""

    def __init__(
        self, source: SourceConfig, *, transport: httpx2.AsyncBaseTransport | None = None, timing: Timing = WALL_CLOCK
    ) -> None:
        self.workspace = source.workspace
        self.api = Api(
            base_url=source.base_url or BASE_URL,
            max_requests_per_minute=source.ceiling(MAX_REQUESTS_PER_MINUTE),
            headers={
                "Authorization": f"Bearer {source.token}",
                "Intercom-Version": VERSION,
                "Accept": "application/json",
            },
            secrets=(source.token,),
            budget=IntercomBudget(),
            transport=transport,
            timing=timing,
        )
        self.stats: ClientStats = self.api.stats

    async def check(self) -> None:
        """The token works, and opens the configured workspace: ``GET /me`` names its app (``app.id_code``, SPEC
        L13-56); a conversation never does."""
        reply = await self.api.request("GET", "/me", expect=_is_admin)
        app_id = reply.data["app"].get("id_code")
        if app_id != self.workspace:
            raise ProviderRefused(
                f"the Intercom token configured for workspace {self.workspace!r} opens app {app_id!r}, "
                f"not {self.workspace!r} ({self.api.host})"
            )

    async def list_changed(self, *, since: int | None, position: str | None) -> ListPage:
        pagination: dict[str, Any] = {"per_page": PER_PAGE}
        if position is not None:
            pagination["starting_after"] = position
        body = {
            "query": search_query(since),
            # Not in 2.16's search_request schema (only contact search documents it): asked for, never relied on.
            "sort": {"field": "updated_at", "order": "ascending"},
            "pagination": pagination,
        }
        reply = await self.api.request("POST", "/conversations/search", json_body=body, expect=_is_list)
        items = tuple(_listed(item) for item in reply.data["conversations"])
        if since is not None:
            # Only what the search was asked for, whatever granularity its operators really have.
            floor = since // MICROS * MICROS
            items = tuple(item for item in items if item.updated_at is None or item.updated_at >= floor)
        cursor = _next(reply.data)
        return ListPage(items=items, position=cursor, done=cursor is None)

    async def fetch(self, listed: Listed) -> Fetched:
        """The conversation as ``GET /conversations/{id}`` gives it (no ``display_as``: it would turn bodies into
        plain text), at most its 500 newest parts (SPEC L10994); a 404 is a deletion (or an id Intercom never had:
        it does not say which)."""
        path = f"/conversations/{quote(listed.external_id, safe='')}"
        reply = await self.api.request("GET", path, expect=_is_conversation, allow=(404,))
        if reply.status == 404:
            return self._not_found(listed, path, reply)
        return Fetched(external_id=listed.external_id, body=reply.content)

    def _not_found(self, listed: Listed, path: str, reply: Reply) -> Fetched:
        if not _is_not_found(reply.data):
            raise ProviderUnreachable(f"{self.api.host} answered 404 to GET {path} with something not Intercom's")
        return Fetched(external_id=listed.external_id, body=reply.content, deleted=True)

    async def aclose(self) -> None:
        await self.api.aclose()


class IntercomPuller:
    def default_base_url(self, workspace: str) -> str:
        return BASE_URL

    def client(
        self, source: SourceConfig, *, transport: httpx2.AsyncBaseTransport | None = None, timing: Timing = WALL_CLOCK
    ) -> IntercomClient:
        return IntercomClient(source, transport=transport, timing=timing)
