"""Reading request bodies: media type checked first, size enforced while the bytes arrive; a batch's NDJSON lines."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.requests import ClientDisconnect

from kbms.errors import ClientDisconnected, PayloadTooLarge, UnsupportedMediaType

# Newline-delimited JSON goes by several names; none is registered with IANA.
NDJSON_TYPES = frozenset(
    (
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    )
)
# The most payload lines one batch request may carry: it bounds the work of one transaction.
MAX_BATCH_LINES = 1000


def is_json(content_type: str | None) -> bool:
    """``application/json``, ``application/*+json``, in UTF-8 (RFC 8259); a missing header is taken as JSON."""
    if not content_type:
        return True
    media_type, _, params = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return False
    return _is_utf8(params)


def is_ndjson(content_type: str | None) -> bool:
    """One of ``NDJSON_TYPES``, in UTF-8; a missing header is taken as NDJSON."""
    if not content_type:
        return True
    media_type, _, params = content_type.partition(";")
    return media_type.strip().lower() in NDJSON_TYPES and _is_utf8(params)


def _is_utf8(params: str) -> bool:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


async def read_json_body(request: Request, *, limit: int) -> bytes:
    """The raw body, refused with 415 if not JSON and with 413 as soon as it exceeds ``limit`` bytes."""
    return await read_body(request, limit=limit, accepts=is_json, accepted="application/json")


async def read_ndjson_body(request: Request, *, limit: int) -> bytes:
    """The raw body, refused with 415 if not NDJSON and with 413 as soon as it exceeds ``limit`` bytes."""
    return await read_body(request, limit=limit, accepts=is_ndjson, accepted="application/x-ndjson")


async def read_body(request: Request, *, limit: int, accepts: Callable[[str | None], bool], accepted: str) -> bytes:
    content_type = request.headers.get("content-type")
    if not accepts(content_type):
        raise UnsupportedMediaType(content_type or "", accepted=accepted)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # RFC 9110: an unsupported content coding is a 415
        raise UnsupportedMediaType(f"Content-Encoding: {encoding}", accepted="an unencoded body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


def ndjson_lines(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """How many lines ``data`` has, blank ones included, and (line number, line) of every non-blank one, without its
    line break (``\n`` or ``\r\n``). A final line break ends the last line; it does not start an empty one."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return len(lines), [
        (number, line.removesuffix(b"\r")) for number, line in enumerate(lines, start=1) if line.strip()
    ]
