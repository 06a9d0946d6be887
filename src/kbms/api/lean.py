"""Lean routes: documented FastAPI routes whose requests skip FastAPI's per-request machinery.

FastAPI resolves each request's dependencies and parameters through a general engine; for kbms's hot routes that
engine cost more than the work (a detail read: about 2,900 req/s as a FastAPI route, 5,500-6,600 as a plain
handler in the same app, measured with wrk). A ``LeanRoute`` is still a FastAPI route (in OpenAPI, behind the same
middleware and error handlers), but its endpoint takes the ``Request`` and reads its few parameters itself, with
the pydantic validators below, so errors keep FastAPI's issue names (``greater_than_equal``, ``int_parsing``...).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, cast

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import StringConstraints, TypeAdapter, ValidationError

from kbms.errors import FieldIssue, NotFound, ValidationFailed
from kbms.limits import PayloadLimits
from kbms.model import UNSTORABLE, WORKSPACE_PATTERN
from kbms.settings import Settings
from kbms.storage import Store

T = TypeVar("T")
D = TypeVar("D")
Endpoint = Callable[[Request], Awaitable[Response]]


class LeanRoute(APIRoute):
    """An APIRoute whose handler is its endpoint, called with the request alone."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        return cast(Endpoint, self.endpoint)


def store_of(request: Request) -> Store:
    return cast(Store, request.app.state.store)


def settings_of(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def limits_of(request: Request) -> PayloadLimits:
    return cast(PayloadLimits, request.app.state.limits)


# Starlette decodes invalid percent-encoded UTF-8 (``%ED%A0%80``) to U+FFFD, so a surrogate reaches a parameter
# only from an ASGI server that decodes otherwise; it is refused the same way (``UNSTORABLE``).
NO_NUL = r"^[^\u0000]*$"  # the JSON Schema pattern (ECMA-262) of text without NUL


def query(request: Request, name: str, adapter: TypeAdapter[T], default: D) -> T | D:
    """A query parameter, validated; a bad one is a 422 naming it, like FastAPI's own. One given more than once is a
    422 too: which of its values was meant cannot be known (schemathesis sends ``?updated_after=1&updated_after=2``
    as a schema-violating array, and it was answered with the last one). So is one with text kbms never stores
    (``UNSTORABLE``): the same 422 on every engine, where PostgreSQL's driver would refuse it with a 500."""
    values = request.query_params.getlist(name)
    if not values:
        return default
    if len(values) > 1:
        issue = FieldIssue(name, "repeated_parameter", f"Give {name} once, not {len(values)} times")
        raise ValidationFailed([issue], message="Request validation failed")
    raw = values[0]
    if UNSTORABLE.search(raw) is not None:
        message = "Input should not contain NUL (U+0000) or unpaired surrogates: kbms stores no such text"
        raise ValidationFailed([FieldIssue(name, "invalid_character", message)], message="Request validation failed")
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        issues = [FieldIssue(name, error["type"], error["msg"]) for error in exc.errors(include_url=False)]
        raise ValidationFailed(issues, message="Request validation failed") from None


def path_id(request: Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    """A path parameter naming something kbms minted: a value that ``pattern`` does not match cannot name anything
    stored, so it is a 404 (the answer for an unknown one), decided here rather than by a database that may refuse
    the text (NUL on PostgreSQL)."""
    value = cast(str, request.path_params[name])
    if pattern.fullmatch(value) is None:
        raise NotFound(f"{what} not found")
    return value


@dataclass(frozen=True, slots=True)
class Query(Generic[T, D]):
    """A query parameter of a lean route: read and documented from one validator, so that the two cannot drift
    apart (the documented schema is the validator's JSON Schema, the documented default the one read)."""

    name: str
    adapter: TypeAdapter[T]
    default: D
    description: str

    def read(self, request: Request) -> T | D:
        return query(request, self.name, self.adapter, self.default)

    def openapi(self, description: str | None = None) -> dict[str, Any]:
        """The OpenAPI parameter object; ``description`` replaces the parameter's own where a route means more."""
        schema = self.adapter.json_schema()
        if self.default is not None:
            schema["default"] = self.default
        return parameter(self.name, "query", schema, description or self.description)


WORKSPACE = TypeAdapter(Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=WORKSPACE_PATTERN)])
WORKSPACE_QUERY = Query("workspace", WORKSPACE, None, "A workspace (a provider account)")


def workspace_parameter(description: str) -> dict[str, Any]:
    """The ``?workspace=`` of the routes that take one (a provider account)."""
    return WORKSPACE_QUERY.openapi(description)


def parameter(
    name: str, where: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    """An OpenAPI parameter object, for the ``openapi_extra`` of a lean route. A free-text query parameter is
    documented without NUL, which ``query`` refuses (unpaired surrogates cannot be written in a JSON Schema, nor
    sent as UTF-8)."""
    if where == "query" and schema.get("type") == "string" and not {"enum", "const", "pattern"} & schema.keys():
        schema = {**schema, "pattern": NO_NUL}
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}
