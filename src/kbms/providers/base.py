"""What a provider is, and the one way raw bytes become a validated provider payload."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from kbms.errors import FieldIssue, InvalidJson, NonFiniteNumber, ValidationFailed
from kbms.model import ConversationSnapshot, Redactor, WebhookEvent
from kbms.providers.pull import Puller

MAX_ISSUES = 50
MAX_DEPTH = 200  # pydantic-core's JSON parser refuses deeper nesting
ROOT_FIELD = "body"

Payload = TypeVar("Payload", bound=BaseModel)


class WebhookReceiver(Protocol):
    """How a provider's webhooks are authenticated and read."""

    @property
    def secret_variable(self) -> str:
        """The environment variable holding the signing secret, e.g. ``KBMS_INTERCOM_CLIENT_SECRET``."""
        ...

    def verify(self, body: bytes, headers: Mapping[str, str], secret: str, *, now: datetime) -> bool:
        """Whether the raw body is signed with ``secret``; constant-time, before any parsing."""
        ...

    def parse(self, body: bytes, *, workspace: str | None) -> WebhookEvent:
        """Read a verified delivery; raises ``InvalidJson``, ``ValidationFailed`` or ``InvalidWebhookItem``.

        ``workspace``: the ``?workspace=`` of the webhook's URL, for providers whose payloads do not name it.
        """
        ...

    @property
    def needs_workspace(self) -> bool:
        """Whether every delivery needs the ``?workspace=`` of the webhook's URL (its payloads never name one)."""
        ...

    def delivery_schema(self) -> dict[str, Any]:
        """What ``parse`` accepts, as one self-contained JSON Schema (``$defs`` inside): documents the webhook in
        OpenAPI, where it is a promise, so it may be narrower than what is accepted but never wider."""
        ...


class Provider(Protocol):
    """A source of conversations. Implementations live in ``providers/<name>/`` and are listed in the registry."""

    @property
    def name(self) -> str:
        """The provider's name in URLs, in stored rows and in the ``provider`` field of the contract."""
        ...

    @property
    def push_schema(self) -> type[BaseModel]:
        """The schema of a directly pushed conversation (documents the request body in OpenAPI)."""
        ...

    @property
    def workspace_description(self) -> str:
        """What the provider's workspace is (an Intercom app_id, a Zendesk subdomain), for the API's documentation."""
        ...

    def parse_push(self, body: bytes, *, workspace: str | None, default_workspace: str) -> ConversationSnapshot:
        """Validate and map a pushed conversation; raises ``InvalidJson`` or ``ValidationFailed``.

        ``workspace``: the one the caller named, if any; else the provider reads it from the payload if it can,
        and falls back to ``default_workspace``.
        """
        ...

    @property
    def webhooks(self) -> WebhookReceiver | None:
        """The provider's webhooks, if it sends any."""
        ...

    @property
    def puller(self) -> Puller | None:
        """How kbms pulls the provider's conversations from its API (``kbms sync``), if it can."""
        ...

    @property
    def redactor(self) -> Redactor | None:
        """Rewrites the provider's raw payloads when a message is redacted (see ``kbms.model.Redactor``); None
        when the provider's redactions are not mapped."""
        ...


def validate_json(schema: type[Payload], body: bytes) -> Payload:
    """Parse and validate raw bytes in one pass, translating pydantic's errors into kbms's."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise _translate(exc) from None


def refuse_non_finite(body: bytes) -> None:
    """Raise ``NonFiniteNumber`` if ``body`` holds ``NaN``, ``Infinity`` or ``-Infinity`` as a value, anywhere.

    Called by the use cases where a payload arrives (``kbms.ingest``), before any of it is stored, and not by
    ``validate_json``: ``kbms reprocess`` re-reads the ledger, where an older kbms kept such payloads as accepted,
    and refusing them there would delete conversations that nothing new refutes.

    pydantic's JSON parser, like Python's ``json``, reads exactly these three spellings (not ``nan``, ``+Infinity``,
    ``-NaN`` or ``inf``), and reads them in fields kbms ignores too, so the schema cannot see them. Most bodies hold
    neither word, and two substring scans say so (about 1 us per KB, measured: 3 us of a fixture conversation's
    73 us of validation and mapping); only a body that does is parsed again, strictly (about 4 us per KB), to tell
    a value from the same letters in a string. ``1e999`` is a JSON number, however large: it is left to the schema
    (a mapped field refuses it).
    """
    if b"NaN" not in body and b"Infinity" not in body:
        return
    try:
        from_json(body, allow_inf_nan=False)
    except ValueError:
        try:
            from_json(body)
        except ValueError:
            return  # not JSON either way: the schema's own parse says what is wrong, as for any malformed body
        raise NonFiniteNumber() from None


def _translate(exc: ValidationError) -> InvalidJson | ValidationFailed:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    invalid = [error for error in errors if error["type"] == "json_invalid"]
    if invalid:
        too_deep = "recursion limit" in invalid[0]["msg"]
        return InvalidJson(f"JSON nested deeper than {MAX_DEPTH} levels") if too_deep else InvalidJson()
    return ValidationFailed(translate_issues(exc))


def translate_issues(exc: ValidationError, *, prefix: tuple[str, ...] = ()) -> list[FieldIssue]:
    """One issue per pydantic error (at most ``MAX_ISSUES``), at dotted paths under ``prefix``."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    issues = [
        FieldIssue(
            field=".".join(str(part) for part in (*prefix, *error["loc"])) or ROOT_FIELD,
            issue=error["type"],
            message=error["msg"],
        )
        for error in errors[:MAX_ISSUES]
    ]
    if len(errors) > MAX_ISSUES:
        more = len(errors) - MAX_ISSUES
        issues.append(FieldIssue(field=ROOT_FIELD, issue="too_many_errors", message=f"{more} more not shown"))
    return issues
