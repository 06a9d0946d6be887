"""JSON responses from bytes already serialized (the read model) or from pydantic models."""

from __future__ import annotations

from fastapi.responses import Response
from pydantic import BaseModel

JSON = "application/json"


def json_response(body: BaseModel | bytes, *, status: int = 200) -> Response:
    content = body if isinstance(body, bytes) else body.model_dump_json().encode()
    return Response(content, status_code=status, media_type=JSON)
