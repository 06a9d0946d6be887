"""``POST /integrations/{provider}/conversations``: one route per registered provider, built from the registry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import StringConstraints, TypeAdapter

from kbms.api.body import read_json_body
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.lean import LeanRoute, parameter, query, settings_of, store_of
from kbms.api.responses import json_response
from kbms.api.schemas import ErrorBody, IngestResponse
from kbms.ingest import ingest_push
from kbms.model import WORKSPACE_PATTERN
from kbms.providers import Provider

WORKSPACE = TypeAdapter(Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=WORKSPACE_PATTERN)])


def _endpoint(provider: Provider) -> Callable[[Request], Awaitable[Response]]:
    async def ingest(request: Request) -> Response:
        settings = settings_of(request)
        workspace = query(request, "workspace", WORKSPACE, settings.default_workspace)
        body = await read_json_body(request, limit=settings.max_body_bytes)
        outcome = await ingest_push(store_of(request), provider, body, workspace=workspace)
        return json_response(IngestResponse.of(outcome), status=201 if outcome.result == "created" else 200)

    return ingest


def request_body(schema_name: str) -> dict[str, Any]:
    # The body is read raw (validated once, from bytes, by the provider), so OpenAPI is told its schema here.
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        },
        "parameters": [
            parameter(
                "workspace",
                "query",
                {"type": "string", "minLength": 1, "maxLength": 128, "pattern": WORKSPACE_PATTERN},
                "The provider account this conversation belongs to (Intercom app_id); default: 'default'",
            )
        ],
    }


def router(providers: Iterable[Provider]) -> APIRouter:
    api = APIRouter(tags=["ingestion"], route_class=LeanRoute)
    for provider in providers:
        api.add_api_route(
            f"/integrations/{provider.name}/conversations",
            _endpoint(provider),
            methods=["POST"],
            name=f"ingest_{provider.name}_conversation",
            summary=f"Ingest a {provider.name} conversation",
            description=(
                "Validates, normalizes and stores one conversation. Re-sending merges: new parts are added, "
                "newer fields win, nothing is stored twice. A 2xx means the data is committed."
            ),
            status_code=201,
            response_model=IngestResponse,
            responses={
                200: {
                    "model": IngestResponse,
                    "description": "Already stored: merged (updated) or unchanged",
                },
                400: {"model": ErrorBody, "description": "Malformed JSON (or not UTF-8)"},
                413: {"model": ErrorBody, "description": "Body larger than KBMS_MAX_BODY_BYTES"},
                415: {"model": ErrorBody, "description": "Content-Type is not JSON"},
                422: {"model": ErrorBody, "description": "Payload validation failed"},
                **ERROR_RESPONSES,
            },
            openapi_extra=request_body(provider.push_schema.__name__),
        )
    return api
