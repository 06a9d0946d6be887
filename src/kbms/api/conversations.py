"""``/internal/*``: what internal consumers read. Lean routes (see ``api/lean.py``): these are hot.

- ``GET /internal/conversations``: the list, filtered, newest-updated first with a keyset cursor; with ``q``,
  full-text search, most relevant first;
- ``GET /internal/conversations/{id}``: the detail, from the read model;
- ``GET /internal/changes``: every committed change, in commit order;
- ``GET /internal/exports/conversations.ndjson``: every conversation the filters match, streamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field, StringConstraints, TypeAdapter

from kbms import search
from kbms.api.auth import visible_workspaces
from kbms.api.bounds import TIME
from kbms.api.cursor import (
    decode_cursor,
    decode_feed_cursor,
    decode_search_cursor,
    encode_cursor,
    encode_feed_cursor,
    encode_search_cursor,
)
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.lean import WORKSPACE_QUERY, LeanRoute, Query, parameter, path_id, query, store_of
from kbms.api.openapi import link
from kbms.api.responses import json_response
from kbms.api.schemas import ChangePage, ConversationDetail, ConversationPage, ErrorBody, ListItem, Match
from kbms.errors import FieldIssue, Forbidden, NotFound, ValidationFailed
from kbms.model import CONVERSATION_ID, State, micros
from kbms.storage.base import Filters

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
DEFAULT_FEED_LIMIT = 100
MAX_FEED_LIMIT = 1000
LIMIT = TypeAdapter(Annotated[int, Field(ge=1, le=MAX_LIMIT)])
FEED_LIMIT = TypeAdapter(Annotated[int, Field(ge=1, le=MAX_FEED_LIMIT)])
CURSOR = TypeAdapter(Annotated[str, Field(max_length=256)])
STATE: TypeAdapter[State] = TypeAdapter(State)
TAG = TypeAdapter(Annotated[str, StringConstraints(min_length=1, max_length=255)])
Q = TypeAdapter(Annotated[str, StringConstraints(min_length=1, max_length=512)])
TRUNCATED = TypeAdapter(bool)
# Each parameter is read and documented from its validator (``Query``).
LIMIT_PARAMETER = Query("limit", LIMIT, DEFAULT_LIMIT, "Page size")
FEED_LIMIT_PARAMETER = Query("limit", FEED_LIMIT, DEFAULT_FEED_LIMIT, "Page size")
CURSOR_PARAMETER = Query("cursor", CURSOR, None, "next_cursor of the previous page")
Q_PARAMETER = Query("q", Q, None, "Full-text search")
STATE_PARAMETER = Query("state", STATE, None, "Only conversations in this state")
TAG_PARAMETER = Query("tag", TAG, None, "Only conversations with this tag")
TRUNCATED_PARAMETER = Query(
    "truncated",
    TRUNCATED,
    None,
    "true: only conversations the provider returned cut short (completeness.truncated); false: only the others",
)
AFTER_PARAMETER = Query(
    "updated_after", TIME, None, "Only conversations updated after this time (ISO-8601, or unix seconds; exclusive)"
)
BEFORE_PARAMETER = Query(
    "updated_before", TIME, None, "Only conversations updated before this time (ISO-8601, or unix seconds; exclusive)"
)
PREFIX = "/internal"
LIST_PATH, DETAIL_PATH, CHANGES_PATH = "/conversations", "/conversations/{conversation_id}", "/changes"


def detail_link(conversation_id: str) -> dict[str, Any]:
    """A link to the conversation whose id the runtime expression ``conversation_id`` names."""
    return link(PREFIX + DETAIL_PATH, "get", "The conversation", conversation_id=conversation_id)


FILTERS = ("provider", "workspace", "state", "tag", "updated_after", "updated_before", "truncated")
# The provider filter's parameter is the app's (see ``router``); these are the same for every app.
OTHER_FILTER_PARAMETERS = [
    WORKSPACE_QUERY.openapi("Only this workspace's (a provider account)"),
    STATE_PARAMETER.openapi(),
    TAG_PARAMETER.openapi(),
    AFTER_PARAMETER.openapi(),
    BEFORE_PARAMETER.openapi(),
    TRUNCATED_PARAMETER.openapi(),
]


def provider_filter(providers: Iterable[str]) -> TypeAdapter[str]:
    """The validator of the ``provider`` filter: one of ``providers`` (an app's), built once per app."""
    return TypeAdapter(Literal[tuple(providers)])  # type: ignore[arg-type]


def _provider(request: Request) -> str | None:
    # Looked up only when the filter is given: a list without it costs what it did with a module-level validator.
    if "provider" not in request.query_params:
        return None
    return query(request, "provider", cast(TypeAdapter[str], request.app.state.provider_filter), None)


def filters_of(request: Request) -> Filters:
    after = AFTER_PARAMETER.read(request)
    before = BEFORE_PARAMETER.read(request)
    workspace = WORKSPACE_QUERY.read(request)
    within = visible_workspaces(request)
    if within is not None and workspace is not None:
        if workspace not in within:
            raise Forbidden(f"This API key cannot read workspace {workspace!r}")
        within = None  # the workspace filter is narrower
    return Filters(
        provider=_provider(request),
        workspace=workspace,
        within=within,
        state=STATE_PARAMETER.read(request),
        tag=TAG_PARAMETER.read(request),
        updated_after=micros(after) if after is not None else None,
        updated_before=micros(before) if before is not None else None,
        truncated=TRUNCATED_PARAMETER.read(request),
    )


async def list_conversations(request: Request) -> Response:
    limit = LIMIT_PARAMETER.read(request)
    cursor = CURSOR_PARAMETER.read(request)
    filters = filters_of(request)
    q = Q_PARAMETER.read(request)
    store = store_of(request)
    if q is not None:
        terms = search.query_terms(q)
        if not terms:
            raise ValidationFailed(
                [FieldIssue("q", "no_words", "The query has no word to search for (letters or digits)")],
                message="Request validation failed",
            )
        offset = decode_search_cursor(cursor) if cursor else 0
        if offset > search.WINDOW:
            raise ValidationFailed(
                [FieldIssue("cursor", "too_deep", f"Search results stop after {search.WINDOW}")],
                message="Request validation failed",
            )
        hits = await store.search(terms, filters=filters, limit=limit + 1, offset=offset)
        items = [
            ListItem(
                **hit.summary.model_dump(), match=Match(score=hit.score, snippet=hit.snippet, message_id=hit.message_id)
            )
            for hit in hits[:limit]
        ]
        following = encode_search_cursor(offset + limit) if len(hits) > limit else None
        return json_response(ConversationPage(items=items, next_cursor=following))
    page = await store.list_conversations(
        limit=limit, cursor=decode_cursor(cursor) if cursor else None, filters=filters
    )
    next_cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    listed = [ListItem(**item.model_dump()) for item in page.items]
    return json_response(ConversationPage(items=listed, next_cursor=next_cursor))


async def get_conversation(request: Request) -> Response:
    # Another workspace's conversation is as unknown to a limited key as a missing one: no existence oracle.
    conversation_id = path_id(request, "conversation_id", CONVERSATION_ID, "Conversation")
    detail = await store_of(request).get_conversation_json(conversation_id, within=visible_workspaces(request))
    if detail is None:
        raise NotFound("Conversation not found")
    return json_response(detail)


async def list_changes(request: Request) -> Response:
    limit = FEED_LIMIT_PARAMETER.read(request)
    cursor = CURSOR_PARAMETER.read(request)
    after = decode_feed_cursor(cursor) if cursor else 0
    records = await store_of(request).changes(after=after, limit=limit, within=visible_workspaces(request))
    last = records[-1].seq if records else after
    return json_response(ChangePage.of(records, next_cursor=encode_feed_cursor(last)))


async def export_conversations(request: Request) -> Response:
    batches = store_of(request).export(filters_of(request))
    # The first batch before the response starts: a database that cannot be read is still a proper 503.
    first = await anext(batches)

    async def lines() -> AsyncIterator[bytes]:
        try:
            batch = first
            while True:
                if batch.details:
                    yield b"".join(detail + b"\n" for detail in batch.details)
                batch = await anext(batches)
        except StopAsyncIteration:
            return
        finally:
            await batches.aclose()  # the snapshot's connection goes back at once, even if the client left

    headers = {"X-Kbms-Count": str(first.total), "Content-Disposition": 'attachment; filename="conversations.ndjson"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


def router(providers: Iterable[str]) -> APIRouter:
    """The ``/internal`` routes of an app whose providers are named ``providers`` (the provider filter takes
    them); built once per app, like the ingestion and webhook routers. The app keeps ``provider_filter(providers)``
    as ``app.state.provider_filter``."""
    filter_parameters = [
        Query("provider", provider_filter(providers), None, "Only this provider's").openapi(),
        *OTHER_FILTER_PARAMETERS,
    ]
    routes = APIRouter(prefix=PREFIX, tags=["internal"], route_class=LeanRoute)
    routes.get(
        LIST_PATH,
        response_model=ConversationPage,
        summary="List or search conversations",
        description=(
            "Without `q`: live conversations newest-updated first; `next_cursor` continues the list, and new "
            "conversations arriving meanwhile neither repeat nor skip items. With `q`: full-text search over subjects "
            "and message text (accents and case do not matter, every word must be present), most relevant first, each "
            "item with a `match` (score and highlighted snippet); the 1,000 most recently created matches are ranked. "
            "Filters apply to both."
        ),
        responses={
            200: {
                "links": {
                    "NextPage": link(
                        PREFIX + LIST_PATH,
                        "get",
                        "The next page of the same list or search (none when next_cursor is null)",
                        cursor="$response.body#/next_cursor",
                        **{name: f"$request.query.{name}" for name in ("limit", "q", *FILTERS)},
                    ),
                    "FirstItem": detail_link("$response.body#/items/0/id"),
                }
            },
            422: {"model": ErrorBody, "description": "Bad limit, cursor, filter or query"},
            **ERROR_RESPONSES,
        },
        openapi_extra={
            "parameters": [
                LIMIT_PARAMETER.openapi(),
                CURSOR_PARAMETER.openapi(),
                Q_PARAMETER.openapi(),
                *filter_parameters,
            ]
        },
    )(list_conversations)
    routes.get(
        DETAIL_PATH,
        response_model=ConversationDetail,
        summary="One conversation with its participants, messages and events",
        responses={404: {"model": ErrorBody, "description": "Unknown or deleted conversation"}, **ERROR_RESPONSES},
        openapi_extra={
            "parameters": [
                parameter("conversation_id", "path", {"type": "string", "format": "uuid"}, "kbms's id", required=True)
            ]
        },
    )(get_conversation)
    routes.get(
        CHANGES_PATH,
        response_model=ChangePage,
        summary="Every committed change, in commit order",
        description=(
            "Each created, updated or deleted conversation once per change, in the order the changes were committed. "
            "Start without a cursor, then pass `next_cursor` back, forever: it is always set (the same cursor when "
            "nothing new has been committed), and no change is ever skipped or repeated, whatever the concurrent "
            "writers. Changes are kept: a consumer can resume from any cursor it was given."
        ),
        responses={
            200: {
                "links": {
                    "NextChanges": link(
                        PREFIX + CHANGES_PATH,
                        "get",
                        "The changes committed after these",
                        cursor="$response.body#/next_cursor",
                        limit="$request.query.limit",
                    ),
                    "FirstChanged": detail_link("$response.body#/items/0/conversation_id"),
                }
            },
            422: {"model": ErrorBody, "description": "Bad limit or cursor"},
            **ERROR_RESPONSES,
        },
        openapi_extra={
            "parameters": [
                FEED_LIMIT_PARAMETER.openapi(),
                CURSOR_PARAMETER.openapi(),
            ]
        },
    )(list_changes)
    routes.get(
        "/exports/conversations.ndjson",
        summary="Export conversations as NDJSON (streamed)",
        description=(
            "Every live conversation the filters match, one detail per line (the same JSON as the detail endpoint), "
            "newest-updated first, from one consistent snapshot of the database, streamed in constant memory. "
            "`X-Kbms-Count` says how many lines will come: fewer means the transfer broke."
        ),
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {
                    "application/x-ndjson": {
                        "schema": {"type": "string", "description": "One ConversationDetail JSON object per line"}
                    }
                },
                "description": "One conversation per line",
                "headers": {"X-Kbms-Count": {"schema": {"type": "integer"}, "description": "Lines that will follow"}},
            },
            422: {"model": ErrorBody, "description": "Bad filter"},
            **ERROR_RESPONSES,
        },
        openapi_extra={"parameters": filter_parameters},
    )(export_conversations)
    return routes
