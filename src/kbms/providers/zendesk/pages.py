"""What Zendesk's pull endpoints answer, read, and a pulled ticket assembled into what a push would have sent.

Pure: parsed JSON in, values out; the HTTP is ``client.py``'s. A page without the shape its endpoint documents
raises ``NotZendesk``: something answered that is not Zendesk's API (a proxy's page, a wrong base URL), and
nothing of it may be stored.

- The incremental ticket export (``GET /api/v2/incremental/tickets/cursor``) answers ``tickets``,
  ``after_cursor`` and ``end_of_stream``; every ticket is whole, so it is kept, re-serialized, as the listing's
  ``prefetched`` copy and fetching asks only for its comments.
- A comments page (``GET /api/v2/tickets/{id}/comments?include=users``, cursor-paged) answers ``comments``, the
  side-loaded ``users`` the page names, and ``meta.has_more``/``meta.after_cursor``.
- ``assemble`` makes the body ``ZendeskProvider.parse_push`` reads, ``{"ticket", "comments", "users"}``: the body
  the ledger keeps, so that ``kbms reprocess`` re-derives a pulled ticket as it re-derives a pushed one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError

from kbms.model import micros
from kbms.providers.fields import integral, parse_timestamp
from kbms.providers.pull import Listed

DELETED = "deleted"  # a deleted ticket's status in the export ("By default, deletions will appear in the stream")


class NotZendesk(ValueError):
    """A page without the shape its endpoint documents."""


@dataclass(frozen=True, slots=True)
class ExportPage:
    items: tuple[Listed, ...]
    after_cursor: str | None
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class CommentPage:
    comments: tuple[Mapping[str, Any], ...]
    users: tuple[Mapping[str, Any], ...]
    after_cursor: str | None
    has_more: bool


def read_export(data: object) -> ExportPage:
    if not isinstance(data, dict) or not isinstance(data.get("tickets"), list):
        raise NotZendesk("the ticket export answered without a tickets list")
    end, after = data.get("end_of_stream"), data.get("after_cursor")
    if not isinstance(end, bool) or not (after is None or isinstance(after, str)):
        raise NotZendesk("the ticket export answered without end_of_stream or after_cursor")
    return ExportPage(tuple(listed(ticket) for ticket in data["tickets"]), after or None, end)


def listed(ticket: object) -> Listed:
    """A ticket of the export as a listing item: its id, its ``updated_at`` and the ticket itself."""
    if not isinstance(ticket, dict):
        raise NotZendesk("the ticket export listed something that is not a ticket")
    ticket_id = ticket_key(ticket)
    try:
        updated_at: int | None = micros(parse_timestamp(ticket.get("updated_at")))
    except PydanticCustomError:
        # The export is ordered by generated_timestamp, which moves on system updates that leave updated_at
        # alone: updated_at is what the ticket says of itself, and a ticket that says nothing is still listed.
        updated_at = None
    return Listed(external_id=ticket_id, updated_at=updated_at, prefetched=dumps(ticket))


def ticket_key(ticket: Mapping[str, Any]) -> str:
    number = integral(ticket.get("id"))
    if number is None or number <= 0:
        raise NotZendesk("a ticket without an id")
    return str(number)


def is_deleted(ticket: bytes) -> bool:
    try:
        data = json.loads(ticket)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("status") == DELETED


def read_comments(data: object) -> CommentPage:
    if not isinstance(data, dict) or not isinstance(data.get("comments"), list):
        raise NotZendesk("the ticket's comments answered without a comments list")
    meta = data.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("has_more"), bool):
        raise NotZendesk("the ticket's comments answered without meta.has_more (cursor pagination)")
    after = meta.get("after_cursor")
    if meta["has_more"] and not (isinstance(after, str) and after):
        raise NotZendesk("the ticket's comments have more pages but no meta.after_cursor")
    users = data.get("users") or []
    if not isinstance(users, list) or not all(isinstance(item, dict) for item in [*data["comments"], *users]):
        raise NotZendesk("the ticket's comments or users are not objects")
    return CommentPage(tuple(data["comments"]), tuple(users), after or None, meta["has_more"])


def assemble(ticket: bytes, pages: Iterable[CommentPage]) -> bytes:
    """The push body of a pulled ticket: the ticket as the export gave it (its bytes kept as they are), every
    comment of every page in order, and the side-loaded users once each.

    A user appears on every page that names them; the last copy wins, being the most recently read. A side-loaded
    entry without an id (Zendesk may name a deleted user by an email) names no one kbms can key, and is dropped:
    ``ZendeskUser`` requires an id, and one such entry would refuse the whole ticket.
    """
    comments: list[Mapping[str, Any]] = []
    users: dict[str, Mapping[str, Any]] = {}
    for page in pages:
        comments.extend(page.comments)
        for user in page.users:
            key = integral(user.get("id"))
            if key is not None:
                users[str(key)] = user
    return b'{"ticket":%s,"comments":%s,"users":%s}' % (ticket, dumps(comments), dumps(list(users.values())))


def dumps(value: object) -> bytes:
    # Compact and stable: the same ticket pulled twice is the same bytes, so the same delivery key (unchanged).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
