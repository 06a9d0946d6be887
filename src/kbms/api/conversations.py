"""``/internal/conversations``: what internal consumers read. Lean routes (see ``api/lean.py``): these are hot."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field, StringConstraints, TypeAdapter

from kbms.api.cursor import decode_cursor, encode_cursor
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.lean import LeanRoute, parameter, query, store_of
from kbms.api.responses import json_response
from kbms.api.schemas import ConversationDetail, ConversationPage, ErrorBody
from kbms.errors import NotFound
from kbms.model import WORKSPACE_PATTERN
from kbms.providers import REGISTRY
from kbms.storage.base import Filters

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
LIMIT = TypeAdapter(Annotated[int, Field(ge=1, le=MAX_LIMIT)])
CURSOR = TypeAdapter(Annotated[str, Field(max_length=256)])
PROVIDER: TypeAdapter[str] = TypeAdapter(Literal[tuple(REGISTRY)])  # type: ignore[arg-type]
WORKSPACE = TypeAdapter(Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=WORKSPACE_PATTERN)])

router = APIRouter(prefix="/internal/conversations", tags=["internal"], route_class=LeanRoute)


@router.get(
    "",
    response_model=ConversationPage,
    summary="List conversations, newest-updated first",
    responses={422: {"model": ErrorBody, "description": "Bad limit or cursor"}, **ERROR_RESPONSES},
    openapi_extra={
        "parameters": [
            parameter(
                "limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}, "Page size"
            ),
            parameter("cursor", "query", {"type": "string", "maxLength": 256}, "next_cursor of the previous page"),
            parameter("provider", "query", {"type": "string", "enum": list(REGISTRY)}, "Only this provider's"),
            parameter(
                "workspace",
                "query",
                {"type": "string", "minLength": 1, "maxLength": 128, "pattern": WORKSPACE_PATTERN},
                "Only this workspace's (a provider account)",
            ),
        ]
    },
)
async def list_conversations(request: Request) -> Response:
    limit = query(request, "limit", LIMIT, DEFAULT_LIMIT)
    cursor = query(request, "cursor", CURSOR, "")
    filters = Filters(
        provider=query(request, "provider", PROVIDER, None), workspace=query(request, "workspace", WORKSPACE, None)
    )
    page = await store_of(request).list_conversations(
        limit=limit, cursor=decode_cursor(cursor) if cursor else None, filters=filters
    )
    next_cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    return json_response(ConversationPage(items=page.items, next_cursor=next_cursor))


@router.get(
    "/{conversation_id}",
    response_model=ConversationDetail,
    summary="One conversation with its participants, messages and events",
    responses={404: {"model": ErrorBody, "description": "Unknown or deleted conversation"}, **ERROR_RESPONSES},
    openapi_extra={
        "parameters": [parameter("conversation_id", "path", {"type": "string"}, "kbms's id", required=True)]
    },
)
async def get_conversation(request: Request) -> Response:
    detail = await store_of(request).get_conversation_json(request.path_params["conversation_id"])
    if detail is None:
        raise NotFound("Conversation not found")
    return json_response(detail)
