"""``POST /webhooks/{provider}`` (and ``HEAD``, which Intercom uses to validate the URL), from the registry.

Authenticated by the provider's signature only. Never answers 410: providers read it as "unsubscribe me".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request, Response

from kbms.api.body import read_json_body
from kbms.api.conversations import detail_link
from kbms.api.errors import ERROR_RESPONSES
from kbms.api.lean import WORKSPACE_QUERY, LeanRoute, limits_of, settings_of, store_of, workspace_parameter
from kbms.api.metrics import metrics_of
from kbms.api.responses import json_response
from kbms.api.schemas import ErrorBody, WebhookResponse
from kbms.errors import InputError
from kbms.ingest import Refused
from kbms.providers import Provider
from kbms.webhooks import receive_webhook

log = logging.getLogger(__name__)


def _endpoint(provider: Provider, secret_variable: str) -> Callable[[Request], Awaitable[Response]]:
    async def receive(request: Request) -> Response:
        settings = settings_of(request)
        metrics = metrics_of(request)
        try:
            workspace = WORKSPACE_QUERY.read(request)
            body = await read_json_body(request, limit=settings.max_body_bytes)
            outcome = await receive_webhook(
                store_of(request),
                provider,
                body,
                request.headers,
                secret=settings.secret(secret_variable),
                workspace=workspace,
                verify=not settings.allow_unsigned_webhooks,
                limits=limits_of(request),
                clock=request.app.state.clock,
            )
        except InputError as exc:
            metrics.refused(provider.name, "webhook", exc)
            raise
        if isinstance(outcome, Refused):
            metrics.refused(provider.name, "webhook", outcome.error, kept=outcome.kept)
            raise outcome.error
        metrics.ingested(provider.name, "webhook", outcome.result)
        sync = request.app.state.sync
        if sync is not None and outcome.external_id is not None:
            # A hint: the provider's full, current copy of this conversation is fetched a few seconds later. The
            # webhook is stored whatever becomes of the hint: its sender must not hear a failure for it (Intercom
            # pauses a subscription after 1,000 errors), and a redelivery hints again (one pending fetch at most).
            try:
                await sync.hint(provider.name, outcome.workspace, outcome.external_id)
            except Exception:
                log.warning("no fetch queued for a %s conversation a webhook named", provider.name, exc_info=True)
        return json_response(WebhookResponse.of(outcome))

    return receive


def _workspace(required: bool) -> dict[str, Any]:
    if required:
        description = "The workspace of every delivery: the provider's payloads do not name it (set it in the URL)"
    else:
        description = "The workspace of deliveries whose payload does not name one (set it in the webhook's URL)"
    return {**workspace_parameter(description), "required": required}


async def _probe(request: Request) -> Response:
    return Response(status_code=200)


def router(providers: Iterable[Provider]) -> APIRouter:
    api = APIRouter(tags=["webhooks"], route_class=LeanRoute)
    for provider in providers:
        if provider.webhooks is None:
            continue
        path = f"/webhooks/{provider.name}"
        api.add_api_route(
            path,
            _endpoint(provider, provider.webhooks.secret_variable),
            methods=["POST"],
            name=f"receive_{provider.name}_webhook",
            summary=f"Receive a signed {provider.name} webhook",
            description=(
                f"The signature is checked on the raw bytes with `{provider.webhooks.secret_variable}` before "
                "anything is read. Redeliveries are recognized by their delivery id and answered without being "
                "processed again. Every verified payload is kept in the ledger, rejected ones included."
            ),
            response_model=WebhookResponse,
            responses={
                200: {"links": {"Conversation": detail_link("$response.body#/conversation_id")}},
                400: {
                    "model": ErrorBody,
                    "description": "Malformed JSON (kept in the ledger as rejected); JSON holding NaN or Infinity "
                    "(not kept)",
                },
                401: {"model": ErrorBody, "description": "Missing or invalid signature: nothing is kept"},
                413: {"model": ErrorBody, "description": "Body larger than KBMS_MAX_BODY_BYTES"},
                415: {"model": ErrorBody, "description": "Content-Type is not JSON"},
                422: {"model": ErrorBody, "description": "Invalid payload (kept in the ledger as rejected)"},
                **ERROR_RESPONSES,
            },
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": provider.webhooks.delivery_schema()}},
                },
                "parameters": [_workspace(provider.webhooks.needs_workspace)],
            },
        )
        api.add_api_route(
            path,
            _probe,
            methods=["HEAD"],
            name=f"probe_{provider.name}_webhook",
            summary="URL validation",
            # An empty 200 without a media type: documenting JSON here promised a Content-Type it never has.
            response_class=Response,
            responses={200: {"description": "The URL is a webhook endpoint"}},
        )
    return api
