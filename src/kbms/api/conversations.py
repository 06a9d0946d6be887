"""``/internal/conversations``: what internal consumers read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from kbms.api.cursor import decode_cursor, encode_cursor
from kbms.api.deps import StoreDep
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.responses import json_response
from kbms.api.schemas import ConversationDetail, ConversationPage, ErrorBody
from kbms.errors import NotFound

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

router = APIRouter(prefix="/internal/conversations", tags=["internal"])


@router.get(
    "",
    response_model=ConversationPage,
    summary="List conversations, newest-updated first",
    responses={422: {"model": ErrorBody, "description": "Bad limit or cursor"}, **ERROR_RESPONSES},
)
async def list_conversations(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=256, description="next_cursor of the previous page")] = None,
) -> Response:
    page = await store.list_conversations(limit=limit, cursor=decode_cursor(cursor) if cursor else None)
    next_cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    return json_response(ConversationPage(items=page.items, next_cursor=next_cursor))


@router.get(
    "/{conversation_id}",
    response_model=ConversationDetail,
    summary="One conversation with its participants, messages and events",
    responses={
        404: {"model": ErrorBody, "description": "Unknown or deleted conversation"},
        **ERROR_RESPONSES,
    },
)
async def get_conversation(conversation_id: str, store: StoreDep) -> Response:
    detail = await store.get_conversation_json(conversation_id)
    if detail is None:
        raise NotFound("Conversation not found")
    return json_response(detail)
