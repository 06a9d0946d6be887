"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Response

from kbms.api.deps import StoreDep
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.responses import json_response
from kbms.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The process is up")
async def health() -> Response:
    return json_response(Health(status="ok"))


@router.get("/ready", response_model=Health, summary="The database answers", responses=ERROR_RESPONSES)
async def ready(store: StoreDep) -> Response:
    await store.ping()
    return json_response(Health(status="ready"))
