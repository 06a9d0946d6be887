"""The OpenAPI document, completed with the provider payload schemas that routes reference by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.routing import BaseRoute

REF_TEMPLATE = "#/components/schemas/{model}"


def link(path: str, method: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link (how a response leads to a next request): the operation at ``path``, its ``parameters`` as
    runtime expressions (``$response.body#/id``). Clients and schemathesis's stateful tests follow them."""
    pointer = quote(path.replace("~", "~0").replace("/", "~1"))
    return {"operationRef": f"#/paths/{pointer}/{method}", "parameters": parameters, "description": description}


def install_openapi(
    app: FastAPI,
    payload_schemas: Iterable[type[BaseModel]],
    *,
    protected: Callable[[str], str | None],
    order: Sequence[APIRouter] = (),
) -> None:
    """``protected``: the API-key scope a path needs, or None (see ``kbms.api.auth``). ``order``: the routers in
    the order the document lists their paths (they are matched in another); the app's other routes come first."""
    schemas = list(payload_schemas)

    def rank(route: BaseRoute) -> int:
        router = getattr(route, "original_router", None)
        return order.index(router) + 1 if router in order else 0

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            routes = sorted(app.routes, key=rank)
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=routes)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas:
                schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            _lift_definitions(document, components)
            _document_our_422(document)
            _document_api_keys(document, protected)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_api_keys(document: dict[str, Any], protected: Callable[[str], str | None]) -> None:
    """Which operations need an API key, with which scope, and their 401 and 403 answers."""
    document["components"]["securitySchemes"] = {
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`kbms keys create`). Scopes: read (/internal), ingest (/integrations), "
            "admin (/metrics, and the other two). Not needed when the server has no keys configured.",
        }
    }
    error_ref = {"$ref": REF_TEMPLATE.format(model="ErrorBody")}
    for path, operations in document.get("paths", {}).items():
        scope = protected(path)
        if scope is None:
            continue
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}]
            needs = f"Needs an API key with the `{scope}` scope."
            operation["description"] = f"{operation.get('description', '')}\n\n{needs}".strip()
            responses = operation.setdefault("responses", {})
            responses["401"] = {
                "description": "No API key, or not a valid one",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge"}},
                "content": {"application/json": {"schema": error_ref}},
            }
            responses["403"] = {
                "description": f"The key lacks the {scope} scope, or the workspace asked for",
                "content": {"application/json": {"schema": error_ref}},
            }


def _lift_definitions(document: dict[str, Any], components: dict[str, Any]) -> None:
    """Request bodies documented by a self-contained JSON Schema (webhook deliveries) keep their ``$defs`` inside,
    where OpenAPI tools do not look: move them to the components and point the references there."""
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = media.get("schema", {})
                if "$defs" in schema:
                    components.update(_to_components(schema.pop("$defs")))
                    media["schema"] = _to_components(schema)


def _to_components(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: REF_TEMPLATE.format(model=value.removeprefix("#/$defs/"))
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/")
            else _to_components(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_to_components(item) for item in node]
    return node


def _document_our_422(document: dict[str, Any]) -> None:
    """FastAPI documents parameter errors with its own shape; kbms answers them with ``ErrorBody``."""
    error_ref = {"$ref": REF_TEMPLATE.format(model="ErrorBody")}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response is None:
                continue
            for media in response.get("content", {}).values():
                if media.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    media["schema"] = error_ref
                    response["description"] = "Request validation failed"
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
