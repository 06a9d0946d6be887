"""The errors kbms raises, as one tree.

The core raises these; the HTTP layer (``kbms.api.errors``) and the CLI map them to status and exit codes in
one table each. Nothing here knows about HTTP.

    KbmsError
    ├── InputError                    the caller sent something we refuse (a 4xx at the HTTP edge)
    │   ├── InvalidJson               the body is not JSON, or not UTF-8
    │   │   └── NonFiniteNumber       the body holds NaN or Infinity, which JSON does not have (never kept)
    │   ├── ValidationFailed          a payload or a parameter breaks its schema (one issue per field)
    │   │   ├── InvalidWebhookItem    a webhook's envelope is fine, but the item it carries is not
    │   │   └── LimitExceeded         a payload holds more (parts, characters) than the configured caps
    │   ├── InvalidSignature          a webhook is not signed with the configured secret
    │   ├── PayloadTooLarge           the body is larger than the configured limit
    │   ├── UnsupportedMediaType      the Content-Type is not JSON
    │   ├── UnknownProvider           no provider of that name is registered
    │   ├── ClientDisconnected        the client went away before its body arrived
    │   ├── RequestTimeout            a request's headers or body did not arrive in time (a slow client)
    │   ├── HeadersTooLarge           a request line and headers larger than the configured limit
    │   ├── NotFound                  the requested resource does not exist
    │   ├── Unauthenticated           no API key, or one that is not (or no longer) valid
    │   └── Forbidden                 a valid API key without the scope or workspace the request needs
    ├── StorageUnavailable            the database cannot be reached or written right now (retryable)
    └── Overloaded                    the process has more requests than it can take right now (retryable)
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldIssue:
    """One problem with one field: a dotted path, a machine-readable issue name and a human message."""

    field: str
    issue: str
    message: str


def describe(issues: list[FieldIssue]) -> str:
    """Issues as the JSON text kept with a rejected delivery."""
    issues_list = [{"field": i.field, "issue": i.issue, "message": i.message} for i in issues]
    return json.dumps(issues_list, ensure_ascii=False, separators=(",", ":"))


class KbmsError(Exception):
    """Base of every error kbms raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(KbmsError):
    """The input is refused; retrying the same input will fail the same way."""


class InvalidJson(InputError):
    """Raised when a body is not well-formed JSON (including invalid UTF-8 and lone surrogates)."""

    def __init__(self, message: str = "Malformed JSON body") -> None:
        super().__init__(message)


class NonFiniteNumber(InvalidJson):
    """Raised when a body holds ``NaN``, ``Infinity`` or ``-Infinity``: JavaScript's numbers, not JSON's (RFC 8259),
    which lenient parsers read and strict ones (PostgreSQL's ``jsonb``, jq) refuse. Never kept in the ledger, not
    even for a signed webhook (whose other malformed bodies are kept as rejected): unlike those, it reads as JSON to
    lenient readers of the ledger, which would then hand it on to strict ones."""

    def __init__(self) -> None:
        super().__init__("Malformed JSON body: NaN and Infinity are not JSON numbers")


class ValidationFailed(InputError):
    """Raised when a payload (or a query parameter) breaks its schema; carries one issue per problem."""

    def __init__(self, issues: list[FieldIssue], message: str = "Payload validation failed") -> None:
        super().__init__(message)
        self.issues = issues


class InvalidWebhookItem(ValidationFailed):
    """Raised when a webhook envelope validates but its item does not; says which delivery it was."""

    def __init__(self, issues: list[FieldIssue], *, delivery_id: str | None, topic: str | None, workspace: str) -> None:
        super().__init__(issues)
        self.delivery_id = delivery_id
        self.topic = topic
        self.workspace = workspace


class LimitExceeded(ValidationFailed):
    """Raised when a valid payload exceeds a size cap (``kbms.limits``); like an oversized body, it is not kept."""


class InvalidSignature(InputError):
    """Raised when a webhook's signature is missing, malformed, wrong, or cannot be checked (no secret)."""

    def __init__(self, message: str = "Invalid or missing webhook signature") -> None:
        super().__init__(message)


class PayloadTooLarge(InputError):
    """Raised while reading a body as soon as it exceeds the configured limit."""

    def __init__(self, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"Request body exceeds {limit} bytes")
        self.limit = limit


class UnsupportedMediaType(InputError):
    """Raised when a body arrives with a Content-Type the endpoint does not read."""

    def __init__(self, content_type: str, accepted: str = "application/json") -> None:
        super().__init__(f"{content_type!r} is not supported; send {accepted}")
        self.content_type = content_type


class UnknownProvider(InputError):
    """Raised when a provider name is not in the registry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Unknown provider {name!r}")
        self.name = name


class ClientDisconnected(InputError):
    """Raised while reading a body when the client closes the connection; nobody is left to answer."""

    def __init__(self) -> None:
        super().__init__("Client disconnected")


class RequestTimeout(InputError):
    """Raised by the HTTP server when a request's headers or body do not arrive within their deadline."""

    def __init__(self, message: str = "The request did not arrive in time") -> None:
        super().__init__(message)


class HeadersTooLarge(InputError):
    """Raised by the HTTP server when a request line and headers exceed the configured size."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request line and headers exceed {limit} bytes")
        self.limit = limit


class NotFound(InputError):
    """Raised when a conversation (or another resource) does not exist or is deleted."""


class Unauthenticated(InputError):
    """Raised when a request needs an API key and has none, or one that is malformed, unknown or revoked."""

    def __init__(self, message: str, *, presented: bool) -> None:
        super().__init__(message)
        self.presented = presented  # a key was sent (RFC 6750: error="invalid_token")


class Forbidden(InputError):
    """Raised when a valid API key lacks the scope, or the workspace, that a request needs."""


class StorageUnavailable(KbmsError):
    """Raised when the database cannot be reached or written; the same request may succeed later."""


class Overloaded(KbmsError):
    """Raised when a request finds every slot of the process taken and none frees up in time."""

    def __init__(self, message: str = "The service is at capacity; retry after the Retry-After delay") -> None:
        super().__init__(message)
