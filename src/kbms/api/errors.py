"""Errors to HTTP, in one table. The only place that knows status codes for kbms's errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from kbms.api.schemas import ErrorBody, ErrorDetail
from kbms.errors import (
    ClientDisconnected,
    FieldIssue,
    Forbidden,
    HeadersTooLarge,
    InvalidJson,
    InvalidSignature,
    KbmsError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    StorageUnavailable,
    Unauthenticated,
    UnknownProvider,
    UnsupportedMediaType,
    ValidationFailed,
)
from kbms.logs import REQUEST_ID

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"
STATUS: dict[type[KbmsError], tuple[int, str]] = {
    InvalidJson: (400, "invalid_json"),
    InvalidSignature: (401, "invalid_signature"),
    Unauthenticated: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    ClientDisconnected: (400, "client_disconnected"),
    ValidationFailed: (422, "validation_error"),
    NotFound: (404, "not_found"),
    UnknownProvider: (404, "not_found"),
    PayloadTooLarge: (413, "payload_too_large"),
    RequestTimeout: (408, "request_timeout"),
    HeadersTooLarge: (431, "headers_too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    StorageUnavailable: (503, "unavailable"),
    Overloaded: (503, "unavailable"),
}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
LOCATIONS = frozenset(("body", "query", "path", "header", "cookie"))


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[FieldIssue] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = ErrorBody(
        error_code=code,
        message=message,
        details=None
        if details is None
        else [ErrorDetail(field=d.field, issue=d.issue, message=d.message) for d in details],
    )
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def status_of(exc: KbmsError) -> tuple[int, str]:
    """The HTTP status and error code of a kbms error."""
    return next((v for cls, v in STATUS.items() if isinstance(exc, cls)), (500, "internal_error"))


def error_body(exc: KbmsError) -> ErrorBody:
    """The documented error body of a kbms error (also what a batch reports for each failed line)."""
    _status, code = status_of(exc)
    issues = exc.issues if isinstance(exc, ValidationFailed) else None
    details = None if issues is None else [ErrorDetail(field=d.field, issue=d.issue, message=d.message) for d in issues]
    return ErrorBody(error_code=code, message=exc.message, details=details)


def kbms_error_response(exc: KbmsError) -> Response:
    """The HTTP answer to a kbms error: its status, the error body, and the headers its status calls for."""
    status, _code = status_of(exc)
    headers = None
    if status == 503:
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        if isinstance(exc, StorageUnavailable):  # not Overloaded: refusals are counted by kbms.api.admission
            log.warning("storage unavailable: %s", exc.message)
    elif isinstance(exc, Unauthenticated):
        # RFC 6750 section 3: a challenge always; error="invalid_token" when a key was sent but is no good.
        challenge = 'Bearer realm="kbms", error="invalid_token"' if exc.presented else 'Bearer realm="kbms"'
        headers = {"WWW-Authenticate": challenge}
    return Response(
        error_body(exc).model_dump_json(), status_code=status, media_type="application/json", headers=headers
    )


def raw_response_of(exc: KbmsError) -> bytes:
    """A whole HTTP/1.1 response for a kbms error, closing the connection: for the HTTP server itself
    (``kbms.server``), which answers some requests before there is an application request to answer."""
    status, _code = status_of(exc)
    body = error_body(exc).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _kbms_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KbmsError)
    return kbms_error_response(exc)


def _field(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if len(parts) > 1 and parts[0] in LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


async def _request_validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    issues = [FieldIssue(_field(e.get("loc", ())), e.get("type", "invalid"), e.get("msg", "")) for e in exc.errors()]
    return error_response(422, "validation_error", "Request validation failed", issues)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The trace goes to the log, never to the client. This runs outside the telemetry middleware (Starlette calls
    # it last), so the request id is bound again; the route's template is logged, not the path, which can carry
    # personal data, and the exception's message is withheld by the log formatter.
    request_id = getattr(request.state, "request_id", None)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    token = REQUEST_ID.set(request_id)
    try:
        log.error("unhandled error on %s %s", request.method, route, exc_info=exc)
    finally:
        REQUEST_ID.reset(token)
    headers = {"X-Request-ID": request_id} if request_id else None
    return error_response(500, "internal_error", "Internal server error", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KbmsError, _kbms_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    500: {"model": ErrorBody, "description": "Unexpected error (no trace is returned)"},
    503: {"model": ErrorBody, "description": "Database unavailable or service at capacity; retry after Retry-After"},
}
