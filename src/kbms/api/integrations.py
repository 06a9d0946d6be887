"""``POST /integrations/{provider}/conversations`` and ``.../conversations/batch``: routes per registered provider,
built from the registry."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request, Response

from kbms.api.auth import visible_workspaces
from kbms.api.body import MAX_BATCH_LINES, NDJSON_TYPES, ndjson_lines, read_json_body, read_ndjson_body
from kbms.api.conversations import detail_link
from kbms.api.errors import ERROR_RESPONSES, error_body, status_of
from kbms.api.lean import WORKSPACE_QUERY, LeanRoute, limits_of, settings_of, store_of, workspace_parameter
from kbms.api.metrics import metrics_of
from kbms.api.responses import json_response
from kbms.api.schemas import BatchLine, BatchResponse, ErrorBody, IngestResponse
from kbms.errors import FieldIssue, InputError, PayloadTooLarge, ValidationFailed
from kbms.ingest import LineOutcome, Refused, ingest_batch, ingest_push
from kbms.providers import Provider


def _endpoint(provider: Provider) -> Callable[[Request], Awaitable[Response]]:
    async def ingest(request: Request) -> Response:
        settings = settings_of(request)
        metrics = metrics_of(request)
        try:
            workspace = WORKSPACE_QUERY.read(request)
            body = await read_json_body(request, limit=settings.max_body_bytes)
            outcome = await ingest_push(
                store_of(request),
                provider,
                body,
                workspace=workspace,
                default_workspace=settings.default_workspace,
                limits=limits_of(request),
                allowed=visible_workspaces(request),
            )
        except InputError as exc:
            metrics.refused(provider.name, "push", exc)
            raise
        if isinstance(outcome, Refused):
            metrics.refused(provider.name, "push", outcome.error, kept=outcome.kept)
            raise outcome.error
        metrics.ingested(provider.name, "push", outcome.result)
        return json_response(IngestResponse.of(outcome), status=201 if outcome.result == "created" else 200)

    return ingest


def _batch_endpoint(provider: Provider) -> Callable[[Request], Awaitable[Response]]:
    async def ingest_many(request: Request) -> Response:
        settings = settings_of(request)
        workspace = WORKSPACE_QUERY.read(request)
        body = await read_ndjson_body(request, limit=settings.max_batch_bytes)
        line_count, lines = ndjson_lines(body)
        if not lines:
            raise ValidationFailed([FieldIssue("body", "empty_batch", "The batch has no lines")])
        # The limit bounds the work of one transaction, so it counts the lines that carry a payload: blank lines
        # cost nothing (and the body's size is bounded by KBMS_MAX_BATCH_BYTES).
        if len(lines) > MAX_BATCH_LINES:
            message = f"A batch holds at most {MAX_BATCH_LINES} non-blank lines; this one has {len(lines)}"
            raise PayloadTooLarge(settings.max_batch_bytes, message)
        line_limit = settings.max_body_bytes
        fitting = [payload for _number, payload in lines if len(payload) <= line_limit]
        ingested = await ingest_batch(
            store_of(request),
            provider,
            fitting,
            workspace=workspace,
            default_workspace=settings.default_workspace,
            limits=limits_of(request),
            allowed=visible_workspaces(request),
        )
        outcomes = iter(ingested)
        too_large = Refused(PayloadTooLarge(line_limit, f"Line exceeds {line_limit} bytes"))
        results = [_line(number, next(outcomes) if len(p) <= line_limit else too_large) for number, p in lines]
        counts = Counter(result.result for result in results)
        metrics = metrics_of(request)
        for outcome, count in counts.items():
            metrics.ingested(provider.name, "batch", outcome, count)
        metrics.kept(provider.name, "batch", sum(isinstance(o, Refused) and o.kept for o in ingested))
        response = BatchResponse(
            provider=provider.name,
            lines=line_count,
            created=counts["created"],
            updated=counts["updated"],
            unchanged=counts["unchanged"],
            rejected=counts["rejected"],
            results=results,
        )
        return json_response(response)

    return ingest_many


def _line(number: int, outcome: LineOutcome) -> BatchLine:
    if isinstance(outcome, Refused):
        status, _code = status_of(outcome.error)
        return BatchLine(line=number, status=status, result="rejected", error=error_body(outcome.error))
    return BatchLine(
        line=number,
        status=201 if outcome.result == "created" else 200,
        result=outcome.result,
        id=outcome.conversation_id,
        external_id=outcome.external_id,
        deduplicated=outcome.deduplicated,
    )


def request_body(provider: Provider) -> dict[str, Any]:
    # The body is read raw (validated once, from bytes, by the provider), so OpenAPI is told its schema here.
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{provider.push_schema.__name__}"}}
            },
        },
        "parameters": [workspace_parameter(provider.workspace_description)],
    }


def batch_request_body(provider: Provider) -> dict[str, Any]:
    schema_name = provider.push_schema.__name__
    description = (
        f"NDJSON: one {schema_name} per line (UTF-8, lines end with \\n or \\r\\n; blank lines are numbered and "
        f"skipped), at most {MAX_BATCH_LINES} non-blank lines and KBMS_MAX_BATCH_BYTES bytes; each line at most "
        "KBMS_MAX_BODY_BYTES."
    )
    # A line counts if it has a byte other than ASCII whitespace (what bytes.strip removes); a batch needs one.
    schema = {"type": "string", "pattern": "[^ \\t-\\r]", "description": description}
    return {
        "requestBody": {
            "required": True,
            "content": {media_type: {"schema": schema} for media_type in sorted(NDJSON_TYPES)},
        },
        "parameters": [workspace_parameter(provider.workspace_description)],
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
                201: {"links": {"Conversation": detail_link("$response.body#/id")}},
                200: {
                    "model": IngestResponse,
                    "description": "Already stored: merged (updated) or unchanged",
                    "links": {"Conversation": detail_link("$response.body#/id")},
                },
                400: {"model": ErrorBody, "description": "Malformed JSON (or not UTF-8, or holding NaN or Infinity)"},
                413: {"model": ErrorBody, "description": "Body larger than KBMS_MAX_BODY_BYTES"},
                415: {"model": ErrorBody, "description": "Content-Type is not JSON"},
                422: {"model": ErrorBody, "description": "Payload validation failed"},
                **ERROR_RESPONSES,
            },
            openapi_extra=request_body(provider),
        )
        api.add_api_route(
            f"/integrations/{provider.name}/conversations/batch",
            _batch_endpoint(provider),
            methods=["POST"],
            name=f"ingest_{provider.name}_conversation_batch",
            summary=f"Ingest up to {MAX_BATCH_LINES} {provider.name} conversations (NDJSON)",
            description=(
                "For backfills: each line is ingested exactly as a single push would be, and answered in "
                "`results` with the status that push would have had. A bad line is rejected alone (with its line "
                "number and the documented error body); the others are stored. The whole batch is committed in "
                "one transaction before the 200: a 503 means none of it was, and the batch can be sent again."
            ),
            status_code=200,
            response_model=BatchResponse,
            responses={
                200: {"links": {"FirstConversation": detail_link("$response.body#/results/0/id")}},
                413: {"model": ErrorBody, "description": "Body over KBMS_MAX_BATCH_BYTES, or too many lines"},
                415: {"model": ErrorBody, "description": "Content-Type is not NDJSON"},
                422: {"model": ErrorBody, "description": "Empty batch, or a bad workspace parameter"},
                **ERROR_RESPONSES,
            },
            openapi_extra=batch_request_body(provider),
        )
    return api
