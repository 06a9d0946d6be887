"""The OpenAPI document, completed with the provider payload schemas that routes reference by name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, payload_schemas: Iterable[type[BaseModel]]) -> None:
    schemas = list(payload_schemas)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas:
                schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            _document_our_422(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
