"""A pulled ticket, assembled from the export's ticket and its comment pages, reads as a push of the same ticket."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kbms.model import ConversationSnapshot, micros
from kbms.providers import get_provider
from kbms.providers.fields import parse_timestamp
from kbms.providers.zendesk.pages import (
    CommentPage,
    NotZendesk,
    assemble,
    dumps,
    is_deleted,
    read_comments,
    read_export,
)
from tests.support.helpers import zendesk

TICKET: dict[str, Any] = {
    "url": "https://Acme.zendesk.com/api/v2/tickets/35436.json",
    "id": 35436,
    "created_at": "2026-01-05T10:00:00Z",
    "updated_at": "2026-01-05T11:30:00Z",
    "generated_timestamp": 1767612600,
    "subject": "Printer on fire",
    "status": "open",
    "requester_id": 20,
    "assignee_id": 30,
    "custom_fields": [{"id": 27642, "value": "745"}],
}


def comment(comment_id: int, author_id: int, body: str, minute: int, **extra: Any) -> dict[str, Any]:
    created = f"2026-01-05T10:{minute:02d}:00Z"
    return {"id": comment_id, "author_id": author_id, "body": body, "public": True, "created_at": created, **extra}


def page(comments: list[dict[str, Any]], users: list[dict[str, Any]], *, more: bool) -> CommentPage:
    after = "YWZ0ZXI=" if more else None
    return read_comments({"comments": comments, "users": users, "meta": {"has_more": more, "after_cursor": after}})


def parsed(body: bytes) -> ConversationSnapshot:
    return get_provider("zendesk").parse_push(body, workspace=None, default_workspace="default")


def test_assembled_ticket_maps_to_the_snapshot_a_push_gives() -> None:
    customer = {"id": 20, "name": "Carla Customer", "email": "carla@example.com", "role": "end-user"}
    agent = {"id": 30, "name": "Andy Agent", "role": "agent"}
    pages = [
        page(
            [comment(501, 20, "It is on fire", 1), comment(502, 30, "Have you tried water?", 2)],
            [customer, agent],
            more=True,
        ),
        page(
            [comment(503, 30, "Internal: escalate", 3, public=False), comment(504, 20, "Out now", 4)],
            # The agent again (renamed since), and a deleted user named only by an email: no id, so dropped.
            [{**agent, "name": "Andy A. Agent"}, customer, {"email": "gone@example.com"}],
            more=False,
        ),
    ]
    ticket = dumps(TICKET)
    body = assemble(ticket, pages)

    assert body.startswith(b'{"ticket":' + ticket + b',"comments":')  # the export's ticket, as it gave it
    assert [user["id"] for user in json.loads(body)["users"]] == [20, 30]  # once each
    snapshot = parsed(body)
    assert (snapshot.provider, snapshot.workspace, snapshot.external_id) == ("zendesk", "acme", "35436")
    assert [(m.id, m.content, m.visibility) for m in snapshot.messages] == [
        ("501", "It is on fire", "public"),
        ("502", "Have you tried water?", "public"),
        ("503", "Internal: escalate", "internal"),
        ("504", "Out now", "public"),
    ]
    assert [m.author_participant_id for m in snapshot.messages] == ["20", "30", "30", "20"]
    people = {p.id: (p.role, p.name, p.email) for p in snapshot.participants}
    assert people == {"20": ("customer", "Carla Customer", "carla@example.com"), "30": ("agent", "Andy A. Agent", None)}
    assert snapshot.version == parse_timestamp(TICKET["updated_at"])
    assert snapshot.header.state == "open"


def test_assembled_fixture_ticket_equals_its_push() -> None:
    """The docs' ticket and comments, pulled in two pages, map exactly as the same ticket pushed whole."""
    ticket = zendesk("01_rest_ticket_show_docs.json")["ticket"]
    comments = [
        *zendesk("02_rest_ticket_comments_docs.json")["comments"],
        *zendesk("03_rest_ticket_comments_recorded_zenpy.json")["comments"],
    ]
    users = zendesk("04_rest_ticket_create_with_sideloads_recorded_zenpy.json")["users"]
    pages = [page(comments[:1], users, more=True), page(comments[1:], users, more=False)]
    pushed = dumps({"ticket": ticket, "comments": comments, "users": users})
    assert parsed(assemble(dumps(ticket), pages)) == parsed(pushed)


def test_a_ticket_without_comments_assembles() -> None:
    snapshot = parsed(assemble(dumps(TICKET), [page([], [], more=False)]))
    assert snapshot.messages == ()
    assert snapshot.external_id == "35436"


def test_export_page_lists_tickets_with_their_own_bytes() -> None:
    deleted = {**TICKET, "id": 7, "status": "deleted", "updated_at": None}
    read = read_export({"tickets": [TICKET, deleted], "after_cursor": "abc", "end_of_stream": True})
    assert [item.external_id for item in read.items] == ["35436", "7"]
    assert read.items[0].updated_at == micros(parse_timestamp(TICKET["updated_at"]))
    assert read.items[1].updated_at is None  # still listed: the export's order is generated_timestamp's
    assert read.items[0].prefetched is not None
    assert json.loads(read.items[0].prefetched) == TICKET
    assert [is_deleted(item.prefetched or b"") for item in read.items] == [False, True]
    assert (read.after_cursor, read.end_of_stream) == ("abc", True)


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"results": []},
        {"tickets": {}, "end_of_stream": True},
        {"tickets": [], "after_cursor": "x"},  # no end_of_stream
        {"tickets": [{"subject": "no id"}], "after_cursor": "x", "end_of_stream": True},
        {"tickets": ["35436"], "after_cursor": "x", "end_of_stream": True},
    ],
)
def test_export_page_that_is_not_zendesk(answer: object) -> None:
    with pytest.raises(NotZendesk):
        read_export(answer)


@pytest.mark.parametrize(
    "answer",
    [
        {"results": []},
        {"comments": [], "next_page": None, "count": 0},  # offset pagination: no meta
        {"comments": [], "meta": {"has_more": True, "after_cursor": None}},
        {"comments": ["text"], "meta": {"has_more": False}},
        {"comments": [], "users": {"id": 1}, "meta": {"has_more": False}},
    ],
)
def test_comment_page_that_is_not_zendesk(answer: object) -> None:
    with pytest.raises(NotZendesk):
        read_comments(answer)
